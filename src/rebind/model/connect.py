"""The client half of a port's life (pure): will connect() to HOST:PORT get a local port now?

Spec: docs/connect-rules.md (rules C1–C26, checked on Linux 6.18). The decision procedure of
its §0.2 (TCP) and §0.3 (UDP), with the range accounting `rebind why --connect` prints:

* the effective range: ``ip_local_port_range``, narrowed by a per-socket ``IP_LOCAL_PORT_RANGE``
  (C3), minus ``ip_local_reserved_ports`` (C2);
* bind(ip, 0) before connect() without IP_BIND_ADDRESS_NO_PORT needs a port no socket of any
  state overlaps on that address (``inet_csk_find_open_port``, C13) -> EADDRINUSE from bind();
* connect()'s own choice (``__inet_hash_connect``): a port is usable when nobody uses it, or its
  bind bucket is connect-only (no socket on it got the port from bind(): C6/C7) and the 4-tuple
  is free or held by a time-wait entry ``tcp_twsk_unique`` lets it take over (C8, C9);
* a socket that already has a port (fixed port) only checks its 4-tuple (C17);
* UDP autobind shares nothing by destination (``udp_lib_get_port``, C20–C23) -> EAGAIN.

Nothing here does I/O; :mod:`rebind.kernel.connect_facts` gathers the facts.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from rebind.errors import UsageError
from rebind.model import conflict as bindmodel
from rebind.model.addr import parse_ip
from rebind.model.addr import parse_source as parse_source
from rebind.model.addr import parse_target as parse_target
from rebind.model.ephemeral import ephemeral_overlap_warning as ephemeral_overlap_warning
from rebind.model.ephemeral import format_reserved, reserve_command
from rebind.model.records import Family, IPAddress, Owner, Proto, SocketEntry, SocketRecord, State
from rebind.model.validate import parse_port

EADDRINUSE = 98
EADDRNOTAVAIL = 99
EAGAIN = 11
EINPROGRESS = 115
ERRNO_NAMES = {EADDRINUSE: "EADDRINUSE", EADDRNOTAVAIL: "EADDRNOTAVAIL", EAGAIN: "EAGAIN"}

#: TCP_TIMEWAIT_LEN (include/net/tcp.h): a time-wait entry lives 60 s from TIME_WAIT entry.
TIME_WAIT_MS = 60_000
#: The 6.14 default of net.ipv4.tcp_tw_reuse_delay (ms); before 6.14 the delay was a fixed ~1 s.
DEFAULT_TW_REUSE_DELAY_MS = 1000
DEFAULT_RANGE = (32768, 60999)

#: States of a live connection (docs/connect-rules.md "live connection"): they own a 4-tuple.
LIVE_STATES = frozenset(
    {
        State.SYN_SENT,
        State.SYN_RECV,
        State.ESTABLISHED,
        State.CLOSE_WAIT,
        State.FIN_WAIT1,
        State.FIN_WAIT2,
        State.CLOSING,
        State.LAST_ACK,
    }
)


# ---------------------------------------------------------------------------------------------
# The question


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


# ---------------------------------------------------------------------------------------------
# The facts


@dataclass(frozen=True, slots=True)
class PortHolder:
    """A socket that may matter for a local port choice.

    ``explicit``: the port came from bind() (True), from connect()'s own choice (False), or
    inet_diag cannot say (None: a client socket inside the range; connect-rules §8).
    ``timestamps``: for a time-wait entry, whether the old connection used TCP timestamps
    (not exported by inet_diag: None = assume the namespace's ``tcp_timestamps``).

    Per-socket kernel facts, when a reader (the BPF socket iterator) has them; None = unknown:

    * ``bind_port_locked``: ``sk_userlocks & SOCK_BINDPORT_LOCK``, set by a bind() with a non-zero
      port (__inet_bind). True proves bind(); False does *not* prove connect(): bind(ip, 0),
      listen()'s autobind and accepted children leave it clear.
    * ``connect_bind``: ``sk_userlocks & SOCK_CONNECT_BIND`` (tw_connect_bind for a time-wait
      entry), 6.18+ only: True = connect()'s own choice, False = the port came from bind() in some
      form. Leave it None on older kernels, where the flag does not exist.
    * ``bucket_connect_only``: the port's bind bucket has ``fastreuse < 0 and fastreuseport < 0``
      -- the very test __inet_hash_connect makes (C6) -- so it decides for every socket on the
      port, on any kernel.

    Unknown origin never makes the answer optimistic: see :attr:`port_from_bind` and
    ``PortUse.UNKNOWN_ORIGIN``.
    """

    entry: SocketEntry
    explicit: bool | None = None
    timestamps: bool | None = None
    reuseaddr: bool | None = None
    reuseport: bool | None = None
    bind_port_locked: bool | None = None
    connect_bind: bool | None = None
    bucket_connect_only: bool | None = None

    @property
    def socket(self) -> SocketRecord:
        return self.entry.socket

    @property
    def port_from_bind(self) -> bool | None:
        """Did bind() give this socket its port (its bucket is then not connect-only, C6)?
        Kernel facts first, then the table's inference; None when nothing can tell."""
        if self.bucket_connect_only is not None:
            return not self.bucket_connect_only
        if self.connect_bind is not None:
            return not self.connect_bind
        if self.bind_port_locked:
            return True
        return self.explicit


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    """The per-netns sysctls of the client side (all per network namespace)."""

    port_range: tuple[int, int] = DEFAULT_RANGE
    reserved: frozenset[int] = field(default_factory=frozenset)
    tw_reuse: int = 2
    tw_reuse_delay_ms: int = DEFAULT_TW_REUSE_DELAY_MS
    tcp_timestamps: int = 1
    autobind_reuse: bool = False
    kernel_version: tuple[int, int] = (6, 18)
    #: net.ipv4.ip_unprivileged_port_start: ip_local_port_range's low end may not go below it
    #: (ipv4_local_port_range() refuses the write with EINVAL).
    unprivileged_port_start: int = 1024


# ---------------------------------------------------------------------------------------------
# The answer


class Verdict(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    #: Depends on hidden kernel state (odd-sized range, C1) or on an unreadable fact.
    MAY_FAIL = "may-fail"


class Stage(enum.StrEnum):
    BIND = "bind"
    CONNECT = "connect"


class PortUse(enum.StrEnum):
    """Why a port of the range is, or is not, usable for this connect()."""

    FREE = "free"  # no socket on the port
    #: TIME_WAIT to this destination whose takeover hinges on its unread TCP timestamps: counted
    #: as not usable (the worst case).
    TIME_WAIT_UNKNOWN = "time-wait-unknown"
    SHARED = "shared"  # connect-only bucket, 4-tuple free: usable
    TIME_WAIT_REUSABLE = "time-wait-reusable"  # usable: tcp_twsk_unique takes the entry over
    RESERVED = "reserved"
    LISTENER = "listener"
    BOUND_INACTIVE = "bound-inactive"
    BIND_BEFORE_CONNECT = "bind-before-connect"  # a client that bound its port (explicit)
    IN_USE_TO_DESTINATION = "in-use-to-destination"
    TIME_WAIT_TO_DESTINATION = "time-wait-to-destination"
    #: bind(ip, 0) / UDP autobind: some socket on the port overlaps the address.
    OVERLAPPING_OWNER = "overlapping-owner"
    #: Usable only if a client socket on it got its port from connect(), which nothing here can
    #: tell (connect-rules §8): counted as not usable, the worst case.
    UNKNOWN_ORIGIN = "unknown-origin"

    @property
    def usable(self) -> bool:
        return self in (PortUse.FREE, PortUse.SHARED, PortUse.TIME_WAIT_REUSABLE)

    @property
    def by_bind(self) -> bool:
        return self in (PortUse.LISTENER, PortUse.BOUND_INACTIVE, PortUse.BIND_BEFORE_CONNECT)


@dataclass(frozen=True, slots=True)
class TimeWaitInfo:
    """A time-wait entry with this request's 4-tuple and whether connect() can take it over."""

    holder: PortHolder
    left_ms: int | None
    #: None: it depends on the entry's own TCP timestamps, which nobody could read.
    reusable: bool | None
    why: str


@dataclass(frozen=True, slots=True)
class Accounting:
    """Where the range went, port by port (each port counted once, under its first reason)."""

    total: int
    usable: int
    counts: dict[str, int]
    #: connect()'s parity half (C10): usable ports with lo's parity / all of them.
    first_half_usable: int
    first_half_total: int
    #: Client sockets in the range whose port origin inet_diag cannot show.
    ambiguous: int = 0
    #: ``usable`` is already the worst case (every ambiguous socket bound its port); this is the
    #: count if every one of them had its port from connect() instead (None: no ambiguity).
    usable_best: int | None = None

    @property
    def usable_worst(self) -> int | None:
        """The worst case, which ``usable`` is (kept for the JSON key)."""
        return self.usable if self.ambiguous else None


@dataclass(frozen=True, slots=True)
class Consumer:
    """A process holding ports of the range, ranked by how many."""

    pid: int
    name: str
    user: str | None
    cmdline: tuple[str, ...]
    to_destination: int
    by_bind: int
    other: int
    #: systemd unit or container, where another part of rebind can tell (not filled here).
    unit: str | None = None

    @property
    def total(self) -> int:
        return self.to_destination + self.by_bind + self.other


@dataclass(frozen=True, slots=True)
class Capacity:
    usable_for_destination: int
    time_wait_seconds: float
    #: Sustainable new connections per second to this destination (ports / TIME_WAIT length).
    sustainable_per_s: float
    #: Closes to this destination per second over the last minute (TIME_WAIT entries / 60 s).
    observed_per_s: float | None
    slow_path: bool
    used_fraction_first_half: float
    note: str


@dataclass(frozen=True, slots=True)
class Fix:
    title: str
    why: str
    python: str | None = None
    c: str | None = None
    command: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectOutcome:
    verdict: Verdict
    errno: int | None
    stage: Stage | None
    explanation: str
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    @property
    def errno_name(self) -> str | None:
        return ERRNO_NAMES.get(self.errno) if self.errno is not None else None


@dataclass(frozen=True, slots=True)
class ConnectResult:
    request: ConnectRequest
    settings: ConnectSettings
    effective_range: tuple[int, int]
    outcome: ConnectOutcome
    accounting: Accounting
    time_waits: tuple[TimeWaitInfo, ...]
    consumers: tuple[Consumer, ...]
    capacity: Capacity | None
    fixes: tuple[Fix, ...]
    headline: str


# ---------------------------------------------------------------------------------------------
# Helpers


def effective_range(settings: ConnectSettings, per_socket: tuple[int, int] | None) -> tuple[int, int]:
    """inet_sk_get_local_port_range (C3): each non-zero per-socket bound inside the range wins."""
    lo, hi = settings.port_range
    if per_socket is None:
        return lo, hi
    plo, phi = per_socket
    nlo = plo if plo and lo <= plo <= hi else lo
    nhi = phi if phi and lo <= phi <= hi else hi
    if nlo > nhi:  # each bound is checked alone; crossed bounds fall back to the netns range
        return lo, hi
    return nlo, nhi


def _norm(a: IPAddress) -> IPAddress:
    if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def is_loopback(a: IPAddress) -> bool:
    return _norm(a).is_loopback


def _tuple_family(r: SocketRecord) -> int:
    """4 for an IPv4 4-tuple (v4-mapped IPv6 sockets included, C24), 6 otherwise."""
    return _norm(r.local.addr).version


def _same_tuple(r: SocketRecord, src: IPAddress, dst: IPAddress, dport: int) -> bool:
    # C25: a device-pinned socket matches only a new socket pinned to the same device (ours is not).
    if r.ifindex:
        return False
    return (
        r.remote.port == dport
        and _norm(r.remote.addr) == dst
        and _norm(r.local.addr) == src
        and _tuple_family(r) == dst.version
    )


def tw_left_ms(r: SocketRecord) -> int | None:
    return r.expires_ms if r.is_mini else None


def tw_reuse_check(
    h: PortHolder, settings: ConnectSettings, *, explicit_port: bool = False
) -> tuple[bool | None, str]:
    """tcp_twsk_unique: may connect() take over this time-wait entry with the same 4-tuple?
    None when it depends on whether the entry carries TCP timestamps and nobody could read that:
    the entry keeps the old connection's own (tw_ts_recent_stamp), whatever tcp_timestamps says
    now, so the sysctl is no evidence (issue 17).

    ``explicit_port``: the new socket already has its port (C17): only timestamps count.
    """
    if h.timestamps is None:
        yes, why = _tw_reuse(h, settings, explicit_port, ts=True)
        no, _ = _tw_reuse(h, settings, explicit_port, ts=False)
        if yes == no:
            return yes, why
        return None, (
            "only if the old connection used TCP timestamps, which the socket table does not show "
            f"(the entry keeps its own; tcp_timestamps={settings.tcp_timestamps} now is no evidence)"
        )
    return _tw_reuse(h, settings, explicit_port, ts=h.timestamps)


def _tw_reuse(h: PortHolder, settings: ConnectSettings, explicit_port: bool, *, ts: bool) -> tuple[bool, str]:
    r = h.socket
    ts_word = ""
    if explicit_port:
        if ts:
            return True, f"a socket with its own port takes a time-wait entry with timestamps over{ts_word}"
        return False, "the time-wait entry has no TCP timestamps, so even a bound socket cannot take it over"
    if r.state is State.FIN_WAIT2:
        return False, "an orphaned FIN_WAIT2 is never taken over by connect()'s own choice (C9)"
    if settings.tw_reuse == 0:
        return False, "tcp_tw_reuse=0"
    if settings.tw_reuse == 2 and not (is_loopback(r.local.addr) or is_loopback(r.remote.addr)):
        return False, "tcp_tw_reuse=2 reuses loopback connections only"
    if not ts:
        return False, "the connection did not use TCP timestamps"
    left = r.expires_ms
    delay = settings.tw_reuse_delay_ms if settings.kernel_version >= (6, 14) else 1000
    if left is not None:
        age = TIME_WAIT_MS - left
        if age <= delay:
            return False, f"only {age} ms old; tcp_tw_reuse_delay is {delay} ms"
    return True, f"tcp_tw_reuse={settings.tw_reuse}, timestamps{ts_word}, older than {delay} ms"


def _explicit_kind(h: PortHolder) -> PortUse:
    st = h.socket.state
    if st is State.LISTEN:
        return PortUse.LISTENER
    if st is State.BOUND_INACTIVE:
        return PortUse.BOUND_INACTIVE
    return PortUse.BIND_BEFORE_CONNECT


def _is_explicit(h: PortHolder, assume_ambiguous: bool) -> bool:
    if h.socket.state in (State.LISTEN, State.BOUND_INACTIVE):
        return True
    known = h.port_from_bind
    return known if known is not None else assume_ambiguous


# inet_rcv_saddr_equal() as the kernel runs it for a port choice. What it compares is the socket's
# (sk_v6_rcv_saddr, sk_rcv_saddr, ipv6only); an IPv6 socket on a specific non-mapped address has
# sk_rcv_saddr = LOOPBACK4_IPV6 (127.0.0.6), and ipv6only forced on only when it bind()s that
# address (__inet6_bind) -- an IPv6 client whose source came from connect() keeps ipv6only = 0 and
# so overlaps an IPv4 wildcard (the J8 experiment: dual-stack UDP clients block IPv4 autobinds).
_LOOPBACK4_IPV6 = 0x7F000006


@dataclass(frozen=True, slots=True)
class _KAddr:
    v6: IPv6Address | None
    v4: int
    ipv6only: bool


def _kaddr(a: IPAddress, ipv6only: bool) -> _KAddr:
    if isinstance(a, IPv4Address):
        return _KAddr(None, int(a), False)
    if a.ipv4_mapped is not None:
        return _KAddr(a, int(a.ipv4_mapped), False)
    if a.is_unspecified:
        return _KAddr(a, 0, ipv6only)
    return _KAddr(a, _LOOPBACK4_IPV6, ipv6only)


def _holder_kaddr(h: PortHolder) -> _KAddr:
    r = h.socket
    if r.v6only is not None:
        v6only = r.v6only
    else:
        # Unknown (inet_diag reports it for LISTEN/CLOSE only): a specific address that was
        # bind()-ed forces it on; one chosen by connect() (or a child's) leaves it off.
        connected = r.remote.port != 0
        v6only = not r.local.addr.is_unspecified and not (connected and h.explicit is not True)
    return _kaddr(r.local.addr, v6only)


def _v4_equal(a1: int, a2: int, sk2_ipv6only: bool) -> bool:
    """ipv4_rcv_saddr_equal() with both wildcards matching."""
    if sk2_ipv6only:
        return False
    return a1 == a2 or a1 == 0 or a2 == 0


def _saddr_equal(sk1: _KAddr, sk2: _KAddr) -> bool:
    """inet_rcv_saddr_equal(sk1, sk2, true): dispatch on sk1's family (ipv6_rcv_saddr_equal)."""
    if sk1.v6 is None:
        return _v4_equal(sk1.v4, sk2.v4, sk2.ipv6only)

    def kind(a: IPv6Address | None) -> str:
        if a is None or a.ipv4_mapped is not None:
            return "mapped"
        return "any" if a.is_unspecified else "other"

    t1, t2 = kind(sk1.v6), kind(sk2.v6)
    if t1 == t2 == "mapped":
        return _v4_equal(sk1.v4, sk2.v4, sk2.ipv6only)
    if t1 == t2 == "any":
        return True
    if t2 == "any" and not (sk2.ipv6only and t1 == "mapped"):
        return True
    if t1 == "any" and not (sk1.ipv6only and t2 == "mapped"):
        return True
    return sk2.v6 is not None and sk1.v6 == sk2.v6


def _addr_overlap(new: IPAddress, new_v6only: bool, h: PortHolder) -> bool:
    # The new socket: bind() on a specific IPv6 address forces ipv6only; [::] keeps the default 0.
    n = _kaddr(new, new_v6only or (new.version == 6 and not new.is_unspecified and new.ipv4_mapped is None))
    return _saddr_equal(n, _holder_kaddr(h))


# ---------------------------------------------------------------------------------------------
# Per-port classification


class PortMap:
    """How each port of [lo, hi] stands; ports not set are FREE. Only ports that some socket uses
    (or that are reserved) are stored, so a 28,232-port range costs nothing to account for."""

    __slots__ = ("hi", "lo", "special")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.special: dict[int, PortUse] = {}

    def __setitem__(self, port: int, use: PortUse) -> None:
        if use is PortUse.FREE:
            self.special.pop(port, None)
        else:
            self.special[port] = use

    def get(self, port: int) -> PortUse:
        return self.special.get(port, PortUse.FREE)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    @property
    def total(self) -> int:
        return self.hi - self.lo + 1

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for u in self.special.values():
            out[u.value] += 1
        free = self.total - len(self.special)
        if free:
            out[PortUse.FREE.value] += free
        return dict(out)

    def usable_count(self, *, parity_of_lo: bool = False) -> int:
        if parity_of_lo:
            n = (self.total + 1) // 2
            bad = sum(1 for p, u in self.special.items() if not u.usable and (p - self.lo) % 2 == 0)
        else:
            n = self.total
            bad = sum(1 for u in self.special.values() if not u.usable)
        return n - bad

    def count(self, use: PortUse, *, parity_of_lo: bool = False) -> int:
        if use is PortUse.FREE:
            n = (self.total + 1) // 2 if parity_of_lo else self.total
            return n - sum(1 for p in self.special if not parity_of_lo or (p - self.lo) % 2 == 0)
        return sum(
            1 for p, u in self.special.items() if u is use and (not parity_of_lo or (p - self.lo) % 2 == 0)
        )

    def usable_ports(self, limit: int = 3) -> list[int]:
        """A few usable ports, for messages."""
        out = []
        for p in range(self.lo, self.hi + 1):
            if self.get(p).usable:
                out.append(p)
                if len(out) >= limit:
                    break
        return out

    def interior_usable(self) -> bool:
        interior = max(self.total - 2, 0)
        bad = sum(1 for p, u in self.special.items() if not u.usable and self.lo < p < self.hi)
        return interior - bad > 0


def _classify_own_choice(
    req: ConnectRequest,
    src: IPAddress,
    on_port: Sequence[PortHolder],
    settings: ConnectSettings,
    assume_ambiguous: bool,
) -> tuple[PortUse, PortHolder | None]:
    """__inet_hash_connect for one candidate (C4–C9)."""
    if not on_port:
        return PortUse.FREE, None
    explicit = [h for h in on_port if _is_explicit(h, assume_ambiguous)]
    if explicit:
        kinds = sorted({_explicit_kind(h) for h in explicit}, key=list(PortUse).index)
        return kinds[0], next(h for h in explicit if _explicit_kind(h) is kinds[0])
    tw_hit: PortHolder | None = None
    for h in on_port:
        r = h.socket
        if not _same_tuple(r, src, req.dst, req.dport):
            continue
        if r.is_mini:
            tw_hit = h
            continue
        if r.state in LIVE_STATES:
            return PortUse.IN_USE_TO_DESTINATION, h
    if tw_hit is not None:
        ok, _ = tw_reuse_check(tw_hit, settings)
        if ok is None:
            return PortUse.TIME_WAIT_UNKNOWN, tw_hit
        return (PortUse.TIME_WAIT_REUSABLE if ok else PortUse.TIME_WAIT_TO_DESTINATION), tw_hit
    return PortUse.SHARED, None


def _classify_bind_any(
    new: IPAddress, new_v6only: bool, on_port: Sequence[PortHolder]
) -> tuple[PortUse, PortHolder | None]:
    """inet_csk_find_open_port's strict pass (C13): no overlapping owner of any state."""
    for h in on_port:
        if _addr_overlap(new, new_v6only, h):
            use = _explicit_kind(h) if _is_explicit(h, False) else PortUse.OVERLAPPING_OWNER
            return use, h
    return PortUse.FREE, None


def _udp_shares(req: ConnectRequest, h: PortHolder) -> bool:
    # C23: both SO_REUSEADDR (an unknown flag counts as off). SO_REUSEPORT sharing needs the
    # new socket to set it too, which `why --connect` does not offer.
    return bool(req.reuseaddr and h.reuseaddr)


def _classify_udp(
    req: ConnectRequest, new: IPAddress, on_port: Sequence[PortHolder], uid: int
) -> tuple[PortUse, PortHolder | None]:
    """udp_lib_get_port(sk, 0) for one candidate (C20–C23)."""
    for h in on_port:
        if h.socket.ifindex:
            continue  # a device-bound UDP socket does not overlap an unbound one... unless same dev
        if _addr_overlap(new, False, h) and not _udp_shares(req, h):
            return PortUse.OVERLAPPING_OWNER, h
    return PortUse.FREE, None


# ---------------------------------------------------------------------------------------------
# The evaluation


def _source_problem(
    req: ConnectRequest, bind_settings: bindmodel.KernelSettings | None
) -> ConnectOutcome | None:
    """A bound source address must be local: __inet_bind / __inet6_bind refuse any other with
    EADDRNOTAVAIL before a port is looked at (inet_addr_valid_or_nonlocal: RTN_LOCAL, unless
    IP_FREEBIND / IP_TRANSPARENT / ip_nonlocal_bind; connect-rules §0.1). The bind() model's own
    check, so both answers are one (port 0: only the address and privilege checks run)."""
    if bind_settings is None or req.src is None or req.src.is_unspecified:
        return None
    if req.local_port is None and not req.bind_before_connect:
        return None
    breq = bindmodel.BindRequest(proto=req.proto, addr=req.src, port=0, reuseaddr=req.reuseaddr, listen=False)
    bo = bindmodel.evaluate(breq, (), bind_settings)
    if bo.verdict is bindmodel.Verdict.OK or bo.errno != EADDRNOTAVAIL:
        return None
    why = bo.blockers[0].reason if bo.blockers else f"{req.src} is not an address of this host"
    return ConnectOutcome(
        Verdict.FAIL,
        EADDRNOTAVAIL,
        Stage.BIND,
        f'bind({req.src}, {req.local_port or 0}) fails with EADDRNOTAVAIL ("Cannot assign requested '
        f'address") before connect() is reached: {why}. Use an address of this namespace, or set '
        "IP_FREEBIND (or net.ipv4.ip_nonlocal_bind=1) if it is meant to appear later.",
    )


def connect_source(req: ConnectRequest) -> IPAddress:
    if req.src is None or req.src.is_unspecified:
        # The route's source is the gatherer's job; without one, the loopback of the family.
        if req.src is not None and req.src.is_unspecified:
            return req.src
        return IPv4Address("127.0.0.1") if req.dst.version == 4 else IPv6Address("::1")
    return req.src


def evaluate_connect(
    req: ConnectRequest,
    holders: Iterable[PortHolder],
    settings: ConnectSettings,
    *,
    route_src: IPAddress | None = None,
    observed_window_s: float | None = 60.0,
    uid: int = 0,
    bind_settings: bindmodel.KernelSettings | None = None,
    servers: frozenset[int] | None = None,
) -> ConnectResult:
    """Predict the outcome of ``req`` now, with the range accounting and ranked fixes.

    ``holders``: TCP (or UDP, for ``req.proto`` UDP) sockets in the namespace whose local port
    lies in the effective range — at least every socket to the destination and every socket
    holding its port by bind() — plus, for a fixed local port, every socket on that port.
    ``route_src``: the address the route picks when the request binds no specific address.
    ``bind_settings``: the netns's bind() facts (local addresses, ip_nonlocal_bind): with them a
    source address is checked as __inet_bind does (EADDRNOTAVAIL unless local); None skips it.
    ``servers``: ports that servers of this netns hold (TCP listening or bound-inactive sockets,
    unconnected UDP sockets outside the range) -- a widened range must not take them in, and
    the printed fix reserves those inside the range; None (unknown): no widening is proposed.
    """
    hs = [h for h in holders if h.socket.proto is req.proto]
    lo, hi = effective_range(settings, req.port_range)
    bound_addr = req.src if req.src is not None else None
    src = _norm(bound_addr) if bound_addr is not None and not bound_addr.is_unspecified else None
    if src is None:
        src = _norm(route_src) if route_src is not None else connect_source(req)
        if src.is_unspecified:
            src = connect_source(replace(req, src=None))
    by_port: dict[int, list[PortHolder]] = defaultdict(list)
    for h in hs:
        by_port[h.socket.local.port].append(h)

    bad_src = _source_problem(req, bind_settings)
    if bad_src is not None:
        outcome, uses = bad_src, _uses_own_choice(req, by_port, settings, lo, hi, src)
    elif req.proto is Proto.UDP:
        outcome, uses = _udp(req, by_port, settings, lo, hi, src, uid)
    elif req.local_port is not None:
        outcome, uses = _fixed_port(req, by_port, settings, lo, hi, src, bind_settings)
    elif req.bind_before_connect and not req.bind_address_no_port:
        outcome, uses = _bind_any(req, by_port, settings, lo, hi, src)
    else:
        outcome, uses = _own_choice(req, by_port, settings, lo, hi, src)

    acc = _accounting(req, uses, by_port, settings, lo, hi, src)
    tws = _time_waits(req, hs, settings, src)
    consumers = _consumers(hs, uses, req, src)
    cap = None
    # UDP autobind honours IP_LOCAL_PORT_RANGE too (C3): its map is the one a slice needs.
    own: PortMap | None = uses if req.proto is Proto.UDP and req.local_port is None else None
    if req.proto is Proto.TCP:
        # Capacity is about this destination's 4-tuple space: connect()'s own choice, whatever
        # the request does before connect(). So is the per-socket range fix (a plain connect()).
        own = uses
        if not req.own_choice:
            own = _uses_own_choice(req, by_port, settings, lo, hi, src)
        cap = _capacity(
            req, _accounting(req, own, by_port, settings, lo, hi, src), tws, settings, observed_window_s
        )
    fixes = (
        ()
        if bad_src is not None
        else tuple(rank_fixes(req, outcome, acc, tws, settings, (lo, hi), uses=own, src=src, servers=servers))
    )
    head = _headline(req, outcome, acc, (lo, hi))
    return ConnectResult(
        request=replace(req, src=req.src if req.src is not None else src),
        settings=settings,
        effective_range=(lo, hi),
        outcome=outcome,
        accounting=acc,
        time_waits=tuple(tws),
        consumers=tuple(consumers),
        capacity=cap,
        fixes=fixes,
        headline=head,
    )


def _uses_own_choice(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    assume_ambiguous: bool | None = None,
) -> PortMap:
    """Each port as connect()'s own choice sees it. ``assume_ambiguous`` None: the answer the
    model can stand by -- a port usable only if an ambiguous socket got it from connect() is
    UNKNOWN_ORIGIN (not usable); True/False: assume every ambiguous socket bound / did not."""
    uses = PortMap(lo, hi)
    for p in _special_ports(by_port, settings, lo, hi):
        if p in settings.reserved:
            uses[p] = PortUse.RESERVED
            continue
        on = by_port.get(p, ())
        if assume_ambiguous is not None:
            uses[p] = _classify_own_choice(req, src, on, settings, assume_ambiguous)[0]
            continue
        best = _classify_own_choice(req, src, on, settings, False)[0]
        if best.usable and not _classify_own_choice(req, src, on, settings, True)[0].usable:
            best = PortUse.UNKNOWN_ORIGIN
        uses[p] = best
    return uses


def _special_ports(
    by_port: dict[int, list[PortHolder]], settings: ConnectSettings, lo: int, hi: int
) -> list[int]:
    """Ports of [lo, hi] that are reserved or used by some socket; every other one is free."""
    return sorted({p for p in by_port if lo <= p <= hi} | {p for p in settings.reserved if lo <= p <= hi})


def _odd_reach(req: ConnectRequest, uses: PortMap, *, connect: bool) -> bool | None:
    """C1: with an odd count one end is out of reach in each call. True: fine; None: may fail."""
    if uses.total % 2 == 0 or uses.total == 1:
        return True
    if connect and req.port_range is not None:
        return True  # __inet_hash_connect walks the whole per-socket range (6.8+)
    if uses.interior_usable() or (uses.get(uses.lo).usable and uses.get(uses.hi).usable):
        return True
    return None


def _own_choice(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
) -> tuple[ConnectOutcome, PortMap]:
    uses = _uses_own_choice(req, by_port, settings, lo, hi, src)
    usable = uses.usable_count()
    unknown = uses.count(PortUse.UNKNOWN_ORIGIN)
    unknown_ts = uses.count(PortUse.TIME_WAIT_UNKNOWN)
    if not usable and unknown_ts and not unknown:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                f"connect() may fail with EADDRNOTAVAIL: no port of {lo}-{hi} is surely usable. "
                f"{unknown_ts} port(s) carry a TIME_WAIT of this 4-tuple that connect() takes over only "
                "if the old connection used TCP timestamps (tcp_twsk_unique), which the socket table "
                "does not show: the worst case says no.",
            ),
            uses,
        )
    if not usable and unknown:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                f"connect() may fail with EADDRNOTAVAIL: no port of {lo}-{hi} is surely usable. "
                f"{unknown} port(s) are held by client sockets that inet_diag cannot place: if they "
                "got their ports from bind(), as the worst case assumes, connect() cannot use them "
                "(__inet_hash_connect skips a bucket that is not connect-only, C6); only if connect() "
                "chose them would they be shared.",
            ),
            uses,
        )
    if not usable:
        return (
            ConnectOutcome(
                Verdict.FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                'connect() fails with EADDRNOTAVAIL ("Cannot assign requested address"): no port of '
                f"{lo}-{hi} is usable for {fmt_endpoint(src, 0)[:-2]} → {fmt_endpoint(req.dst, req.dport)} "
                "— each one is reserved, held by a socket that got it from bind(), or already carries "
                "this 4-tuple (__inet_hash_connect).",
            ),
            uses,
        )
    if _odd_reach(req, uses, connect=True) is None:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                f"only {', '.join(map(str, uses.usable_ports()))} is usable, at an end of an odd-sized "
                "range: each "
                "connect() reaches only count-1 ports, chosen by a hidden offset (C1) — it may fail.",
            ),
            uses,
        )
    return ConnectOutcome(Verdict.OK, None, None, f"connect() gets a local port: {usable} usable"), uses


