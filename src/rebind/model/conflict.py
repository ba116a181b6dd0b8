"""The Linux bind()/listen() conflict model (pure). Spec: docs/bind-rules.md.

The decision procedure of bind-rules.md §0: for each existing socket on the same port and
protocol, do the devices overlap, do the addresses overlap, and does an exemption apply? Plus
what the doc leaves out and the kernel oracle (tests/kernel/test_oracle.py) showed on 6.18:

* TCP ``tb->fastreuseport`` cache (``sk_reuseport_match``): a SO_REUSEPORT socket whose uid and
  address match the cache skips every conflict check (``check_bind_conflict = false`` in
  inet_csk_get_port, the address-any buckets included). Pass it as ``ReuseportCache`` if known.
* UDP ``udp_lib_lport_inuse``: upstream returns at the *first* relevant socket in hash-chain
  order (a same-uid SO_REUSEPORT socket there lets the bind through even if a later one would
  conflict); some builds of the same version check every socket. Which one runs here is
  ``KernelSettings.udp_first_match``, decided by a calibration experiment (kernel/calibrate.py);
  None = not calibrated, and an answer that hinges on it is DEPENDS. With the early stop the
  chain order matters: ``PortState.udp_chain_order`` says the holders are given in it
  (``udp_chain_order`` rebuilds it from bind order: newest first, except IPv6 SO_REUSEPORT
  sockets, appended at the tail); unknown order where it matters is DEPENDS too.
* The TCP bucket's fast-reuse fields are an input (``BucketState``, read by a BPF iterator);
  unknown means the SO_REUSEPORT fast path may or may not apply: never an optimistic answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from itertools import product

from rebind.model.records import Endpoint, Family, IPAddress, Proto, SocketRecord, State
from rebind.model.request import BindRequest as BindRequest  # re-exported: its old home

EACCES = 13
EINVAL = 22
EADDRINUSE = 98
EADDRNOTAVAIL = 99


@dataclass(frozen=True, slots=True)
class SockOpts:
    """SO_REUSEADDR / SO_REUSEPORT of an existing socket; None = unknown (inet_diag hides them)."""

    reuseaddr: bool | None = None
    reuseport: bool | None = None
    #: IPV6_V6ONLY when the record lacks it (inet_diag reports it for LISTEN/CLOSE only): a
    #: child of a dual-stack [::] listener keeps ipv6only=0 on its specific address.
    v6only: bool | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """An existing socket on the port, with whatever is known of its flags."""

    socket: SocketRecord
    opts: SockOpts = SockOpts()


class AddrFlag(enum.IntFlag):
    """IFA_F_* of an IPv6 address (include/uapi/linux/if_addr.h; /proc/net/if_inet6 shows the low 8)."""

    TEMPORARY = 0x01
    NODAD = 0x02
    OPTIMISTIC = 0x04
    DADFAILED = 0x08
    HOMEADDRESS = 0x10
    DEPRECATED = 0x20
    TENTATIVE = 0x40
    PERMANENT = 0x80


@dataclass(frozen=True, slots=True)
class AddrState:
    """One IPv6 address configured in this netns, on one interface, with its flags."""

    addr: IPv6Address
    ifindex: int
    flags: AddrFlag = AddrFlag.PERMANENT
    ifname: str = ""

    @property
    def usable(self) -> bool:
        """ipv6_chk_addr() bans IFA_F_TENTATIVE unless IFA_F_OPTIMISTIC (optimistic DAD)."""
        return not (self.flags & AddrFlag.TENTATIVE) or bool(self.flags & AddrFlag.OPTIMISTIC)


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
    #: IPv6 addresses with their interface and DAD state; None = unknown (use local_addresses).
    ipv6_addresses: tuple[AddrState, ...] | None = None
    #: IPv4 broadcast addresses of this netns (RTN_BROADCAST in the local table: bindable);
    #: None = unknown (then only 255.255.255.255 is known to be one).
    broadcast_addresses: frozenset[IPv4Address] | None = None
    #: udp_lib_lport_inuse() returns 0 at the first same-uid SO_REUSEPORT match (upstream), or
    #: checks every socket (some 6.18.44 builds). Calibrated per kernel build
    #: (kernel/calibrate.py); None = unknown: answers that hinge on it are DEPENDS.
    udp_first_match: bool | None = None


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
    ADDRESS_TENTATIVE = "address-tentative"  # ipv6_chk_addr bans IFA_F_TENTATIVE: EADDRNOTAVAIL
    PRIVILEGED_PORT = "privileged-port"  # inet_port_requires_bind_service: EACCES
    INVALID_ADDRESS = "invalid-address"  # __inet6_bind: EINVAL (mapped on v6only, mcast TCP, scope)
    LISTENER_NEVER_YIELDS = "listener-never-yields"  # inet_bind_conflict: sk2 in LISTEN
    REUSEADDR_MISSING_NEW = "reuseaddr-missing-new"
    REUSEADDR_MISSING_OLD = "reuseaddr-missing-old"
    REUSEPORT_MISSING_NEW = "reuseport-missing-new"  # it has SO_REUSEPORT (your uid), you do not
    REUSEPORT_MISSING_OLD = "reuseport-missing-old"
    REUSEPORT_OTHER_UID = "reuseport-other-uid"  # sk_uid differs (TIME_WAIT exempt)
    PLAIN_OVERLAP = "plain-overlap"  # neither exemption applies
    UDP_OVERLAP = "udp-overlap"  # udp_lib_lport_inuse


class Flag(enum.StrEnum):
    """A fact about an existing socket that the answer may hinge on."""

    REUSEADDR = "SO_REUSEADDR"
    REUSEPORT = "SO_REUSEPORT"
    UID = "socket uid"
    V6ONLY = "IPV6_V6ONLY"
    #: tb->fastreuseport/fastuid/fast_rcv_saddr: only a BPF iterator reads them.
    BUCKET = "port's SO_REUSEPORT cache"
    #: Which udp_lib_lport_inuse this kernel build has (not calibrated: no network namespace).
    UDP_RULE = "kernel build's UDP rule"
    #: The UDP hash chain's order (the early stop makes the first relevant socket decide).
    CHAIN_ORDER = "UDP hash-chain order"


@dataclass(frozen=True, slots=True)
class Blocker:
    holder: Holder
    stage: Stage
    rule: Rule
    #: False when the answer depends on a flag nobody could read (Holder.opts has None).
    certain: bool
    reason: str
    #: The unknown facts of the holder that decide whether it blocks (empty when certain).
    decided_by: tuple[Flag, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    errno: int | None = None
    stage: Stage | None = None
    blockers: tuple[Blocker, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class ReuseportCache:
    """A TCP port bucket's ``tb->fastreuseport`` state when > 0 (inet_csk_update_fastreuse).

    On 6.8+ it is always FASTREUSEPORT_STRICT: the "bucket empty" test runs after the bhash2
    entry is linked, so the first reuseport socket also lands in the reset branch.
    """

    uid: int
    addr: IPAddress
    v6only: bool
    #: FASTREUSEPORT_STRICT (2) compares the address; FASTREUSEPORT_ANY (1, a bucket's first
    #: socket before 6.8) lets every same-uid SO_REUSEPORT socket through.
    strict: bool = True


FASTREUSEPORT_ANY = 1
FASTREUSEPORT_STRICT = 2


@dataclass(frozen=True, slots=True)
class BucketState:
    """A TCP port's ``inet_bind_bucket`` fast-reuse fields, as the kernel has them now.

    Read by the BPF socket iterator (``icsk_bind_hash``); a field None = that field unknown.
    ``fast_rcv_saddr`` is the cached socket's address in its own family's form
    (``::ffff:a.b.c.d`` for an AF_INET6 socket on an IPv4 address).
    """

    fastreuse: int | None = None
    fastreuseport: int | None = None
    fastuid: int | None = None
    fast_rcv_saddr: IPAddress | None = None
    fast_ipv6_only: bool | None = None

    @classmethod
    def of_cache(cls, cache: ReuseportCache | None) -> BucketState:
        """The fields for a known SO_REUSEPORT cache (None: tb->fastreuseport = 0)."""
        if cache is None:
            return cls(0, 0)
        level = FASTREUSEPORT_STRICT if cache.strict else FASTREUSEPORT_ANY
        return cls(0, level, cache.uid, cache.addr, cache.v6only)

    @property
    def cache(self) -> ReuseportCache | None:
        """The SO_REUSEPORT cache when it is on and fully known, else None."""
        if self.fastreuseport is None or self.fastreuseport <= 0:
            return None
        if self.fastuid is None or self.fast_rcv_saddr is None or self.fast_ipv6_only is None:
            return None
        strict = self.fastreuseport != FASTREUSEPORT_ANY
        return ReuseportCache(self.fastuid, self.fast_rcv_saddr, self.fast_ipv6_only, strict)


@dataclass(frozen=True, slots=True)
class PortState:
    """What the kernel keeps for the port besides its sockets; None = not read.

    Both come from the BPF socket iterator when it runs; without it the model never assumes
    the favourable value (an answer that hinges on them is DEPENDS).
    """

    #: TCP: the bind bucket's fast-reuse cache.
    bucket: BucketState | None = None
    #: UDP: the holders are given in the port's primary hash-chain order (sk_for_each order).
    udp_chain_order: bool = False


@dataclass(frozen=True, slots=True)
class Alternative:
    """One way to bind that `rebind why` can offer, with the model's prediction."""

    label: str
    request: BindRequest
    outcome: Outcome

    @property
    def works(self) -> bool:
        return self.outcome.verdict is Verdict.OK


