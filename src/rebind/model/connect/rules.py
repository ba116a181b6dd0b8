"""The kernel's port rules for one candidate port: the effective range (C3), whose 4-tuple a
socket holds, bind() or connect() origin, address overlap (inet_rcv_saddr_equal, shared with
the bind model), the per-port map of the range (:class:`PortMap`), and the classification of a
port for each way a client gets one: connect()'s own choice, bind(ip, 0), UDP autobind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv6Address
from typing import TYPE_CHECKING

from rebind.model.connect.facts import ConnectSettings, PortHolder
from rebind.model.connect.outcome import PortUse
from rebind.model.connect.request import ConnectRequest, norm_addr
from rebind.model.connect.tw import tw_reuse_check
from rebind.model.records import IPAddress, SocketRecord, State

if TYPE_CHECKING:
    from rebind.model.conflict.addresses import KAddr

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


def _tuple_family(r: SocketRecord) -> int:
    """4 for an IPv4 4-tuple (v4-mapped IPv6 sockets included, C24), 6 otherwise."""
    return norm_addr(r.local.addr).version


def same_tuple(r: SocketRecord, src: IPAddress, dst: IPAddress, dport: int) -> bool:
    # C25: a device-pinned socket matches only a new socket pinned to the same device (ours is not).
    if r.ifindex:
        return False
    return (
        r.remote.port == dport
        and norm_addr(r.remote.addr) == dst
        and norm_addr(r.local.addr) == src
        and _tuple_family(r) == dst.version
    )


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


def _holder_kaddr(h: PortHolder) -> KAddr:
    """The holder as inet_rcv_saddr_equal() compares it: (sk_v6_rcv_saddr, sk_rcv_saddr, ipv6only).

    Every IPv6 socket on a specific non-mapped address has sk_rcv_saddr = LOOPBACK4_IPV6
    (127.0.0.6), whether bind() put it there (__inet6_bind) or connect() / accept() did
    (tcp_v6_connect, ip6_datagram_connect, tcp_v6_syn_recv_sock); only bind() forces ipv6only on.
    So: ``bound_kaddr``'s address with the holder's own ipv6only -- an IPv6 client whose source
    came from connect() keeps ipv6only = 0 and overlaps an IPv4 wildcard (the J8 experiment:
    dual-stack UDP clients block IPv4 autobinds), but not a specific IPv4 address. The bind
    model's holders are built the same way (``conflict/addresses._kaddr``); what is this
    model's own is the guess of an unknown ipv6only below.
    """
    from rebind.model.conflict.addresses import bound_kaddr  # the bind model, where it is used

    r = h.socket
    if r.v6only is not None:
        v6only = r.v6only
    else:
        # Unknown (inet_diag reports it for LISTEN/CLOSE only): a specific address that was
        # bind()-ed forces it on; one chosen by connect() (or a child's) leaves it off.
        connected = r.remote.port != 0
        v6only = not r.local.addr.is_unspecified and not (connected and h.explicit is not True)
    a = r.local.addr
    k = bound_kaddr(a, v6only)
    if isinstance(a, IPv6Address) and a.ipv4_mapped is None:
        k = replace(k, ipv6only=v6only)  # IPv4 and v4-mapped sockets: ipv6only is 0 whatever the record says
    return k


def _addr_overlap(new: IPAddress, new_v6only: bool, h: PortHolder) -> bool:
    """inet_rcv_saddr_equal(new, holder, true): the new socket as bind() leaves it (a specific
    IPv6 address forces ipv6only; [::] keeps ``new_v6only``)."""
    from rebind.model.conflict.addresses import bound_kaddr, rcv_saddr_equal

    return rcv_saddr_equal(bound_kaddr(new, new_v6only), _holder_kaddr(h))


#: The uses a connect() cannot take (PortUse.usable false), for the passes over every stored port.
_UNUSABLE = frozenset(u for u in PortUse if not u.usable)


class PortMap:
    """How each port of [lo, hi] stands; ports not set are FREE. Only ports that some socket uses
    (or that are reserved) are stored, so a 28,232-port range costs nothing to account for.
    The counts are tallied once (one pass over the stored ports, per use and per parity) and
    kept until the next change: the accounting asks a dozen of them of a map of ~14k ports."""

    __slots__ = ("_tally", "hi", "lo", "special")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.special: dict[int, PortUse] = {}
        self._tally: tuple[Counter[PortUse], Counter[PortUse]] | None = None

    def __setitem__(self, port: int, use: PortUse) -> None:
        self._tally = None
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

    def _tallied(self, parity_of_lo: bool) -> Counter[PortUse]:
        """Stored ports per use: all of them, or those of lo's parity."""
        if self._tally is None:
            lo = self.lo
            every = Counter(self.special.values())  # first-seen order, as the loop it replaces
            even = Counter([u for p, u in self.special.items() if not (p - lo) & 1])
            self._tally = (every, even)
        return self._tally[1] if parity_of_lo else self._tally[0]

    def counts(self) -> dict[str, int]:
        out = {u.value: n for u, n in self._tallied(False).items()}
        free = self.total - len(self.special)
        if free:
            out[PortUse.FREE.value] = free
        return out

    def usable_count(self, *, parity_of_lo: bool = False) -> int:
        n = (self.total + 1) // 2 if parity_of_lo else self.total
        return n - sum(k for u, k in self._tallied(parity_of_lo).items() if u in _UNUSABLE)

    def count(self, use: PortUse, *, parity_of_lo: bool = False) -> int:
        tally = self._tallied(parity_of_lo)
        if use is PortUse.FREE:
            n = (self.total + 1) // 2 if parity_of_lo else self.total
            return n - sum(tally.values())
        return tally[use]

    def unusable_in(self, a: int, b: int) -> int:
        """Stored ports of [a, b] that are not usable."""
        unusable = _UNUSABLE
        return sum(1 for p, u in self.special.items() if u in unusable and a <= p <= b)

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
        if not interior:
            return False
        # the stored unusable ports (tallied) but the two ends
        unusable, get = _UNUSABLE, self.special.get
        bad = sum(k for u, k in self._tallied(False).items() if u in unusable)
        bad -= (get(self.lo) in unusable) + (get(self.hi) in unusable)
        return interior - bad > 0