def _bind_any(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
) -> tuple[ConnectOutcome, PortMap]:
    new = req.src if req.src is not None else src
    new_v6only = False
    uses = PortMap(lo, hi)
    for p in _special_ports(by_port, settings, lo, hi):
        if p in settings.reserved:
            uses[p] = PortUse.RESERVED
            continue
        uses[p] = _classify_bind_any(new, new_v6only, by_port.get(p, ()))[0]
    usable = uses.usable_count()
    notes: tuple[str, ...] = ()
    if not usable:
        if settings.autobind_reuse and req.reuseaddr:
            notes = ("ip_autobind_reuse=1 with SO_REUSEADDR: a second pass may share a port (C16)",)
            return (
                ConnectOutcome(
                    Verdict.MAY_FAIL,
                    EADDRINUSE,
                    Stage.BIND,
                    "bind(ip, 0) finds no wholly unused port; ip_autobind_reuse may let it share one "
                    "whose owners all set SO_REUSEADDR, then connect() checks the 4-tuple (C16).",
                    notes,
                ),
                uses,
            )
        return (
            ConnectOutcome(
                Verdict.FAIL,
                EADDRINUSE,
                Stage.BIND,
                f'bind({new}, 0) fails with EADDRINUSE ("Address already in use") before connect() is '
                f"reached: bind-before-connect needs a port of {lo}-{hi} that no socket uses on that "
                "address, whatever its destination (inet_csk_find_open_port) — connections to other "
                "servers count too. Set IP_BIND_ADDRESS_NO_PORT before bind().",
            ),
            uses,
        )
    if _odd_reach(req, uses, connect=False) is None:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRINUSE,
                Stage.BIND,
                "only a port at an end of an odd-sized range is free: bind(ip, 0) may not reach it (C1).",
            ),
            uses,
        )
    return (
        ConnectOutcome(
            Verdict.OK,
            None,
            None,
            f"bind(ip, 0) finds a wholly unused port ({usable} left), and connect() then uses it",
        ),
        uses,
    )