# --------------------------------------------------------------------------------------------
# Addresses: a literal transcription of inet_rcv_saddr_equal / ipv{4,6}_rcv_saddr_equal.

_LOOPBACK4_IPV6 = 0x7F000006  # sk_rcv_saddr of an IPv6 socket on a non-mapped address
_ANY, _MAPPED, _OTHER = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _KAddr:
    """What the kernel compares: sk_v6_rcv_saddr (None for AF_INET), sk_rcv_saddr, ipv6only."""

    v6: IPv6Address | None
    v4: int
    ipv6only: bool


def _kaddr(addr: IPAddress, v6only: bool) -> _KAddr:
    if isinstance(addr, IPv4Address):
        return _KAddr(None, int(addr), False)
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return _KAddr(addr, int(mapped), False)
    if addr.is_unspecified:
        return _KAddr(addr, 0, v6only)
    # __inet6_bind: a specific non-mapped address forces sk_ipv6only = 1 (E12).
    return _KAddr(addr, _LOOPBACK4_IPV6, True)


def _v6type(a: IPv6Address | None) -> int:
    if a is None:  # inet6_rcv_saddr() of an AF_INET socket: treated as mapped
        return _MAPPED
    if a.is_unspecified:
        return _ANY
    return _MAPPED if a.ipv4_mapped is not None else _OTHER


def _ipv4_equal(a1: int, a2: int, sk2_ipv6only: bool, w1: bool, w2: bool) -> bool:
    """ipv4_rcv_saddr_equal()."""
    if sk2_ipv6only:
        return False
    return a1 == a2 or (w1 and a1 == 0) or (w2 and a2 == 0)


def _ipv6_equal(sk1: _KAddr, sk2: _KAddr, w1: bool, w2: bool) -> bool:
    """ipv6_rcv_saddr_equal()."""
    t1, t2 = _v6type(sk1.v6), _v6type(sk2.v6)
    if t1 == _MAPPED and t2 == _MAPPED:
        return _ipv4_equal(sk1.v4, sk2.v4, sk2.ipv6only, w1, w2)
    if t1 == _ANY and t2 == _ANY:
        return True
    if t2 == _ANY and w2 and not (sk2.ipv6only and t1 == _MAPPED):
        return True
    if t1 == _ANY and w1 and not (sk1.ipv6only and t2 == _MAPPED):
        return True
    return sk2.v6 is not None and sk1.v6 == sk2.v6


def _rcv_saddr_equal(sk1: _KAddr, sk2: _KAddr, w1: bool = True, w2: bool = True) -> bool:
    """inet_rcv_saddr_equal(): dispatch on sk1's family."""
    if sk1.v6 is not None:
        return _ipv6_equal(sk1, sk2, w1, w2)
    return _ipv4_equal(sk1.v4, sk2.v4, sk2.ipv6only, w1, w2)


def overlap(a: IPAddress, a_v6only: bool, b: IPAddress, b_v6only: bool) -> bool:
    """Do two bound addresses overlap (inet_rcv_saddr_equal with wildcards, bind-rules §1.2)?"""
    return _rcv_saddr_equal(_kaddr(a, a_v6only), _kaddr(b, b_v6only))


def effective_v6only(addr: IPAddress, v6only: bool | None, settings: KernelSettings) -> bool:
    """sk_ipv6only after bind: IPv4 never; specific non-mapped IPv6 forced on (__inet6_bind)."""
    if isinstance(addr, IPv4Address):
        return False
    if addr.ipv4_mapped is not None:
        return False
    if not addr.is_unspecified:
        return True
    return settings.bindv6only if v6only is None else v6only


def _v6only_choices(h: Holder) -> tuple[bool, ...]:
    """The holder's possible sk_ipv6only: from the record, else the opts, else both."""
    e = h.socket
    a = e.local.addr
    if isinstance(a, IPv4Address) or a.ipv4_mapped is not None:
        return (False,)
    known = e.v6only if e.v6only is not None else h.opts.v6only
    return (known,) if known is not None else (False, True)


