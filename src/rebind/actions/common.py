"""What the actions share: one validated bind request, the trial bind, and socket wording."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv6Address, ip_address

from rebind.errors import UsageError
from rebind.kernel.trial import TrialResult, trial_bind
from rebind.model.conflict import BindRequest
from rebind.model.records import Proto, SocketRecord
from rebind.model.records import owner_label as owner_label  # the one owner label (escapes hostile names)

IPAddress = IPv4Address | IPv6Address
AddrLike = str | IPAddress

#: bind() errors that can go away by themselves: a holder leaves (EADDRINUSE), or an address
#: finishes IPv6 duplicate address detection or gets configured (EADDRNOTAVAIL).
TRANSIENT_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


def parse_proto(proto: Proto | str) -> Proto:
    try:
        return proto if isinstance(proto, Proto) else Proto(str(proto).lower())
    except ValueError:
        raise UsageError(f"unknown protocol {proto!r} (tcp or udp)") from None


def parse_addr(addr: AddrLike | None) -> IPAddress | None:
    if addr is None or isinstance(addr, IPv4Address | IPv6Address):
        return addr
    text = addr.strip().strip("[]")
    try:
        return ip_address(text)
    except ValueError:
        raise UsageError(f"{addr!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1, ::)") from None


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"port {port!r} is out of range (1-65535)")
    return port


def bind_request(
    port: int,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
) -> BindRequest:
    """The request `rebind why` would diagnose, from user input (errors are UsageError)."""
    from rebind.diagnosis import default_request

    a = parse_addr(addr)
    if v6only and a is None:
        a = IPv6Address("::")  # as `rebind why --v6only` does
    if v6only is not None and a is not None and a.version != 6:
        raise UsageError("v6only needs an IPv6 address (e.g. ::)")
    return default_request(
        check_port(port),
        addr=a,
        proto=parse_proto(proto),
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=v6only,
    )


def try_bind(req: BindRequest) -> TrialResult:
    return trial_bind(
        req.proto, req.addr, req.port, reuseaddr=req.reuseaddr, reuseport=req.reuseport, v6only=req.v6only
    )


def where(req: BindRequest) -> str:
    """``0.0.0.0:8080/tcp`` (IPv6 in brackets)."""
    host = f"[{req.addr}]" if req.addr.version == 6 else str(req.addr)
    return f"{host}:{req.port}/{req.proto.value}"


def socket_label(r: SocketRecord) -> str:
    remote = "" if r.remote.port == 0 and r.remote.addr.is_unspecified else f" -> {r.remote}"
    return f"{r.proto.value} {r.state.label} {r.local}{remote}"