def _fixed_port(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    bind_settings: bindmodel.KernelSettings | None = None,
) -> tuple[ConnectOutcome, PortMap]:
    assert req.local_port is not None
    port = req.local_port
    on = by_port.get(port, [])
    bind_addr = req.src if req.src is not None else src
    breq = bindmodel.BindRequest(
        proto=Proto.TCP, addr=bind_addr, port=port, reuseaddr=req.reuseaddr, uid=0, listen=False
    )
    holders = [
        bindmodel.Holder(h.socket, bindmodel.SockOpts(reuseaddr=h.reuseaddr, reuseport=h.reuseport))
        for h in on
    ]
    # The client's capabilities are not ours to know: a port below ip_unprivileged_port_start is
    # not what this question is about. Addresses: _source_problem checked them already.
    bsettings = bindmodel.KernelSettings(local_addresses=None, cap_net_bind_service=True)
    bo = bindmodel.evaluate(breq, holders, bsettings)
    uses = _uses_own_choice(req, by_port, settings, lo, hi, src)
    if bo.verdict is not bindmodel.Verdict.OK:
        why = bo.blockers[0].reason if bo.blockers else "another socket holds it"
        verdict = Verdict.FAIL if bo.verdict is bindmodel.Verdict.FAIL else Verdict.MAY_FAIL
        return (
            ConnectOutcome(
                verdict,
                EADDRINUSE,
                Stage.BIND,
                f"bind({fmt_endpoint(bind_addr, port)}) fails with EADDRINUSE: {why}. A client that binds a "
                "fixed port blocks itself and everyone else; no kernel setting fixes this design (C19).",
                bo.notes,
            ),
            uses,
        )
    for h in on:
        r = h.socket
        if not _same_tuple(r, src, req.dst, req.dport):
            continue
        if r.state in LIVE_STATES and not r.is_mini:
            return (
                ConnectOutcome(
                    Verdict.FAIL,
                    EADDRNOTAVAIL,
                    Stage.CONNECT,
                    f"bind() works (SO_REUSEADDR), but connect() fails with EADDRNOTAVAIL: "
                    f"{fmt_endpoint(src, port)} → {fmt_endpoint(req.dst, req.dport)} is already a live "
                    "connection (same 4-tuple, C17/C19). Fixed-port SO_REUSEADDR clients block each other.",
                ),
                uses,
            )
        if r.is_mini:
            ok, why = tw_reuse_check(h, settings, explicit_port=True)
            if ok is None:
                return (
                    ConnectOutcome(
                        Verdict.MAY_FAIL,
                        EADDRNOTAVAIL,
                        Stage.CONNECT,
                        "connect() may fail with EADDRNOTAVAIL: the old connection's time-wait entry holds "
                        f"the same 4-tuple, and it is taken over {why} (C17).",
                    ),
                    uses,
                )
            if not ok:
                return (
                    ConnectOutcome(
                        Verdict.FAIL,
                        EADDRNOTAVAIL,
                        Stage.CONNECT,
                        f"connect() fails with EADDRNOTAVAIL: the old connection's time-wait entry holds "
                        f"the same 4-tuple and {why} (C17).",
                    ),
                    uses,
                )
    return ConnectOutcome(Verdict.OK, None, None, f"bind() to port {port} and connect() both work"), uses