def _holder_kaddr(e: SocketRecord, v6only: bool) -> _KAddr:
    a = e.local.addr
    if isinstance(a, IPv4Address):
        return _KAddr(None, int(a), False)
    mapped = a.ipv4_mapped
    if mapped is not None:
        return _KAddr(a, int(mapped), False)
    if a.is_unspecified or not v6only:
        # [::], or a specific address reached without binding it (accepted child of a dual-stack
        # listener, client bound to [::]): ipv6only stays 0 and sk_rcv_saddr is not a real
        # IPv4 address; 0 makes ipv4_rcv_saddr_equal match an IPv4 wildcard, as the kernel does.
        return _KAddr(a, 0, v6only)
    return _KAddr(a, _LOOPBACK4_IPV6, True)


def _norm(a: IPAddress) -> IPAddress:
    return a.ipv4_mapped or a if isinstance(a, IPv6Address) else a


def _overlaps(req: BindRequest, n: _KAddr, h: Holder, tcp: bool) -> set[bool]:
    """Whether the holder is checked at all, for each of its possible ipv6only values."""
    e = h.socket
    out = set()
    for v6only in _v6only_choices(h):
        if tcp and _use_bhash2(n):
            # inet_bhash2_addr_any_conflict + __inet_bhash2_conflict, then N's own bucket.
            if _is_addr_any_bucket(e, n):
                hit = not (v6only and _v6type(n.v6) == _MAPPED)
            else:
                hit = _norm(e.local.addr) == _norm(req.addr)
        else:
            hit = _rcv_saddr_equal(n, _holder_kaddr(e, v6only))
        out.add(hit)
    return out


def _is_addr_any_bucket(e: SocketRecord, n: _KAddr) -> bool:
    """inet_bind2_bucket_match_addr_any(): [::] always; 0.0.0.0 / [::ffff:0.0.0.0] for v4 N."""
    a = e.local.addr
    if isinstance(a, IPv6Address) and a.is_unspecified:
        return True
    v4 = a if isinstance(a, IPv4Address) else a.ipv4_mapped
    return v4 is not None and v4.is_unspecified and _v6type(n.v6) == _MAPPED


def _use_bhash2(n: _KAddr) -> bool:
    """inet_use_bhash2_on_bind(): any specific address (v4-mapped ones included)."""
    if n.v6 is not None and _v6type(n.v6) == _OTHER:
        return True
    return n.v4 != 0


# --------------------------------------------------------------------------------------------
# Per-socket rules.


@dataclass(frozen=True, slots=True)
class _Facts:
    """One concrete assignment of a holder's possibly-unknown facts."""

    reuseaddr: bool
    reuseport: bool
    same_uid: bool


def _fact_choices(req: BindRequest, h: Holder) -> list[tuple[_Facts, tuple[Flag, ...]]]:
    """Every assignment of the unknown facts, and which facts were unknown."""
    e = h.socket
    unknown: list[Flag] = []
    ra: tuple[bool, ...] = (h.opts.reuseaddr,) if h.opts.reuseaddr is not None else (False, True)
    rp: tuple[bool, ...] = (h.opts.reuseport,) if h.opts.reuseport is not None else (False, True)
    uid: tuple[bool, ...] = (e.uid == req.uid,) if e.uid is not None or e.is_mini else (False, True)
    if len(ra) == 2:
        unknown.append(Flag.REUSEADDR)
    if len(rp) == 2:
        unknown.append(Flag.REUSEPORT)
    if len(uid) == 2:
        unknown.append(Flag.UID)
    return [(_Facts(a, p, u), tuple(unknown)) for a, p, u in product(ra, rp, uid)]


def _is_timewait(e: SocketRecord) -> bool:
    """A timewait mini-socket: its sk_state is TCP_TIME_WAIT (substate FIN_WAIT2 included)."""
    return e.is_mini or e.state is State.TIME_WAIT


def _tcp_pair(req: BindRequest, e: SocketRecord, f: _Facts) -> Rule | None:
    """inet_bind_conflict(relax=true, reuseport_ok=true) for one holder; None = no conflict."""
    listening = e.state is State.LISTEN
    if req.reuseaddr and f.reuseaddr and not listening:
        return None
    # sk_reuseport on both, and sk2 in TIME_WAIT or uid_eq(uid, sk_uid(sk2)).
    if req.reuseport and f.reuseport and (_is_timewait(e) or f.same_uid):
        return None
    if req.reuseport and f.reuseport:
        return Rule.REUSEPORT_OTHER_UID
    if listening:
        if f.reuseport and f.same_uid and not req.reuseport:
            return Rule.REUSEPORT_MISSING_NEW
        return Rule.LISTENER_NEVER_YIELDS if req.reuseaddr else Rule.PLAIN_OVERLAP
    if req.reuseaddr and not f.reuseaddr:
        return Rule.REUSEADDR_MISSING_OLD
    if f.reuseaddr and not req.reuseaddr:
        return Rule.REUSEADDR_MISSING_NEW
    if f.reuseport and (f.same_uid or _is_timewait(e)) and not req.reuseport:
        return Rule.REUSEPORT_MISSING_NEW
    if req.reuseport and not f.reuseport:
        return Rule.REUSEPORT_MISSING_OLD
    return Rule.PLAIN_OVERLAP


class _Udp(enum.Enum):
    SKIP = 0  # not relevant: udp_lib_lport_inuse goes on to the next socket
    SHARE = 1  # same-uid SO_REUSEPORT: it returns 0 (free) at once
    CONFLICT = 2


def _udp_pair(req: BindRequest, f: _Facts) -> tuple[_Udp, Rule | None]:
    """udp_lib_lport_inuse() for one overlapping holder (devices and addresses already match)."""
    if req.reuseaddr and f.reuseaddr:
        return _Udp.SKIP, None
    if req.reuseport and f.reuseport and f.same_uid:
        return _Udp.SHARE, None
    if req.reuseport and f.reuseport:
        return _Udp.CONFLICT, Rule.REUSEPORT_OTHER_UID
    if req.reuseaddr and not f.reuseaddr:
        return _Udp.CONFLICT, Rule.REUSEADDR_MISSING_OLD
    if f.reuseaddr and not req.reuseaddr:
        return _Udp.CONFLICT, Rule.REUSEADDR_MISSING_NEW
    if f.reuseport and f.same_uid and not req.reuseport:
        return _Udp.CONFLICT, Rule.REUSEPORT_MISSING_NEW
    return _Udp.CONFLICT, Rule.UDP_OVERLAP


# --------------------------------------------------------------------------------------------
# Words.


