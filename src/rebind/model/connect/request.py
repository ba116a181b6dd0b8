"""The question: one outgoing connection as the kernel sees it (validated once, here), and its
addresses: the source connect() uses, v4-mapped addresses folded to IPv4 (C24)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from rebind.errors import UsageError
from rebind.model.addr import parse_ip
from rebind.model.records import Family, IPAddress, Proto
from rebind.model.validate import parse_port


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """One outgoing connection: what the client does before connect() and where it goes.

    Build it with :meth:`create` (validates, raises :class:`UsageError`); the fields are the
    kernel's view: ``src`` is the bound address, or the one the route picks (None: unknown yet,
    the gatherer fills it in).
    """

    dst: IPAddress
    dport: int
    src: IPAddress | None = None
    proto: Proto = Proto.TCP
    #: bind(src, 0) before connect() (the pattern of curl --interface, Envoy upstream binds).
    bind_before_connect: bool = False
    #: IP_BIND_ADDRESS_NO_PORT (4.2+) set before that bind: the port is left to connect().
    bind_address_no_port: bool = False
    #: bind(src, local_port) before connect(): the fixed-port client of the origin post.
    local_port: int | None = None
    reuseaddr: bool = False
    #: IP_LOCAL_PORT_RANGE (6.3+); (0, 0) or None: not set.
    port_range: tuple[int, int] | None = None

    @classmethod
    def create(
        cls,
        dst: str | IPAddress,
        dport: Any,
        *,
        src: str | IPAddress | None = None,
        proto: Proto | str = Proto.TCP,
        bind_before_connect: bool = False,
        bind_address_no_port: bool = False,
        local_port: Any = None,
        reuseaddr: bool = False,
        port_range: tuple[Any, Any] | None = None,
    ) -> ConnectRequest:
        """The one validated constructor: every bad value is a :class:`UsageError`."""
        d = _addr(dst, "destination")
        if d.is_unspecified:
            raise UsageError(f"destination {d} is a wildcard address, not a peer")
        if isinstance(d, IPv6Address) and d.ipv4_mapped is not None:
            d = d.ipv4_mapped  # C24: an AF_INET6 socket to ::ffff:a.b.c.d makes an IPv4 4-tuple
        s = None if src is None else _addr(src, "source address")
        if isinstance(s, IPv6Address) and s.ipv4_mapped is not None:
            s = s.ipv4_mapped
        if s is not None and not s.is_unspecified and s.version != d.version:
            raise UsageError(f"source {s} and destination {d} are not the same address family")
        try:
            p = Proto(proto)
        except ValueError:
            raise UsageError(f"protocol {proto!r} is not tcp or udp") from None
        lport = None if local_port is None else parse_port(local_port, what="local port", allow_zero=True)
        if lport == 0:
            lport, bind_before_connect = None, True
        if lport is not None and bind_address_no_port:
            raise UsageError("IP_BIND_ADDRESS_NO_PORT only matters for bind(ip, 0), not a fixed port")
        if s is not None and not s.is_unspecified and lport is None and not bind_before_connect:
            # A source address without a port: the way to get it is bind(src, 0) with
            # IP_BIND_ADDRESS_NO_PORT, leaving the port to connect() (C15).
            bind_address_no_port = True
        if bind_address_no_port and not bind_before_connect:
            bind_before_connect = True
        rng = None
        if port_range is not None:
            lo = parse_port(port_range[0], what="IP_LOCAL_PORT_RANGE low", allow_zero=True)
            hi = parse_port(port_range[1], what="IP_LOCAL_PORT_RANGE high", allow_zero=True)
            if lo and hi and lo > hi:
                raise UsageError(f"IP_LOCAL_PORT_RANGE {lo}-{hi}: low > high (setsockopt gives EINVAL)")
            rng = None if lo == hi == 0 else (lo, hi)
        return cls(
            dst=d,
            dport=parse_port(dport, what="destination port"),
            src=s,
            proto=p,
            bind_before_connect=bind_before_connect and lport is None,
            bind_address_no_port=bind_address_no_port,
            local_port=lport,
            reuseaddr=bool(reuseaddr),
            port_range=rng,
        )

    @property
    def family(self) -> Family:
        return Family.INET if self.dst.version == 4 else Family.INET6

    @property
    def own_choice(self) -> bool:
        """connect() chooses the port itself (no port before connect)."""
        return self.local_port is None and (not self.bind_before_connect or self.bind_address_no_port)

    @property
    def describe(self) -> str:
        how = "connect()"
        if self.local_port is not None:
            how = f"bind(port {self.local_port}{', SO_REUSEADDR' if self.reuseaddr else ''}) + connect()"
        elif self.bind_before_connect:
            how = "bind(ip, 0) + connect()"
            if self.bind_address_no_port:
                how = "IP_BIND_ADDRESS_NO_PORT + bind(ip, 0) + connect()"
        return f"{self.proto.value} {how} to {fmt_endpoint(self.dst, self.dport)}"


def _addr(value: str | IPAddress, what: str) -> IPAddress:
    return parse_ip(value, what=what, scope=True)


def fmt_endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def norm_addr(a: IPAddress) -> IPAddress:
    if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def is_loopback(a: IPAddress) -> bool:
    return norm_addr(a).is_loopback


def connect_source(req: ConnectRequest) -> IPAddress:
    if req.src is None or req.src.is_unspecified:
        # The route's source is the gatherer's job; without one, the loopback of the family.
        if req.src is not None and req.src.is_unspecified:
            return req.src
        return IPv4Address("127.0.0.1") if req.dst.version == 4 else IPv6Address("::1")
    return req.src