def _udp(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    uid: int,
) -> tuple[ConnectOutcome, PortMap]:
    if req.local_port is not None:
        bind_addr = (
            req.src
            if req.src is not None
            else (IPv4Address("0.0.0.0") if req.dst.version == 4 else IPv6Address("::"))
        )
        breq = bindmodel.BindRequest(
            proto=Proto.UDP,
            addr=bind_addr,
            port=req.local_port,
            reuseaddr=req.reuseaddr,
            uid=uid,
            listen=False,
        )
        holders = [
            bindmodel.Holder(h.socket, bindmodel.SockOpts(reuseaddr=h.reuseaddr, reuseport=h.reuseport))
            for h in by_port.get(req.local_port, [])
        ]
        bsettings = bindmodel.KernelSettings(local_addresses=None)
        bo = bindmodel.evaluate(breq, bindmodel.udp_chain_order(holders), bsettings)
        if bo.verdict is not bindmodel.Verdict.OK:
            return (
                ConnectOutcome(
                    Verdict.FAIL if bo.verdict is bindmodel.Verdict.FAIL else Verdict.MAY_FAIL,
                    EADDRINUSE,
                    Stage.BIND,
                    f"bind() of UDP port {req.local_port} fails with EADDRINUSE",
                ),
                PortMap(lo, hi),
            )
        return ConnectOutcome(Verdict.OK, None, None, "bind() and connect() work (UDP)"), PortMap(lo, hi)
    # The autobind address is the wildcard, or the bound address with IP_BIND_ADDRESS_NO_PORT (C22).
    wildcard = IPv4Address("0.0.0.0") if req.dst.version == 4 else IPv6Address("::")
    new = req.src if req.bind_before_connect and req.src is not None else wildcard
    uses = PortMap(lo, hi)
    for p in _special_ports(by_port, settings, lo, hi):
        if p in settings.reserved:
            uses[p] = PortUse.RESERVED
            continue
        uses[p] = _classify_udp(req, new, by_port.get(p, ()), uid)[0]
    usable = uses.usable_count()
    plain_bind = req.bind_before_connect and not req.bind_address_no_port
    if not usable:
        err, stage = (EADDRINUSE, Stage.BIND) if plain_bind else (EAGAIN, Stage.CONNECT)
        call = "bind(ip, 0)" if plain_bind else "connect()/sendto()"
        return (
            ConnectOutcome(
                Verdict.FAIL,
                err,
                stage,
                f"{call} fails with {ERRNO_NAMES[err]}: every UDP port of {lo}-{hi} is held on an "
                "overlapping address — UDP shares nothing by destination (udp_lib_get_port, C20/C21).",
            ),
            uses,
        )
    return ConnectOutcome(Verdict.OK, None, None, f"UDP autobind finds a port ({usable} free)"), uses