def _describe(e: SocketRecord) -> str:
    remote = "" if e.remote.port == 0 else f" -> {e.remote}"
    if e.is_mini and e.state is State.FIN_WAIT2:
        what = "orphaned FIN_WAIT2 (handled as TIME_WAIT)"
    elif e.state is State.BOUND_INACTIVE:
        what = "bound, not listening,"
    elif e.proto is Proto.UDP:
        what = "UDP socket"
    else:
        what = e.state.label
    return f"{what} {e.local}{remote}"


def _flag_word(v: bool | None, name: str) -> str:
    return f"{name} unknown" if v is None else (f"with {name}" if v else f"without {name}")


_RULE_TEXT = {
    Rule.LISTENER_NEVER_YIELDS: "a listening socket never yields to SO_REUSEADDR; only SO_REUSEPORT on "
    "both sockets (same user) shares a listener",
    Rule.REUSEADDR_MISSING_OLD: "SO_REUSEADDR on your side cannot help: both sockets need it",
    Rule.REUSEADDR_MISSING_NEW: "it has SO_REUSEADDR but your socket does not; "
    "set SO_REUSEADDR before bind()",
    Rule.REUSEPORT_MISSING_NEW: "it has SO_REUSEPORT (same user); set SO_REUSEPORT before bind() to share",
    Rule.REUSEPORT_MISSING_OLD: "SO_REUSEPORT on your side cannot help: it does not have SO_REUSEPORT",
    Rule.PLAIN_OVERLAP: "its address overlaps yours and neither SO_REUSEADDR (both sides, not listening) "
    "nor SO_REUSEPORT (both sides, same user) applies",
    Rule.UDP_OVERLAP: "UDP sockets share a port only if both set SO_REUSEADDR, or both set SO_REUSEPORT "
    "as the same user",
}


def _reason(req: BindRequest, h: Holder, rule: Rule, decided_by: tuple[Flag, ...]) -> str:
    e = h.socket
    if _is_timewait(e):
        head = f"{_describe(e)} left by a socket {_flag_word(h.opts.reuseaddr, 'SO_REUSEADDR')}"
    else:
        head = f"{_describe(e)} ({_flag_word(h.opts.reuseaddr, 'SO_REUSEADDR')})"
    if rule is Rule.REUSEPORT_OTHER_UID:
        who = "an unknown user" if e.uid is None else f"uid {e.uid}"
        text = f"SO_REUSEPORT is shared only within one user: it belongs to {who}, yours to uid {req.uid}"
    else:
        text = _RULE_TEXT.get(rule, str(rule))
    own = [f for f in decided_by if f not in _GLOBAL_FLAGS]
    others = [f for f in decided_by if f in _GLOBAL_FLAGS]
    if own:
        flags = " and ".join(str(f) for f in own)
        text += f" — unless its {flags} is what sharing needs; nobody could read it"
    if others:
        text += " — unless the " + " or the ".join(_GLOBAL_FLAGS[f] for f in others)
    return f"{head}; {text}"


#: Facts of the port or the kernel build (not of the holder) that an answer may hinge on.
_GLOBAL_FLAGS = {
    Flag.BUCKET: "port's SO_REUSEPORT cache lets the bind skip this check (unknown: no BPF iterator)",
    Flag.UDP_RULE: "kernel build stops at an earlier same-uid SO_REUSEPORT socket (its UDP rule is "
    "not calibrated here)",
    Flag.CHAIN_ORDER: "UDP hash chain puts a same-uid SO_REUSEPORT socket before it (chain order unknown)",
}


# --------------------------------------------------------------------------------------------
# Checks that no socket causes: __inet_bind / __inet6_bind before get_port.

# A placeholder holder for errors that no socket causes (EACCES, EADDRNOTAVAIL, EINVAL).
_NO_SOCKET = SocketRecord(
    Proto.TCP,
    Family.INET,
    State.CLOSE,
    Endpoint(IPv4Address(0), 0),
    Endpoint(IPv4Address(0), 0),
    None,
    None,
)


def _plain(rule: Rule, text: str) -> Blocker:
    return Blocker(Holder(_NO_SOCKET), Stage.BIND, rule, True, text)


def _address_error(req: BindRequest, settings: KernelSettings) -> Blocker | None:
    """EADDRNOTAVAIL: inet_addr_valid_or_nonlocal (IPv4, v4-mapped) / ipv6_chk_addr (IPv6)."""
    if settings.local_addresses is None or req.freebind:
        return None
    a = req.addr
    v4 = a if isinstance(a, IPv4Address) else a.ipv4_mapped
    if v4 is not None:
        # RTN_LOCAL (all of 127/8: N5), RTN_MULTICAST, RTN_BROADCAST (0.0.0.0, 255.255.255.255).
        if settings.ip_nonlocal_bind or v4.is_unspecified or v4.is_loopback or v4.is_multicast:
            return None
        if v4 in settings.local_addresses or v4 == IPv4Address("255.255.255.255"):
            return None
        # A subnet broadcast (10.9.0.255 beside 10.9.0.1/24) is RTN_BROADCAST in the local
        # table: inet_addr_valid_or_nonlocal accepts it like a local address.
        if settings.broadcast_addresses is not None and v4 in settings.broadcast_addresses:
            return None
    elif settings.ipv6_nonlocal_bind or a.is_unspecified or a.is_multicast:
        return None
    elif settings.ipv6_addresses is not None:
        return _ipv6_address_error(req, IPv6Address(a), settings.ipv6_addresses)
    elif a in settings.local_addresses:
        return None
    return _plain(Rule.ADDRESS_NOT_LOCAL, f"{a} is not an address of this host (network namespace)")


def _ipv6_address_error(req: BindRequest, a: IPv6Address, states: tuple[AddrState, ...]) -> Blocker | None:
    """ipv6_chk_addr(net, addr, dev, 0): a link-local address must be on the bound device; a
    tentative one (DAD running, or failed: IFA_F_DADFAILED keeps IFA_F_TENTATIVE) is refused."""
    scoped = a.is_link_local
    found = [s for s in states if s.addr == a and (not scoped or s.ifindex == req.ifindex)]
    if any(s.usable for s in found):
        return None
    if not found:
        on = " on that interface" if scoped else ""
        return _plain(Rule.ADDRESS_NOT_LOCAL, f"{a} is not an address of this host{on} (network namespace)")
    s = found[0]
    dev = f" on {s.ifname}" if s.ifname else ""
    if s.flags & AddrFlag.DADFAILED:
        why = "failed duplicate address detection (IFA_F_DADFAILED): another host on the link uses it"
    else:
        why = (
            "is tentative: duplicate address detection is still running (IFA_F_TENTATIVE); "
            "bind() works once it ends (net.ipv6.conf.IFACE.dad_transmits probes, about 1 s each, "
            "once the link has carrier)"
        )
    return _plain(Rule.ADDRESS_TENTATIVE, f"{a}{dev} {why}")