def classify_own_choice(
    req: ConnectRequest,
    src: IPAddress,
    on_port: Sequence[PortHolder],
    settings: ConnectSettings,
    assume_ambiguous: bool,
    bind_made: bool | None = None,
) -> tuple[PortUse, PortHolder | None]:
    """__inet_hash_connect for one candidate (C4–C9).

    ``bind_made``: the port's bucket as the bind hash shows it (RangeBuckets), where ``on_port``
    need not be every socket of the port: True not connect()-made (connect() skips it, C6),
    False connect()-made (held: shared unless the 4-tuple is taken); None: no bucket read, or
    none there -- ``on_port`` is all there is."""
    if not on_port and bind_made is None:
        return PortUse.FREE, None
    explicit = [h for h in on_port if _is_explicit(h, assume_ambiguous)]
    if explicit or bind_made:
        # A listener or a bound-inactive socket (all of them among the holders) names its kind;
        # any other socket of a bind-made bucket is a client that bound its port.
        kinds = {_explicit_kind(h) for h in explicit}
        if bind_made:
            kinds.add(PortUse.BIND_BEFORE_CONNECT)
        first = min(kinds, key=_USE_ORDER.__getitem__)
        return first, next((h for h in explicit if _explicit_kind(h) is first), None)
    tw_hit: PortHolder | None = None
    for h in on_port:
        r = h.socket
        if not same_tuple(r, src, req.dst, req.dport):
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


#: PortUse's declaration order: the first explicit kind of a port is the one reported.
_USE_ORDER = {u: i for i, u in enumerate(PortUse)}


def classify_bind_any(
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


def classify_udp(
    req: ConnectRequest, new: IPAddress, on_port: Sequence[PortHolder], uid: int
) -> tuple[PortUse, PortHolder | None]:
    """udp_lib_get_port(sk, 0) for one candidate (C20–C23)."""
    for h in on_port:
        if h.socket.ifindex:
            continue  # a device-bound UDP socket does not overlap an unbound one... unless same dev
        if _addr_overlap(new, False, h) and not _udp_shares(req, h):
            return PortUse.OVERLAPPING_OWNER, h
    return PortUse.FREE, None