# ---------------------------------------------------------------------------------------------
# Accounting, consumers, capacity


def _accounting(
    req: ConnectRequest,
    uses: PortMap,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
) -> Accounting:
    counts = uses.counts()
    usable = uses.usable_count()
    half = req.port_range is None
    half_usable = uses.usable_count(parity_of_lo=half)
    half_total = (uses.total + 1) // 2 if half else uses.total
    half_total -= uses.count(PortUse.RESERVED, parity_of_lo=half)
    ambiguous = (
        0
        if req.proto is Proto.UDP
        else sum(
            1
            for p, hs in by_port.items()
            if lo <= p <= hi
            for h in hs
            if h.port_from_bind is None and h.socket.state not in (State.LISTEN, State.BOUND_INACTIVE)
        )
    )
    best: int | None = None
    if ambiguous and req.proto is Proto.TCP and req.own_choice and req.local_port is None:
        best = usable + uses.count(PortUse.UNKNOWN_ORIGIN) + uses.count(PortUse.TIME_WAIT_UNKNOWN)
    return Accounting(
        total=hi - lo + 1,
        usable=usable,
        counts=counts,
        first_half_usable=half_usable,
        first_half_total=half_total,
        ambiguous=ambiguous,
        usable_best=best,
    )


def _time_waits(
    req: ConnectRequest, hs: Sequence[PortHolder], settings: ConnectSettings, src: IPAddress
) -> list[TimeWaitInfo]:
    out = []
    explicit_port = req.local_port is not None or (req.bind_before_connect and not req.bind_address_no_port)
    for h in hs:
        r = h.socket
        if r.is_mini and r.remote.port == req.dport and _norm(r.remote.addr) == req.dst:
            ok, why = tw_reuse_check(h, settings, explicit_port=explicit_port)
            out.append(TimeWaitInfo(h, tw_left_ms(r), ok, why))
    out.sort(key=lambda t: t.left_ms or 0)
    return out