def _privilege_error(req: BindRequest, settings: KernelSettings) -> Blocker | None:
    """EACCES: inet_port_requires_bind_service() without CAP_NET_BIND_SERVICE (ns_capable)."""
    if 0 < req.port < settings.unprivileged_port_start and not settings.cap_net_bind_service:
        return _plain(
            Rule.PRIVILEGED_PORT,
            f"ports below {settings.unprivileged_port_start} (net.ipv4.ip_unprivileged_port_start) "
            "need CAP_NET_BIND_SERVICE",
        )
    return None


def _v6_invalid(req: BindRequest, settings: KernelSettings, early: bool) -> Blocker | None:
    """__inet6_bind EINVAL: multicast on TCP (early); v4-mapped on v6only, scope without device."""
    a = req.addr
    if not isinstance(a, IPv6Address):
        return None
    if early:
        if a.is_multicast and req.proto is Proto.TCP:
            return _plain(Rule.INVALID_ADDRESS, f"{a} is a multicast address; TCP cannot bind it")
        return None
    mapped = a.ipv4_mapped is not None
    if mapped and (req.v6only if req.v6only is not None else settings.bindv6only):
        return _plain(Rule.INVALID_ADDRESS, f"{a} is v4-mapped but the socket is IPV6_V6ONLY")
    if a.is_link_local and not req.ifindex:
        return _plain(Rule.INVALID_ADDRESS, f"{a} is link-local: it needs a scope id or a bound device")
    return None


def _pre_checks(req: BindRequest, settings: KernelSettings) -> Outcome | None:
    """The kernel's order (bind-rules §3): IPv4 address, privilege; IPv6 privilege, address."""
    if req.addr.version == 4:
        steps = [(_address_error(req, settings), EADDRNOTAVAIL), (_privilege_error(req, settings), EACCES)]
    else:
        steps = [
            (_v6_invalid(req, settings, early=True), EINVAL),
            (_privilege_error(req, settings), EACCES),
            (_v6_invalid(req, settings, early=False), EINVAL),
            (_address_error(req, settings), EADDRNOTAVAIL),
        ]
    for b, err in steps:
        if b is not None:
            return Outcome(Verdict.FAIL, err, Stage.BIND, (b,))
    return None


# --------------------------------------------------------------------------------------------
# get_port: one conflict check (bind() or listen()).


@dataclass(frozen=True, slots=True)
class _Check:
    verdict: Verdict
    blockers: tuple[Blocker, ...] = ()
    notes: tuple[str, ...] = ()


def _relevant(
    req: BindRequest, holders: Iterable[Holder], settings: KernelSettings
) -> list[tuple[Holder, bool]]:
    """Holders the kernel compares with N, and whether that is certain (False: v6only unknown).

    Same protocol table and port; both devices pinned and different means no conflict.
    """
    n = _kaddr(req.addr, effective_v6only(req.addr, req.v6only, settings))
    out = []
    for h in holders:
        e = h.socket
        if e.proto is not req.proto or e.local.port != req.port:
            continue  # TCP and UDP never conflict; other ports are other buckets
        if req.ifindex and e.ifindex and req.ifindex != e.ifindex:
            continue
        hits = _overlaps(req, n, h, req.proto is Proto.TCP)
        if True in hits:
            out.append((h, len(hits) == 1))
    return out


def _tcp_judge(req: BindRequest, h: Holder, stage: Stage, sure: bool = True) -> Blocker | None:
    """Blocker if h conflicts for at least one assignment of its unknown facts."""
    results = [(_tcp_pair(req, h.socket, f), unknown) for f, unknown in _fact_choices(req, h)]
    rules = [r for r, _ in results if r is not None]
    if not rules:
        return None
    certain = len(rules) == len(results) and sure
    decided_by = () if certain else _deciding(req, h) + (() if sure else (Flag.V6ONLY,))
    return Blocker(h, stage, rules[0], certain, _reason(req, h, rules[0], decided_by), decided_by)


def _deciding(req: BindRequest, h: Holder) -> tuple[Flag, ...]:
    """The unknown facts whose value changes the answer for this holder."""
    out = []
    for flag in (Flag.REUSEADDR, Flag.REUSEPORT, Flag.UID):
        for f, unknown in _fact_choices(req, h):
            if flag not in unknown:
                break
            other = _flip(f, flag)
            if req.proto is Proto.TCP:
                differs = (_tcp_pair(req, h.socket, f) is None) != (_tcp_pair(req, h.socket, other) is None)
            else:
                differs = _udp_pair(req, f)[0] != _udp_pair(req, other)[0]
            if differs:
                out.append(flag)
                break
    return tuple(out)


def _flip(f: _Facts, flag: Flag) -> _Facts:
    if flag is Flag.REUSEADDR:
        return replace(f, reuseaddr=not f.reuseaddr)
    if flag is Flag.REUSEPORT:
        return replace(f, reuseport=not f.reuseport)
    return replace(f, same_uid=not f.same_uid)


def _cache_match(cache: ReuseportCache | None, req: BindRequest, settings: KernelSettings) -> bool:
    """sk_reuseport_match(): reuseport, same uid, and (STRICT) the cached address covers ours."""
    if cache is None or not req.reuseport or cache.uid != req.uid:
        return False
    if not cache.strict:
        return True  # FASTREUSEPORT_ANY
    cached = _kaddr(cache.addr, cache.v6only)
    n = _kaddr(req.addr, effective_v6only(req.addr, req.v6only, settings))
    # ipv{4,6}_rcv_saddr_equal(cached, sk, match_sk1_wildcard=true, match_sk2_wildcard=false)
    return _rcv_saddr_equal(cached, n, True, False)


def fast_path(
    bucket: BucketState | None, req: BindRequest, stage: Stage, settings: KernelSettings
) -> bool | None:
    """Does inet_csk_get_port() skip the conflict check (check_bind_conflict = false)? None: unknown.

    ``(tb->fastreuse > 0 && reuse) || sk_reuseport_match(tb, sk)``, where ``reuse`` is
    SO_REUSEADDR outside TCP_LISTEN (listen() sets the state before it calls get_port). Without
    the bucket: the SO_REUSEADDR path is dead since 6.8 (the bucket is created with
    fastreuse = 0 and inet_csk_update_fastreuse only lowers it once tb->bhash2 is linked; the
    oracle confirms it), but the SO_REUSEPORT cache outlives the socket that set it (it may have
    cleared the flag or closed), so a SO_REUSEPORT bind may take the fast path.
    """
    if req.reuseaddr and stage is Stage.BIND and bucket is not None and (bucket.fastreuse or 0) > 0:
        return True
    return _reuseport_match(bucket, req, settings)


