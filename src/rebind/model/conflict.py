"""The Linux bind()/listen() conflict model (pure). Spec: ../shared/docs/bind-rules.md.

The decision procedure of bind-rules.md §0: for each existing socket on the same port and
protocol, do the devices overlap, do the addresses overlap, and does an exemption apply?
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import Endpoint, Family, IPAddress, Proto, SocketRecord, State


@dataclass(frozen=True, slots=True)
class SockOpts:
    """SO_REUSEADDR / SO_REUSEPORT of an existing socket; None = unknown (inet_diag hides them)."""

    reuseaddr: bool | None = None
    reuseport: bool | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """An existing socket on the port, with whatever is known of its flags."""

    socket: SocketRecord
    opts: SockOpts = SockOpts()


@dataclass(frozen=True, slots=True)
class BindRequest:
    proto: Proto
    addr: IPAddress
    port: int
    reuseaddr: bool = False
    reuseport: bool = False
    #: None: the sysctl default (net.ipv6.bindv6only); ignored for IPv4.
    v6only: bool | None = None
    ifindex: int = 0
    #: The socket's uid (sk_uid, fixed at socket() time): what the SO_REUSEPORT check compares.
    uid: int = 0
    #: TCP: whether listen() will follow (the kernel checks conflicts again there).
    listen: bool = True
    freebind: bool = False


@dataclass(frozen=True, slots=True)
class KernelSettings:
    unprivileged_port_start: int = 1024
    bindv6only: bool = False
    cap_net_bind_service: bool = True
    #: Addresses configured on this host (netns); None = unknown, skip the EADDRNOTAVAIL check.
    local_addresses: frozenset[IPAddress] | None = None
    ip_nonlocal_bind: bool = False
    ipv6_nonlocal_bind: bool = False
    ip_local_port_range: tuple[int, int] = (32768, 60999)
    ip_local_reserved_ports: frozenset[int] = field(default_factory=frozenset)
    kernel_version: tuple[int, int] = (6, 18)


class Stage(enum.StrEnum):
    BIND = "bind"
    LISTEN = "listen"


class Verdict(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    #: Depends on a flag nobody could read (Holder.opts has None); both outcomes are reported.
    DEPENDS = "depends"


class Rule(enum.StrEnum):
    """Which kernel rule decided (named after the check in the kernel source)."""

    ADDRESS_NOT_LOCAL = "address-not-local"  # __inet_bind / __inet6_bind: EADDRNOTAVAIL
    PRIVILEGED_PORT = "privileged-port"  # inet_port_requires_bind_service: EACCES
    LISTENER_NEVER_YIELDS = "listener-never-yields"  # inet_bind_conflict: sk2 in LISTEN
    REUSEADDR_MISSING_NEW = "reuseaddr-missing-new"
    REUSEADDR_MISSING_OLD = "reuseaddr-missing-old"
    REUSEPORT_OTHER_UID = "reuseport-other-uid"  # sk_uid differs (TIME_WAIT exempt)
    PLAIN_OVERLAP = "plain-overlap"  # neither exemption applies
    UDP_OVERLAP = "udp-overlap"  # udp_lib_lport_inuse


@dataclass(frozen=True, slots=True)
class Blocker:
    holder: Holder
    stage: Stage
    rule: Rule
    #: False when the answer depends on a flag nobody could read (Holder.opts has None).
    certain: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    errno: int | None = None
    stage: Stage | None = None
    blockers: tuple[Blocker, ...] = ()
    notes: tuple[str, ...] = ()


# A placeholder holder for errors that no socket causes (EACCES, EADDRNOTAVAIL).
_NO_SOCKET = SocketRecord(
    Proto.TCP, Family.INET, State.CLOSE, Endpoint(IPv4Address(0), 0), Endpoint(IPv4Address(0), 0), None, None
)

EADDRINUSE = 98
EADDRNOTAVAIL = 99
EACCES = 13


def _recv_families(addr: IPAddress, v6only: bool) -> dict[int, IPAddress | None]:
    """Which families a bound address receives, and on which address (None = wildcard).

    inet_rcv_saddr_equal / ipv6_rcv_saddr_equal reduce to: IPv4 sockets and v4-mapped IPv6
    addresses receive IPv4; [::] receives IPv6, and IPv4 too unless v6only; any other IPv6
    address receives IPv6 only (__inet6_bind forces v6only for it).
    """
    if isinstance(addr, IPv4Address):
        return {4: None if addr.is_unspecified else addr}
    assert isinstance(addr, IPv6Address)
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return {4: None if mapped.is_unspecified else mapped}
    if addr.is_unspecified:
        return {6: None} if v6only else {6: None, 4: None}
    return {6: addr}


def overlap(a: IPAddress, a_v6only: bool, b: IPAddress, b_v6only: bool) -> bool:
    fa, fb = _recv_families(a, a_v6only), _recv_families(b, b_v6only)
    for fam in fa.keys() & fb.keys():
        x, y = fa[fam], fb[fam]
        if x is None or y is None or x == y:
            return True
    return False


def _effective_v6only(addr: IPAddress, v6only: bool | None, settings: KernelSettings) -> bool:
    if addr.version == 4:
        return False
    return settings.bindv6only if v6only is None else v6only


def _tcp_conflict(req: BindRequest, e: SocketRecord, ra: bool, rp: bool) -> tuple[bool, Rule]:
    """inet_bind_conflict() for one holder with its flags fixed to (ra, rp)."""
    listening = e.state is State.LISTEN
    if req.reuseaddr and ra and not listening:
        return False, Rule.PLAIN_OVERLAP
    # TIME_WAIT (and orphan FIN_WAIT2) mini-sockets have no uid: the uid test is skipped.
    if req.reuseport and rp and (e.is_mini or e.uid == req.uid):
        return False, Rule.PLAIN_OVERLAP
    if req.reuseport and rp:
        return True, Rule.REUSEPORT_OTHER_UID
    if listening and req.reuseaddr and ra:
        return True, Rule.LISTENER_NEVER_YIELDS
    if listening:
        return True, Rule.LISTENER_NEVER_YIELDS if req.reuseaddr else Rule.PLAIN_OVERLAP
    if req.reuseaddr and not ra:
        return True, Rule.REUSEADDR_MISSING_OLD
    if ra and not req.reuseaddr:
        return True, Rule.REUSEADDR_MISSING_NEW
    return True, Rule.PLAIN_OVERLAP


def _udp_conflict(req: BindRequest, e: SocketRecord, ra: bool, rp: bool) -> tuple[bool, Rule]:
    """udp_lib_lport_inuse(): both SO_REUSEADDR, or both SO_REUSEPORT with the same uid."""
    if req.reuseaddr and ra:
        return False, Rule.UDP_OVERLAP
    if req.reuseport and rp and e.uid == req.uid:
        return False, Rule.UDP_OVERLAP
    if req.reuseport and rp:
        return True, Rule.REUSEPORT_OTHER_UID
    if req.reuseaddr and not ra:
        return True, Rule.REUSEADDR_MISSING_OLD
    return True, Rule.UDP_OVERLAP


def _choices(v: bool | None) -> tuple[bool, ...]:
    return (False, True) if v is None else (v,)


def _holder_conflict(req: BindRequest, h: Holder) -> tuple[bool | None, Rule]:
    """True/False, or None when the answer depends on an unknown flag."""
    check = _tcp_conflict if req.proto is Proto.TCP else _udp_conflict
    results = {
        check(req, h.socket, ra, rp) for ra in _choices(h.opts.reuseaddr) for rp in _choices(h.opts.reuseport)
    }
    verdicts = {c for c, _ in results}
    rule = next((r for c, r in sorted(results, key=lambda x: not x[0]) if c), Rule.PLAIN_OVERLAP)
    if len(verdicts) == 2:
        return None, rule
    return verdicts.pop(), rule


def _reason(req: BindRequest, h: Holder, rule: Rule, certain: bool) -> str:
    e = h.socket
    remote = "" if e.remote.port == 0 else f" -> {e.remote}"
    what = f"{e.state.label} {e.local}{remote}"
    text = {
        Rule.LISTENER_NEVER_YIELDS: "a listening socket never yields to SO_REUSEADDR; only SO_REUSEPORT on "
        "both sockets (same user) shares a listener",
        Rule.REUSEADDR_MISSING_OLD: "it was created without SO_REUSEADDR, so SO_REUSEADDR on your side "
        "cannot help (both sockets need it)",
        Rule.REUSEADDR_MISSING_NEW: "it has SO_REUSEADDR but your socket does not; "
        "set SO_REUSEADDR before bind()",
        Rule.REUSEPORT_OTHER_UID: f"SO_REUSEPORT is shared only within one user: it belongs to uid {e.uid}, "
        f"your socket to uid {req.uid}",
        Rule.PLAIN_OVERLAP: "its address overlaps yours and neither SO_REUSEADDR (both sides, not listening) "
        "nor SO_REUSEPORT (both sides, same user) applies",
        Rule.UDP_OVERLAP: "UDP sockets share a port only if both set SO_REUSEADDR, or both set SO_REUSEPORT "
        "as the same user",
    }.get(rule, str(rule))
    if rule is Rule.PLAIN_OVERLAP and e.state is State.LISTEN:
        text = (
            "it is listening on an overlapping address; SO_REUSEADDR never shares a listener, "
            "SO_REUSEPORT on both sockets (same user) would"
        )
    if not certain:
        text += " — if its flags are what they would need to be, it would not block"
    return f"{what}: {text}"


def _address_error(req: BindRequest, settings: KernelSettings) -> Blocker | None:
    if settings.local_addresses is None or req.freebind:
        return None
    a = req.addr
    v4 = a if isinstance(a, IPv4Address) else a.ipv4_mapped if isinstance(a, IPv6Address) else None
    if v4 is not None:
        if settings.ip_nonlocal_bind or v4.is_unspecified or v4.is_loopback or v4.is_multicast:
            return None
        if v4 in settings.local_addresses or v4 == IPv4Address("255.255.255.255"):
            return None
    else:
        if settings.ipv6_nonlocal_bind or a.is_unspecified or a in settings.local_addresses:
            return None
    fake = Holder(_NO_SOCKET)
    return Blocker(fake, Stage.BIND, Rule.ADDRESS_NOT_LOCAL, True, f"{a} is not an address of this host")


def _privilege_error(req: BindRequest, settings: KernelSettings) -> Blocker | None:
    if 0 < req.port < settings.unprivileged_port_start and not settings.cap_net_bind_service:
        return Blocker(
            Holder(_NO_SOCKET),
            Stage.BIND,
            Rule.PRIVILEGED_PORT,
            True,
            f"ports below {settings.unprivileged_port_start} need CAP_NET_BIND_SERVICE",
        )
    return None


def _pre_checks(req: BindRequest, settings: KernelSettings) -> Outcome | None:
    # Check order differs by family (bind-rules §3): IPv4 address first, IPv6 privilege first.
    addr = _address_error(req, settings)
    priv = _privilege_error(req, settings)
    order = [(addr, EADDRNOTAVAIL), (priv, EACCES)]
    if req.addr.version == 6:
        order.reverse()
    for b, err in order:
        if b is not None:
            return Outcome(Verdict.FAIL, err, Stage.BIND, (b,))
    return None


def evaluate(req: BindRequest, holders: Iterable[Holder], settings: KernelSettings) -> Outcome:
    """Predict bind() (and, for TCP, listen()) for ``req`` against the sockets on its port."""
    pre = _pre_checks(req, settings)
    if pre is not None:
        return pre
    n_v6only = _effective_v6only(req.addr, req.v6only, settings)
    sure: list[Blocker] = []
    maybe: list[Blocker] = []
    for h in holders:
        e = h.socket
        if e.proto is not req.proto or e.local.port != req.port:
            continue  # TCP and UDP never conflict; other ports are other buckets
        if req.ifindex and e.ifindex and req.ifindex != e.ifindex:
            continue  # both pinned to different devices
        e_v6only = bool(e.v6only) if e.family.value == 10 else False
        if not overlap(req.addr, n_v6only, e.local.addr, e_v6only):
            continue
        conflict, rule = _holder_conflict(req, h)
        if conflict is False:
            continue
        b = Blocker(h, Stage.BIND, rule, conflict is True, _reason(req, h, rule, conflict is True))
        (sure if conflict else maybe).append(b)
    if sure:
        return Outcome(Verdict.FAIL, EADDRINUSE, Stage.BIND, tuple(sure + maybe))
    if maybe:
        return Outcome(Verdict.DEPENDS, EADDRINUSE, Stage.BIND, tuple(maybe))
    return Outcome(Verdict.OK)