def _consumers(
    hs: Sequence[PortHolder], uses: PortMap, req: ConnectRequest, src: IPAddress
) -> list[Consumer]:
    ports: dict[int, dict[str, set[int]]] = defaultdict(lambda: {"dst": set(), "bind": set(), "other": set()})
    info: dict[int, Owner] = {}
    for h in hs:
        r = h.socket
        p = r.local.port
        if p not in uses:
            continue
        if r.remote.port == req.dport and _norm(r.remote.addr) == req.dst:
            kind = "dst"
        elif uses.get(p).by_bind or h.explicit:
            kind = "bind"
        else:
            kind = "other"
        for o in h.entry.owners:
            info.setdefault(o.pid, o)
            ports[o.pid][kind].add(p)
    out = [
        Consumer(
            pid=pid,
            name=info[pid].name,
            user=info[pid].user,
            cmdline=info[pid].cmdline,
            to_destination=len(k["dst"]),
            by_bind=len(k["bind"] - k["dst"]),
            other=len(k["other"] - k["dst"] - k["bind"]),
        )
        for pid, k in ports.items()
    ]
    out.sort(key=lambda c: (-c.to_destination, -c.by_bind, -c.total, c.pid))
    return out


#: connect-rules C12: what one connect() costs, measured on 6.18.
SLOW_PATH_NOTE = (
    "connect() costs 18–35 µs while a port of lo's parity is usable; once that half is used up for "
    "this 4-tuple every call first walks all of it: 0.28–0.43 ms on a 10,000-port range, 3–5 ms on "
    "the default 28,232-port range, and a failing call walks the whole range (1.2–9.6 ms) (C12)"
)


def _capacity(
    req: ConnectRequest,
    acc: Accounting,
    tws: Sequence[TimeWaitInfo],
    settings: ConnectSettings,
    window_s: float | None,
) -> Capacity:
    c = acc.counts
    live = c.get(PortUse.IN_USE_TO_DESTINATION.value, 0)
    gone = (
        PortUse.RESERVED,
        PortUse.UNKNOWN_ORIGIN,
        PortUse.TIME_WAIT_UNKNOWN,
        *(u for u in PortUse if u.by_bind),
    )
    base = acc.total - sum(c.get(u.value, 0) for u in gone)
    base = max(base - live, 0)
    # Would a future time-wait entry to this destination be taken over (C8)?
    loop = is_loopback(req.dst) or (req.src is not None and is_loopback(req.src))
    reusable = settings.tcp_timestamps != 0 and (settings.tw_reuse == 1 or (settings.tw_reuse == 2 and loop))
    delay = settings.tw_reuse_delay_ms if settings.kernel_version >= (6, 14) else 1000
    tw_s = (delay if reusable else TIME_WAIT_MS) / 1000
    observed = len(tws) / 60.0 if window_s else None
    slow = acc.first_half_usable == 0 and acc.usable > 0 and req.port_range is None and req.own_choice
    used_half = 1.0 - (acc.first_half_usable / acc.first_half_total if acc.first_half_total else 0.0)
    if slow:
        note = "on the slow path now: " + SLOW_PATH_NOTE
    elif used_half >= 0.5:
        note = f"{used_half:.0%} of connect()'s first half is used for this destination; " + SLOW_PATH_NOTE
    else:
        note = "fast path: a port of the first parity half is usable (C10)"
    return Capacity(
        usable_for_destination=base,
        time_wait_seconds=tw_s,
        sustainable_per_s=base / tw_s if tw_s else math.inf,
        observed_per_s=observed,
        slow_path=slow,
        used_fraction_first_half=used_half,
        note=note,
    )


def _headline(req: ConnectRequest, o: ConnectOutcome, acc: Accounting, rng: tuple[int, int]) -> str:
    target = fmt_endpoint(req.dst, req.dport)
    if o.stage is Stage.BIND and o.errno == EADDRNOTAVAIL:
        return f"bind() for {target} would fail with EADDRNOTAVAIL: source {req.src} is not local"
    what = f"{acc.usable} of {acc.total} ports of {rng[0]}-{rng[1]} usable"
    if acc.usable_best is not None and acc.usable_best != acc.usable:
        what += f" (worst case; {acc.usable_best} if every unplaced client port came from connect())"
    if o.verdict is Verdict.OK:
        return f"connect() to {target} would get a local port: {what}"
    if o.verdict is Verdict.MAY_FAIL:
        return f"connect() to {target} may fail with {o.errno_name}: {what}"
    call = "bind()" if o.stage is Stage.BIND else "connect()"
    return f"{call} for {target} would fail with {o.errno_name}: {what}"


# ---------------------------------------------------------------------------------------------
# Server side: ports inside the ephemeral range (C26)


# ---------------------------------------------------------------------------------------------
# Fixes


#: IP_LOCAL_PORT_RANGE (include/uapi/linux/in.h, Linux 6.3+): a u32, low port in the low 16 bits,
#: high port in the high 16 (do_ip_setsockopt); IP_BIND_ADDRESS_NO_PORT (4.2+). Printed as numbers:
#: Python's socket module and older C headers lack the names.
IP_BIND_ADDRESS_NO_PORT = 24
IP_LOCAL_PORT_RANGE = 51
#: Where a widened range aims (an even number of ports: C1); the kernel's own limits bound it.
WIDE_RANGE = (15000, 64999)