def _reuseport_match(bucket: BucketState | None, req: BindRequest, settings: KernelSettings) -> bool | None:
    """sk_reuseport_match() from whatever fields are known; None when they cannot decide."""
    if not req.reuseport:
        return False
    if bucket is None:
        return None
    frp = bucket.fastreuseport
    if (frp is not None and frp <= 0) or (bucket.fastuid is not None and bucket.fastuid != req.uid):
        return False
    cache = bucket.cache
    return None if cache is None else _cache_match(cache, req, settings)


def _tcp_check(
    req: BindRequest,
    holders: Sequence[Holder],
    settings: KernelSettings,
    bucket: BucketState | None,
    stage: Stage,
) -> _Check:
    """inet_csk_get_port() for an explicit port."""
    on_port = [h for h in holders if h.socket.proto is req.proto and h.socket.local.port == req.port]
    relevant = _relevant(req, on_port, settings)
    notes: list[str] = []
    # A specific address: the address-any buckets (inet_bhash2_addr_any_conflict), then its own
    # bucket (inet_bhash2_conflict); a wildcard: every socket on the port (_relevant decides).
    blockers = [b for h, s in relevant if (b := _tcp_judge(req, h, stage, s)) is not None]
    fast = fast_path(bucket, req, stage, settings) if on_port else False
    if fast and blockers:
        # check_bind_conflict = false: neither inet_bhash2_addr_any_conflict nor
        # inet_csk_bind_conflict runs; the bind succeeds whatever the other sockets are.
        notes.append(
            "the port's SO_REUSEPORT fast path (tb->fastreuseport: same uid and address as the "
            "last SO_REUSEPORT binder) skips the conflict check that "
            + ", ".join(_describe(b.holder.socket) for b in blockers)
            + " would fail"
        )
    if fast:
        return _Check(Verdict.OK, (), tuple(notes))
    if fast is None and blockers:
        notes.append(
            "the port's SO_REUSEPORT cache (tb->fastreuseport, tb->fastuid, tb->fast_rcv_saddr) "
            "is unknown: it keeps the uid and address of the last SO_REUSEPORT bind on the port, "
            "also after that socket cleared the flag or closed, and a bind that matches it skips "
            "the conflict check (sk_reuseport_match)"
        )
        return _Check(Verdict.DEPENDS, tuple(_unsure(req, b, Flag.BUCKET) for b in blockers), tuple(notes))
    return _summarise(blockers, notes)


def _unsure(req: BindRequest, b: Blocker, *flags: Flag) -> Blocker:
    decided_by = b.decided_by + tuple(f for f in flags if f not in b.decided_by)
    return replace(b, certain=False, decided_by=decided_by, reason=_reason(req, b.holder, b.rule, decided_by))


def _summarise(blockers: list[Blocker], notes: list[str]) -> _Check:
    if any(b.certain for b in blockers):
        ordered = sorted(blockers, key=lambda b: not b.certain)
        return _Check(Verdict.FAIL, tuple(ordered), tuple(notes))
    if blockers:
        return _Check(Verdict.DEPENDS, tuple(blockers), tuple(notes))
    return _Check(Verdict.OK, (), tuple(notes))


@dataclass(frozen=True, slots=True)
class _UdpHolder:
    holder: Holder
    sure: bool  # False: its v6only is unknown and decides whether it is checked at all
    pairs: tuple[tuple[_Udp, Rule | None], ...]
    acts: frozenset[_Udp]


def _first_match_in_order(hs: Sequence[_UdpHolder]) -> tuple[set[Verdict], list[_UdpHolder]]:
    """Upstream udp_lib_lport_inuse() in chain order: the first relevant socket decides."""
    endings: set[Verdict] = set()
    met: list[_UdpHolder] = []
    for u in hs:
        met.append(u)
        if _Udp.CONFLICT in u.acts:
            endings.add(Verdict.FAIL)
        if _Udp.SHARE in u.acts:
            endings.add(Verdict.OK)
        if _Udp.SKIP not in u.acts:
            return endings, met
    endings.add(Verdict.OK)
    return endings, met


def _first_match_any_order(hs: Sequence[_UdpHolder]) -> set[Verdict]:
    """The early stop with the chain order unknown: any holder may come first."""
    endings: set[Verdict] = set()
    if any(_Udp.CONFLICT in u.acts for u in hs):
        endings.add(Verdict.FAIL)
    if any(_Udp.SHARE in u.acts for u in hs) or all(u.acts - {_Udp.CONFLICT} for u in hs):
        endings.add(Verdict.OK)
    return endings


def _every_socket(hs: Sequence[_UdpHolder]) -> set[Verdict]:
    """Builds without the early stop: a same-uid SO_REUSEPORT match does not end the scan, so any
    conflicting socket anywhere in the chain refuses the bind (calibrated on 6.18.44-fc)."""
    endings: set[Verdict] = set()
    if any(_Udp.CONFLICT in u.acts for u in hs):
        endings.add(Verdict.FAIL)
    if all(u.acts - {_Udp.CONFLICT} for u in hs):
        endings.add(Verdict.OK)
    return endings


def _udp_check(
    req: BindRequest, holders: Sequence[Holder], settings: KernelSettings, chain_order: bool
) -> _Check:
    """udp_lib_get_port() -> udp_lib_lport_inuse(), under the rule this kernel build has.

    Each holder has a set of possible actions over its unknown facts; the reachable endings (ok /
    EADDRINUSE) over the possible rules (``settings.udp_first_match``) and chain orders
    (``chain_order``: the holders are given in it) give the verdict.
    """
    hs: list[_UdpHolder] = []
    for h, sure in _relevant(req, holders, settings):
        pairs = tuple(_udp_pair(req, f) for f, _ in _fact_choices(req, h))
        acts = frozenset({a for a, _ in pairs} | (set() if sure else {_Udp.SKIP}))
        hs.append(_UdpHolder(h, sure, pairs, acts))
    in_order, met = _first_match_in_order(hs)
    first = in_order if chain_order else _first_match_any_order(hs)
    every = _every_socket(hs)
    rule = settings.udp_first_match
    endings = first if rule is True else every if rule is False else first | every
    flags: list[Flag] = []
    if rule is None and first != every:
        flags.append(Flag.UDP_RULE)
    if rule is not False and not chain_order and first != in_order:
        flags.append(Flag.CHAIN_ORDER)
    # Who can refuse the bind: everyone checked under some possible rule and order.
    checked = hs if rule is False or not chain_order else (hs if rule is None else met)
    blockers = []
    for u in checked:
        if _Udp.CONFLICT not in u.acts:
            continue
        why = next(r for _, r in u.pairs if r is not None)
        certain = u.acts == {_Udp.CONFLICT}
        decided_by = () if certain else _deciding(req, u.holder) + (() if u.sure else (Flag.V6ONLY,))
        blockers.append(
            Blocker(u.holder, Stage.BIND, why, certain, _reason(req, u.holder, why, decided_by), decided_by)
        )
    notes: list[str] = []
    missed = [u.holder for u in hs[len(met) :] if _Udp.CONFLICT in u.acts]
    sharer = next((u.holder for u in met if _Udp.SHARE in u.acts), None)
    if rule is True and chain_order and sharer is not None and missed and endings == {Verdict.OK}:
        notes.append(
            "udp_lib_lport_inuse() stops at the first same-uid SO_REUSEPORT socket ("
            + _describe(sharer.socket)
            + "), so the older "
            + ", ".join(_describe(h.socket) for h in missed)
            + " is never checked"
        )
    if Flag.UDP_RULE in flags:
        notes.append(
            "kernel builds differ here: upstream udp_lib_lport_inuse() stops at the first same-uid "
            "SO_REUSEPORT socket (ok), some builds check every socket (EADDRINUSE); rebind could not "
            "calibrate this one (it needs a private network namespace: run as root once)"
        )
    if Flag.CHAIN_ORDER in flags:
        notes.append(
            "udp_lib_lport_inuse() stops at the first same-uid SO_REUSEPORT socket in the port's "
            "hash chain, and the chain's order is unknown (only the BPF socket iterator reads it)"
        )
    if endings == {Verdict.OK}:
        return _Check(Verdict.OK, (), tuple(notes))
    if endings == {Verdict.FAIL}:
        return _Check(Verdict.FAIL, tuple(sorted(blockers, key=lambda b: not b.certain)), tuple(notes))
    return _Check(Verdict.DEPENDS, tuple(_unsure(req, b, *flags) for b in blockers), tuple(notes))