def widened_range(
    current: tuple[int, int], reserved: frozenset[int], servers: frozenset[int], unprivileged_port_start: int
) -> tuple[int, int] | None:
    """A wider ip_local_port_range that takes in no server port: it stops just short of the
    nearest unreserved server port on each side, never goes below ip_unprivileged_port_start
    (the write would be EINVAL), keeps an even port count (C1: an odd one leaves an end out of
    reach; the kernel warns "prefer different parity"). None when it cannot grow."""
    lo, hi = current
    nlo = max(min(lo, WIDE_RANGE[0]), unprivileged_port_start, 1)
    nhi = min(max(hi, WIDE_RANGE[1]), 65535)
    exposed = servers - reserved
    below = [p for p in exposed if nlo <= p < lo]
    above = [p for p in exposed if hi < p <= nhi]
    if below:
        nlo = max(below) + 1
    if above:
        nhi = min(above) - 1
    if nlo < lo and (nhi - nlo + 1) % 2:
        nlo += 1
    if nhi > hi and (nhi - nlo + 1) % 2:
        nhi -= 1
    nlo, nhi = min(nlo, lo), max(nhi, hi)
    if (nlo, nhi) == (lo, hi):
        return None
    return nlo, nhi


def _no_widening(settings: ConnectSettings, servers: frozenset[int]) -> Fix:
    """Why no wider range is proposed: the server ports that border it (no command: widening
    over them would hand them to connect())."""
    lo, hi = settings.port_range
    floor = max(min(lo, WIDE_RANGE[0]), settings.unprivileged_port_start)
    exposed = servers - settings.reserved
    below = [p for p in exposed if floor <= p < lo]
    above = [p for p in exposed if hi < p <= max(hi, WIDE_RANGE[1])]
    near = sorted(({max(below)} if below else set()) | ({min(above)} if above else set()))
    ports = ", ".join(map(str, near)) or "none"
    return Fix(
        f"No wider ephemeral range is proposed: server ports border {lo}-{hi}",
        f"unreserved server ports next to the range ({ports}) would fall into a wider one, and any "
        "connect() could take them first (C26); move those servers, or reserve their ports "
        "(ip_local_reserved_ports, keeping the ports reserved now), then widen",
    )


def _py_family(a: IPAddress) -> str:
    return "socket.AF_INET" if a.version == 4 else "socket.AF_INET6"


def _c_sockaddr(name: str, a: IPAddress, port: int) -> str:
    """A C declaration of a sockaddr for ``a`` (an ip_address: nothing to escape)."""
    if a.version == 4:
        return (
            f"struct sockaddr_in {name} = {{ .sin_family = AF_INET, .sin_port = htons({port}) }};\n"
            f'inet_pton(AF_INET, "{a}", &{name}.sin_addr);'
        )
    return (
        f"struct sockaddr_in6 {name} = {{ .sin6_family = AF_INET6, .sin6_port = htons({port}) }};\n"
        f'inet_pton(AF_INET6, "{a}", &{name}.sin6_addr);'
    )


def _slice(uses: PortMap) -> tuple[int, int] | None:
    """The half of the range with more ports usable by connect()'s own choice (``uses`` must be
    that map: the printed line is a plain connect()), for a per-socket IP_LOCAL_PORT_RANGE; None
    when neither half has one."""
    if uses.total < 4:
        return None
    mid = uses.lo + uses.total // 2
    halves = [(uses.lo, mid - 1), (mid, uses.hi)]

    def usable(h: tuple[int, int]) -> int:
        bad = sum(1 for p, u in uses.special.items() if h[0] <= p <= h[1] and not u.usable)
        return h[1] - h[0] + 1 - bad

    best = max(halves, key=usable)
    return best if usable(best) else None


def _fix_catalogue(
    req: ConnectRequest,
    settings: ConnectSettings,
    src: IPAddress,
    uses: PortMap | None,
    servers: frozenset[int] | None,
) -> dict[str, Fix]:
    """Every line here is built from this host's values and runs as printed (tests/kernel/
    test_connect_fix_lines.py): Python lines are one program for ``python3 -c``; C lines are
    statements for a function where ``int fd`` is an open socket of the destination's family and
    the request's type (<sys/socket.h>, <netinet/in.h>, <arpa/inet.h>, <stdint.h>)."""
    dst = f"({str(req.dst)!r}, {req.dport})"
    udp = req.proto is Proto.UDP
    fam = _py_family(req.dst) + (", socket.SOCK_DGRAM" if udp else "")
    psrc = repr(str(src))
    c_dst = _c_sockaddr("dst", req.dst, req.dport)
    c_connect = "connect(fd, (struct sockaddr *)&dst, sizeof dst);"
    c_no_port = (
        f"int one = 1;\nsetsockopt(fd, IPPROTO_IP, {IP_BIND_ADDRESS_NO_PORT} /* IP_BIND_ADDRESS_NO_PORT */, "
        "&one, sizeof one);"
    )
    lo, hi = settings.port_range
    out = {
        "pool": Fix(
            "Reuse sockets: one connected UDP socket per destination, kept open",
            "each UDP socket that sends holds a port of the range until it is closed, whatever its "
            "destination (C20); one long-lived socket holds one",
            python=f"import socket\ns = socket.socket({fam})\n"
            f"s.connect({dst})  # once; then s.send() every datagram to it",
            c="/* keep fd open and send every datagram on it */",
        )
        if udp
        else Fix(
            "Reuse connections: a pool with keep-alive instead of one connection per request",
            "each new connection to the same destination takes a port for its lifetime plus 60 s of "
            "TIME_WAIT when the client closes first; a pooled connection takes one port for good",
            python="import socket\n"
            f"conn = socket.create_connection({dst})  # open once, keep it open\n"
            "# ...and send every request on conn (HTTP keep-alive: requests.Session(), httpx.Client())",
            c="/* keep fd open and send the next request on it (HTTP: Connection: keep-alive) */",
        ),
        "no_port": Fix(
            "Set IP_BIND_ADDRESS_NO_PORT before bind(ip, 0)",
            "bind() then records only the address and connect() picks the port per 4-tuple, sharing ports "
            "across destinations; without it bind() needs a wholly unused port (C13, C15; Linux 4.2+)",
            python=f"import socket\ns = socket.socket({fam})\n"
            f"s.setsockopt(socket.IPPROTO_IP, {IP_BIND_ADDRESS_NO_PORT}, 1)  # IP_BIND_ADDRESS_NO_PORT\n"
            f"s.bind(({psrc}, 0))\ns.connect({dst})",
            c=f"{c_no_port}\n"
            f"{_c_sockaddr('src', src, 0)}\n"
            "bind(fd, (struct sockaddr *)&src, sizeof src);  /* port 0: connect() picks it */\n"
            f"{c_dst}\n{c_connect}",
        ),
        "no_fixed": Fix(
            "Never bind a fixed client port, with or without SO_REUSEADDR",
            "two clients on one port to the same server share a 4-tuple (EADDRNOTAVAIL), and the port is "
            "removed from every connect() in the namespace while it or its TIME_WAIT exists (C19); "
            "no kernel setting fixes it: bind port 0 with IP_BIND_ADDRESS_NO_PORT, or do not bind()",
            python=f"import socket\ns = socket.socket({fam})  # no bind(): connect() picks the port\n"
            f"s.connect({dst})",
            c=f"{c_dst}\n{c_connect}  /* no bind(): connect() picks the port */",
        ),
        "sources": Fix(
            "Spread connections over more source addresses",
            "every (source, destination, port) has its own range of 4-tuples; with "
            "IP_BIND_ADDRESS_NO_PORT, each extra source address adds a whole range for this destination",
            python="import itertools, socket\n"
            f"sources = itertools.cycle([{psrc}])  # list every local address you may use\n"
            f"s = socket.socket({fam})\n"
            f"s.setsockopt(socket.IPPROTO_IP, {IP_BIND_ADDRESS_NO_PORT}, 1)  # IP_BIND_ADDRESS_NO_PORT\n"
            f"s.bind((next(sources), 0))\ns.connect({dst})",
            c=f'static const char *sources[] = {{ "{src}" }};  /* every local address you may use */\n'
            "static unsigned next_source;\n"
            f"{c_no_port}\n"
            f"{_c_sockaddr('src', src, 0).splitlines()[0]}\n"
            f"inet_pton({'AF_INET' if src.version == 4 else 'AF_INET6'}, "
            f"sources[next_source++ % (sizeof sources / sizeof *sources)], "
            f"&src.{'sin_addr' if src.version == 4 else 'sin6_addr'});\n"
            f"bind(fd, (struct sockaddr *)&src, sizeof src);\n{c_dst}\n{c_connect}",
        ),
        "tw_reuse": Fix(
            "Let connect() take over old TIME_WAIT entries: net.ipv4.tcp_tw_reuse=1",
            "only outgoing connections, only when the old connection used TCP timestamps (PAWS protects "
            "the new one), only after tcp_tw_reuse_delay; the default 2 does it for loopback only. "
            "Caveat: it changes nothing for servers, and NAT/middleboxes that strip timestamps defeat it",
            command="sysctl -w net.ipv4.tcp_tw_reuse=1",
        ),
    }
    if (
        servers is not None
        and (
            wide := widened_range(
                settings.port_range, settings.reserved, servers, settings.unprivileged_port_start
            )
        )
        is not None
    ):
        wlo, whi = wide
        inside = sorted(p for p in servers if lo <= p <= hi and p not in settings.reserved)
        reserve = reserve_command(settings.reserved, inside)
        kept = format_reserved(settings.reserved)
        why = (
            f"the range is {lo}-{hi} ({hi - lo + 1} ports); {wlo}-{whi} ({whi - wlo + 1}) gives every "
            "destination more 4-tuples. It stops short of every server port outside the range "
            "(a connection could take one first, C26)"
        )
        if reserve:
            why += (
                f"; the first command reserves the server ports inside it ({format_reserved(inside)}), "
                f"keeping those reserved now ({kept or 'none'})"
            )
        command = f"sysctl -w net.ipv4.ip_local_port_range='{wlo} {whi}'"
        out["widen"] = Fix(
            f"Widen the ephemeral range to {wlo}-{whi}, clear of this host's server ports",
            why,
            command=f"{reserve} && {command}" if reserve else command,
        )
    elif servers is not None:
        out["widen"] = _no_widening(settings, servers)
    part = _slice(uses) if uses is not None else None
    if part is not None:
        plo, phi = part
        out["per_socket_range"] = Fix(
            f"Give busy clients their own slice of the range: IP_LOCAL_PORT_RANGE {plo}-{phi} (Linux 6.3+)",
            "a per-socket range inside the netns range keeps one client from using up everyone's ports, "
            "and since 6.8 connect() walks it without the parity split (no slow half, C3/C10)",
            python=f"import socket, struct\ns = socket.socket({fam})\n"
            f"# IP_LOCAL_PORT_RANGE ({IP_LOCAL_PORT_RANGE}): a u32, low port in bits 0-15, high in 16-31\n"
            f"s.setsockopt(socket.IPPROTO_IP, {IP_LOCAL_PORT_RANGE}, "
            f"struct.pack('=I', ({phi} << 16) | {plo}))\n"
            f"s.connect({dst})",
            c=f"uint32_t range = ({phi}u << 16) | {plo}u;  /* high << 16 | low */\n"
            f"setsockopt(fd, IPPROTO_IP, {IP_LOCAL_PORT_RANGE} /* IP_LOCAL_PORT_RANGE */, "
            "&range, sizeof range);\n"
            f"{c_dst}\n{c_connect}",
        )
    return out


def rank_fixes(
    req: ConnectRequest,
    outcome: ConnectOutcome,
    acc: Accounting,
    tws: Sequence[TimeWaitInfo],
    settings: ConnectSettings,
    rng: tuple[int, int],
    *,
    uses: PortMap | None = None,
    src: IPAddress | None = None,
    servers: frozenset[int] | None = None,
) -> list[Fix]:
    """The fixes that apply, most effective first."""
    cat = _fix_catalogue(req, settings, src if src is not None else connect_source(req), uses, servers)
    order: list[str] = []
    if req.local_port is not None:
        order.append("no_fixed")
    if req.bind_before_connect and not req.bind_address_no_port:
        order.append("no_port")
    pressure = outcome.verdict is not Verdict.OK or acc.usable < acc.total // 2 or bool(tws)
    if not pressure and not order:
        return []
    order.append("pool")
    if tws and not all(t.reusable is True for t in tws) and settings.tw_reuse != 1:
        order.append("tw_reuse")
    order += ["sources", "widen", "per_socket_range"]
    if "tw_reuse" not in order and settings.tw_reuse != 1:
        order.append("tw_reuse")
    if req.proto is Proto.UDP:
        order = [k for k in order if k != "tw_reuse"]  # UDP has no TIME_WAIT
    return [cat[k] for k in dict.fromkeys(order) if k in cat]


# ---------------------------------------------------------------------------------------------
# JSON (schema rebind.connect/1, docs/json.md)

CONNECT_SCHEMA = "rebind.connect/1"


def result_json(res: ConnectResult, *, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    from rebind.textsafe import visible

    r = res.request
    acc = res.accounting
    cap = res.capacity
    return {
        "schema": CONNECT_SCHEMA,
        "request": {
            "proto": r.proto.value,
            "destination": {"addr": str(r.dst), "port": r.dport},
            "source": str(r.src) if r.src is not None else None,
            "bind_before_connect": r.bind_before_connect,
            "bind_address_no_port": r.bind_address_no_port,
            "local_port": r.local_port,
            "reuseaddr": r.reuseaddr,
            "ip_local_port_range": list(r.port_range) if r.port_range else None,
        },
        "verdict": res.outcome.verdict.value,
        "ok": res.outcome.ok,
        "errno": res.outcome.errno_name if not res.outcome.ok else None,
        "stage": res.outcome.stage.value if res.outcome.stage and not res.outcome.ok else None,
        "headline": res.headline,
        "explanation": res.outcome.explanation,
        "notes": list(res.outcome.notes),
        "settings": {
            "ip_local_port_range": list(res.settings.port_range),
            "ip_local_reserved_ports_in_range": sum(
                1 for p in res.settings.reserved if res.effective_range[0] <= p <= res.effective_range[1]
            ),
            "tcp_tw_reuse": res.settings.tw_reuse,
            "tcp_tw_reuse_delay_ms": res.settings.tw_reuse_delay_ms,
            "tcp_timestamps": res.settings.tcp_timestamps,
            "ip_autobind_reuse": res.settings.autobind_reuse,
        },
        "range": {
            "low": res.effective_range[0],
            "high": res.effective_range[1],
            "total": acc.total,
            "usable": acc.usable,
            "by_reason": acc.counts,
            "first_half": {"usable": acc.first_half_usable, "total": acc.first_half_total},
            "ambiguous_sockets": acc.ambiguous,
            "usable_if_ambiguous_were_bound": acc.usable_worst,
            "usable_if_ambiguous_came_from_connect": acc.usable_best,
        },
        "time_wait_to_destination": [
            {
                "local": str(t.holder.socket.local),
                "state": t.holder.socket.state.label,
                "left_ms": t.left_ms,
                "reusable_now": t.reusable,
                "why": t.why,
            }
            for t in res.time_waits
        ],
        "consumers": [
            {
                "pid": c.pid,
                "name": visible(c.name),
                "user": visible(c.user) if c.user else None,
                "cmdline": [visible(a) for a in c.cmdline],
                "to_destination": c.to_destination,
                "by_bind": c.by_bind,
                "other": c.other,
                "unit": c.unit,
            }
            for c in res.consumers
        ],
        "capacity": None
        if cap is None
        else {
            "usable_for_destination": cap.usable_for_destination,
            "time_wait_seconds": cap.time_wait_seconds,
            "sustainable_per_s": round(cap.sustainable_per_s, 3),
            "observed_per_s": None if cap.observed_per_s is None else round(cap.observed_per_s, 3),
            "slow_path": cap.slow_path,
            "used_fraction_first_half": round(cap.used_fraction_first_half, 4),
            "note": cap.note,
        },
        "fixes": [
            {"title": f.title, "why": f.why, "python": f.python, "c": f.c, "command": f.command}
            for f in res.fixes
        ],
        "probe": probe,
    }