def udp_chain_order(holders_oldest_first: Iterable[Holder]) -> list[Holder]:
    """UDP holders in primary hash-chain order, from the order they were bound.

    udp_lib_get_port() adds a socket at the head of the port's chain (sk_add_node_rcu), except
    an IPv6 SO_REUSEPORT socket, which goes to the tail (sk_add_node_tail_rcu) so that v4 and
    v6 reuseport groups stay ordered. An unknown reuseport flag is treated as unset.
    """
    chain: list[Holder] = []
    for h in holders_oldest_first:
        if h.socket.family is Family.INET6 and h.opts.reuseport:
            chain.append(h)
        else:
            chain.insert(0, h)
    return chain


def _check(
    req: BindRequest,
    holders: Sequence[Holder],
    settings: KernelSettings,
    port: PortState,
    stage: Stage,
) -> _Check:
    if req.proto is Proto.UDP:
        return _udp_check(req, holders, settings, port.udp_chain_order)
    return _tcp_check(req, holders, settings, port.bucket, stage)


class _Unset:
    """The default of ``cache=``: not given (the port's state comes from ``port=``)."""


_UNSET = _Unset()


def _port_state(port: PortState | None, cache: ReuseportCache | _Unset | None) -> PortState:
    if port is not None:
        return port
    if isinstance(cache, _Unset):
        return PortState()
    return PortState(BucketState.of_cache(cache))


def reuseport_cache_after(
    cache: ReuseportCache | None, *, addr: IPAddress, v6only: bool, uid: int, reuseport: bool
) -> ReuseportCache | None:
    """inet_csk_update_fastreuse() after a successful TCP get_port (bind() or listen()).

    ``v6only`` is the effective flag (see effective_v6only). Accepted children, TIME_WAIT and
    connect() do not call it. A bucket whose last socket left starts again from None.
    """
    if not reuseport:
        return None
    probe = BindRequest(Proto.TCP, addr, 0, reuseport=True, uid=uid, v6only=v6only)
    if _cache_match(cache, probe, KernelSettings()):
        return cache
    return ReuseportCache(uid, addr, v6only)


def bucket_after(bucket: BucketState | None, req: BindRequest, settings: KernelSettings) -> BucketState:
    """inet_csk_update_fastreuse() after ``req``'s successful bind() in its port's bucket.

    Since 6.8 the bind2 bucket is linked before the update, so it always takes the "bucket not
    empty" branch: ``tb->fastreuse`` only drops to 0 (without SO_REUSEADDR), and
    ``tb->fastreuseport`` drops to 0 without SO_REUSEPORT, else stays if sk_reuseport_match()
    and is reset to this socket's uid and address (STRICT) otherwise. With the bucket unknown
    the SO_REUSEPORT cache still covers this socket afterwards: it matched, or it was reset.
    """
    fastreuse = bucket.fastreuse if bucket is not None else None
    if not req.reuseaddr:
        fastreuse = 0
    if not req.reuseport:
        return BucketState(fastreuse, 0)
    if bucket is not None and bucket.cache is not None and _cache_match(bucket.cache, req, settings):
        return replace(bucket, fastreuse=fastreuse)
    v6only = effective_v6only(req.addr, req.v6only, settings)
    return BucketState(fastreuse, FASTREUSEPORT_STRICT, req.uid, req.addr, v6only)


def probe_is_harmless(
    probe: BindRequest,
    *,
    bucket_exists: bool,
    prober_uid: int,
    bucket: BucketState | None = None,
    settings: KernelSettings | None = None,
) -> bool:
    """Does a trial bind of ``probe`` leave the kernel's answer to EVERY later bind unchanged?

    A failed bind changes nothing (inet_csk_get_port jumps past inet_csk_update_fastreuse). A
    TCP bind that succeeds rewrites the port's bind bucket (one per port and netns, whatever
    the address), and the bucket keeps that state after the probe closes, until its last
    socket leaves. So a probe is harmless only when:

    * it is UDP: udp_lib_get_port keeps no cache (it checks the sockets every time); or
    * no TCP socket is on the port: the probe creates a fresh bucket and destroys it on close
      (inet_put_port -> inet_bind_bucket_destroy); or
    * the bucket's fields are known and the probe's update leaves every one as it is:
      ``tb->fastreuse`` (to 0 without SO_REUSEADDR; -1 counts as a change: connect() reads
      it), and ``tb->fastreuseport`` (to 0 without SO_REUSEPORT; reset to the probe's uid and
      address -- ours, whatever the user asked -- with SO_REUSEPORT unless it already matches).

    An unknown bucket is never harmless: the SO_REUSEPORT cache may hold the uid and address of
    a socket that has since cleared the flag or closed, and a probe bound on *another* address
    clears or resets it for someone else's later bind (issue 17: a bind on 127.0.0.2 took the
    fast path away from a SO_REUSEPORT bind on 127.0.0.1).
    """
    if probe.proto is Proto.UDP or not bucket_exists:
        return True
    if bucket is None:
        return False
    if not probe.reuseaddr and bucket.fastreuse != 0:
        return False
    if not probe.reuseport:
        return bucket.fastreuseport == 0
    cache = bucket.cache
    if cache is None:
        return False
    return _cache_match(cache, replace(probe, uid=prober_uid), settings or KernelSettings())


def _race_notes(req: BindRequest, holders: Sequence[Holder], settings: KernelSettings) -> list[str]:
    """Bound-inactive SO_REUSEADDR peers: whoever calls listen() first wins (C3, D7)."""
    if req.proto is not Proto.TCP or not req.reuseaddr:
        return []
    peers = [
        h
        for h, _ in _relevant(req, holders, settings)
        if h.socket.state is State.BOUND_INACTIVE and h.opts.reuseaddr is not False
    ]
    return [
        f"{_describe(h.socket)} shares the port through SO_REUSEADDR: whichever calls listen() first "
        "wins, the other's listen() fails with EADDRINUSE (inet_csk_listen_start checks again)"
        for h in peers
    ]


def _unknown_notes(blockers: Iterable[Blocker]) -> list[str]:
    out = []
    for b in blockers:
        own = [f for f in b.decided_by if f not in _GLOBAL_FLAGS]  # the others have their own note
        if own:
            flags = " and ".join(str(f) for f in own)
            out.append(
                f"depends on the {flags} of {_describe(b.holder.socket)}: EADDRINUSE if it blocks, ok if not"
            )
    return out


def _as_outcome(c: _Check, stage: Stage, notes: list[str]) -> Outcome:
    all_notes = tuple(notes + list(c.notes) + _unknown_notes(c.blockers))
    if c.verdict is Verdict.OK:
        return Outcome(Verdict.OK, notes=all_notes)
    return Outcome(c.verdict, EADDRINUSE, stage, c.blockers, all_notes)


def evaluate(
    req: BindRequest,
    holders: Iterable[Holder],
    settings: KernelSettings,
    *,
    port: PortState | None = None,
    cache: ReuseportCache | _Unset | None = _UNSET,
) -> Outcome:
    """Predict bind() (and, for TCP with ``req.listen``, listen()) against the sockets on the port.

    ``holders``: the sockets in this netns (others are ignored: other port/protocol). ``port``:
    what the kernel keeps beside them (the TCP bucket's fast-reuse fields, whether the UDP
    holders are in hash-chain order); not given = unknown, and an answer that hinges on it is
    DEPENDS. ``cache``: shorthand for a known bucket whose SO_REUSEPORT cache is this (None:
    tb->fastreuseport = 0), as the kernel oracle tracks it.
    """
    hs = list(holders)
    ps = _port_state(port, cache)
    pre = _pre_checks(req, settings)
    if pre is not None:
        return pre
    if req.port == 0:
        return Outcome(Verdict.OK, notes=("port 0: the kernel picks a free port (inet_csk_find_open_port)",))
    bound = _check(req, hs, settings, ps, Stage.BIND)
    if bound.verdict is not Verdict.OK or req.proto is not Proto.TCP or not req.listen:
        return _as_outcome(bound, Stage.BIND, _race_notes(req, hs, settings))
    # listen(): inet_csk_listen_start() runs get_port again, now that our bind joined the bucket.
    after = replace(ps, bucket=bucket_after(ps.bucket, req, settings))
    listened = _check(req, hs, settings, after, Stage.LISTEN)
    notes = list(bound.notes) + _race_notes(req, hs, settings)
    return _as_outcome(listened, Stage.LISTEN, notes)


def check_listen(
    req: BindRequest,
    holders: Iterable[Holder],
    settings: KernelSettings,
    *,
    port: PortState | None = None,
    cache: ReuseportCache | _Unset | None = _UNSET,
) -> Outcome:
    """Predict listen() for a TCP socket that is already bound as ``req`` describes.

    ``holders`` must not include the socket itself. ``port``/``cache`` are the bucket state now
    (after the socket's own bind and whatever joined since).
    """
    if req.proto is not Proto.TCP:
        raise ValueError("listen() is TCP only")
    hs = list(holders)
    ps = _port_state(port, cache)
    return _as_outcome(_check(req, hs, settings, ps, Stage.LISTEN), Stage.LISTEN, [])


def other_addresses(req: BindRequest, settings: KernelSettings) -> list[tuple[IPAddress, bool | None]]:
    """Addresses worth offering: leftovers hold only their own concrete address (A3)."""
    cands: list[tuple[IPAddress, bool | None]] = [
        (IPv4Address("127.0.0.1"), None),
        (IPv4Address("127.0.0.2"), None),
        (IPv4Address("127.0.0.3"), None),
        (IPv6Address("::1"), None),
    ]
    if req.addr.version == 4 and req.addr.is_unspecified:
        cands.append((IPv6Address("::"), True))
    out = []
    for a, v6 in cands:
        if a == req.addr:
            continue
        if settings.local_addresses is not None and not a.is_loopback and a not in settings.local_addresses:
            continue
        out.append((a, v6))
    return out


def alternative_requests(req: BindRequest, settings: KernelSettings) -> list[BindRequest]:
    """The same bind on the other addresses worth offering (in the order they are tried)."""
    return [
        replace(req, addr=a, v6only=v6 if a.version == 6 else None)
        for a, v6 in other_addresses(req, settings)
    ]


def alternatives(
    req: BindRequest,
    holders: Iterable[Holder],
    settings: KernelSettings,
    *,
    port: PortState | None = None,
    cache: ReuseportCache | _Unset | None = _UNSET,
    works: Callable[[Alternative], bool] | None = None,
) -> tuple[Alternative, ...]:
    """What else could be bound now: plain / SO_REUSEADDR / SO_REUSEPORT / another address.

    Every variant is returned with its prediction (check ``.works``); at most one of the other
    addresses (the first that works) is included. ``works`` overrides what "works" means for
    that choice (`why` passes the kernel's trial where one ran).
    """
    hs = list(holders)
    ps = _port_state(port, cache)
    flag_variants = [
        ("as asked", req),
        ("plain bind()", replace(req, reuseaddr=False, reuseport=False)),
        ("with SO_REUSEADDR", replace(req, reuseaddr=True, reuseport=False)),
        ("with SO_REUSEPORT", replace(req, reuseaddr=False, reuseport=True)),
        ("with SO_REUSEADDR and SO_REUSEPORT", replace(req, reuseaddr=True, reuseport=True)),
    ]
    out: list[Alternative] = []
    seen: set[BindRequest] = set()
    for label, r in flag_variants:
        if r not in seen:
            seen.add(r)
            out.append(Alternative(label, r, evaluate(r, hs, settings, port=ps)))
    for r in alternative_requests(req, settings):
        a, v6 = r.addr, r.v6only
        shown = f"[{a}]" if a.version == 6 else str(a)
        alt = Alternative(
            f"on {shown}" + (" (IPV6_V6ONLY)" if v6 else ""), r, evaluate(r, hs, settings, port=ps)
        )
        if works(alt) if works is not None else alt.works:
            out.append(alt)
            break
    return tuple(out)
