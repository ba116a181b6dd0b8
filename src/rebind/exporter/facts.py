"""What one scrape knows, and what follows from it. Pure: no I/O, no prometheus-client.

Two judgements here are placeholders for shared layers being built elsewhere, each kept in one
function so it can be swapped:

* :func:`assess_bindable` uses the conflict model (``model.conflict.evaluate``) over the socket
  table, never a trial bind (a scrape must not perturb kernel state). The middle layer's
  observer-free "bindable now" assessment replaces it.
* :func:`connect_counts` / :func:`bind_held_ports` are a small count over the socket table and the
  ``ip_local_port_range`` / ``ip_local_reserved_ports`` sysctls (connect-rules.md §0.2 step 4
  without the parts inet_diag cannot show). ``why --connect``'s client model replaces them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from rebind.model.conflict import BindRequest, Holder, KernelSettings, Outcome, SockOpts, Verdict, evaluate
from rebind.model.records import IPAddress, Proto, SocketRecord, State

WILDCARD4 = IPv4Address("0.0.0.0")


@dataclass(frozen=True, slots=True, order=True)
class Watch:
    """A watched server port (``--watch PORT[/udp]``)."""

    port: int
    proto: Proto = Proto.TCP


@dataclass(frozen=True, slots=True, order=True)
class Dest:
    """A watched destination (``--dest HOST:PORT``); HOST resolved once, at start-up."""

    addr: IPAddress
    port: int
    host: str = ""


class Reason(enum.StrEnum):
    """Why a metric is missing (the ``reason`` label of rebind_exporter_missing)."""

    NETLINK_UNAVAILABLE = "netlink_unavailable"
    PERMISSION_DENIED = "permission_denied"
    KERNEL_TOO_OLD = "kernel_too_old"
    KERNEL_ERROR = "kernel_error"
    SYSCTL_UNREADABLE = "sysctl_unreadable"
    NO_ROUTE = "no_route"


@dataclass(frozen=True, slots=True, order=True)
class Missing:
    metric: str
    reason: Reason


@dataclass(frozen=True, slots=True)
class EphemeralRange:
    """``ip_local_port_range`` and ``ip_local_reserved_ports`` of the scraped netns."""

    lo: int
    hi: int
    reserved: frozenset[int] = frozenset()

    def __contains__(self, port: object) -> bool:
        """A port connect() may choose: inside the range and not reserved."""
        return isinstance(port, int) and self.lo <= port <= self.hi and port not in self.reserved

    @property
    def size(self) -> int:
        """Ports connect() may choose from (the range minus reserved ports)."""
        return self.hi - self.lo + 1 - sum(1 for p in self.reserved if self.lo <= p <= self.hi)


#: Peers per watched port in rebind_port_peer_sockets; the rest are summed as "other".
TOP_PEERS = 5
OTHER = "other"


@dataclass(frozen=True, slots=True)
class PeerCount:
    watch: Watch
    peer: str
    sockets: int


@dataclass(frozen=True, slots=True)
class DestUsage:
    dest: Dest
    src: IPAddress
    live: frozenset[int]
    timewait: frozenset[int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape gathered. ``None`` means "could not be gathered" (see ``missing``)."""

    watches: tuple[Watch, ...] = ()
    dests: tuple[Dest, ...] = ()
    #: The sockets on watched ports that the conflict model needs: listeners, bound-inactive and
    #: bound UDP sockets, and connections that are not a listener's children (see Tally.conn).
    #: Children and TIME_WAIT leftovers are only counted (``counts``, ``tw_expires_ms``).
    watched: tuple[SocketRecord, ...] | None = ()
    #: Sockets on watched ports by state: ((watch, state), n).
    counts: tuple[tuple[tuple[Watch, State], int], ...] = ()
    #: The longest TIME_WAIT/FIN_WAIT2 timer left on each watched TCP port (ms).
    tw_expires_ms: tuple[tuple[Watch, int], ...] = ()
    #: Connections to each dest, by source address: which ports are live and which in TIME_WAIT.
    usage: tuple[DestUsage, ...] | None = ()
    #: Connections on watched TCP ports by remote address: top TOP_PEERS per port, then "other".
    peers: tuple[PeerCount, ...] = ()
    #: TCP LISTEN and bound-inactive sockets whose local port lies in the ephemeral range.
    bound_in_range: tuple[SocketRecord, ...] | None = ()
    ephemeral: EphemeralRange | None = None
    #: The source address the route to each dest selects (None: no route).
    sources: tuple[tuple[Dest, IPAddress | None], ...] = ()
    settings: KernelSettings = field(default_factory=KernelSettings)
    #: False when the table came from /proc/net (no bound-inactive sockets there).
    bound_inactive_visible: bool = True
    source: str = "netlink"
    missing: tuple[Missing, ...] = ()
    duration_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Server ports


def norm(a: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it carries."""
    if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def on_port(records: Iterable[SocketRecord], w: Watch) -> list[SocketRecord]:
    return [r for r in records if r.local.port == w.port and r.proto is w.proto]


def server_addresses(records: Sequence[SocketRecord], w: Watch) -> list[IPAddress]:
    """The addresses a server uses on the port: those of its listeners (TCP) or bound sockets
    (UDP) and bound-inactive sockets; 0.0.0.0 when there are none. Bounded by the sockets a
    server opens, not by its clients."""
    kinds = {State.LISTEN, State.BOUND_INACTIVE} if w.proto is Proto.TCP else {State.CLOSE}
    seen = sorted({r.local.addr for r in on_port(records, w) if r.state in kinds}, key=_addr_key)
    return seen or [WILDCARD4]


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return (a.version, int(a))


def _restart_holders(records: Sequence[SocketRecord], w: Watch, addr: IPAddress) -> list[Holder]:
    """The sockets a restart of the server on ``addr`` would meet, with assumed flags.

    A restart closes the server's own listener (or bound UDP socket) on ``addr``, so those are
    left out. Its accepted connections and ownerless leftovers (TIME_WAIT, orphaned FIN_WAIT2)
    carry the listener's SO_REUSEADDR (inet_twsk_alloc copies sk_reuse, inherited at accept()),
    which nobody can read without signalling-grade access to the process; they are assumed to
    have it, as the restarting server is assumed to. Every other socket (a client that took the
    port as its ephemeral source, a stray bind) is assumed to have neither flag: it blocks.
    """
    mine = {State.LISTEN} if w.proto is Proto.TCP else {State.CLOSE}
    listeners = [r for r in on_port(records, w) if r.state is State.LISTEN]
    out: list[Holder] = []
    for r in on_port(records, w):
        if r.state in mine and norm(r.local.addr) == norm(addr):
            continue
        child = r.remote.port != 0 and any(
            lst.local.is_wildcard or norm(lst.local.addr) == norm(r.local.addr) for lst in listeners
        )
        server_side = r.proto is Proto.TCP and (child or r.is_mini)
        opts = SockOpts(reuseaddr=True, reuseport=False) if server_side else SockOpts(False, False)
        out.append(Holder(r, opts))
    return out


def assess_bindable(
    records: Sequence[SocketRecord], w: Watch, addr: IPAddress, settings: KernelSettings
) -> Outcome:
    """Would the server on ``addr:port`` get its port back if it restarted now?

    The request is a restarting server's: bind() with SO_REUSEADDR (what nearly every server
    sets) and, for TCP, listen(). Privilege is assumed (the server has it). Judged by the
    conflict model only -- no trial bind, so a scrape never changes a bind bucket's state.
    Swap for the middle layer's observer-free assessment when it lands.
    """
    req = BindRequest(
        proto=w.proto,
        addr=addr,
        port=w.port,
        reuseaddr=True,
        v6only=None,
        listen=w.proto is Proto.TCP,
        freebind=True,  # a configured server address; local_addresses is not re-checked per scrape
    )
    holders = _restart_holders(records, w, addr)
    return evaluate(req, holders, _server_settings(settings))


def _server_settings(s: KernelSettings) -> KernelSettings:
    return KernelSettings(
        unprivileged_port_start=s.unprivileged_port_start,
        bindv6only=s.bindv6only,
        cap_net_bind_service=True,
        local_addresses=None,
        ip_local_port_range=s.ip_local_port_range,
        ip_local_reserved_ports=s.ip_local_reserved_ports,
        kernel_version=s.kernel_version,
    )


def bindable_value(outcome: Outcome) -> int:
    """1 when the model says the bind works; 0 when it fails (DEPENDS cannot arise: every
    holder's flags are assumed above)."""
    return 1 if outcome.verdict is Verdict.OK else 0


def frees_in_seconds(snap: Snapshot, w: Watch) -> float:
    """Seconds until the last timed leftover (TIME_WAIT, orphaned FIN_WAIT2) on the port expires:
    after that, even a server without SO_REUSEADDR binds, unless a live socket holds the port.
    0 when none is left."""
    return dict(snap.tw_expires_ms).get(w, 0) / 1000.0


def state_label(s: State) -> str:
    """Lower-case state names: ``ss`` spelling with underscores (bound_inactive, time_wait)."""
    return s.label.lower()


#: The states each protocol's sockets can be in, as exported (a zero is exported for each, so
#: alerts need no ``absent()``). NEW_SYN_RECV shares syn_recv's label.
TCP_STATES = tuple(s for s in State if s not in (State.CLOSE, State.NEW_SYN_RECV))
UDP_STATES = (State.CLOSE, State.ESTABLISHED)


def state_counts(snap: Snapshot, w: Watch) -> dict[str, int]:
    states = TCP_STATES if w.proto is Proto.TCP else UDP_STATES
    out = {state_label(s): 0 for s in states}
    for (watch, state), n in snap.counts:
        if watch == w:
            label = state_label(state)
            out[label] = out.get(label, 0) + n
    return out


@dataclass(frozen=True, slots=True)
class ListenerGroup:
    """The TCP listeners on one address and port: one socket, or a SO_REUSEPORT group."""

    port: int
    addr: IPAddress
    size: int
    #: The fullest member's accept queue and backlog (a reuseport group balances by hash, so one
    #: member can overflow while the sum looks fine).
    accept_queue: int
    backlog: int


def listener_groups(records: Sequence[SocketRecord], watches: Sequence[Watch]) -> list[ListenerGroup]:
    """For listeners, inet_diag reports sk_ack_backlog as rqueue and sk_max_ack_backlog as wqueue
    (inet_diag_msg_common_fill / tcp_diag_get_info)."""
    tcp_ports = {w.port for w in watches if w.proto is Proto.TCP}
    groups: dict[tuple[int, IPAddress], list[SocketRecord]] = {}
    for r in records:
        if r.proto is Proto.TCP and r.state is State.LISTEN and r.local.port in tcp_ports:
            groups.setdefault((r.local.port, r.local.addr), []).append(r)
    out = []
    for (port, addr), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _addr_key(kv[0][1]))):
        fullest = max(members, key=_fill)
        out.append(ListenerGroup(port, addr, len(members), fullest.rqueue, fullest.wqueue))
    return out


def _fill(m: SocketRecord) -> tuple[float, int]:
    return (m.rqueue / m.wqueue if m.wqueue else float(m.rqueue > 0), m.rqueue)


# --------------------------------------------------------------------------------------------
# Client side: a count over the socket table (switch to the `why --connect` model at merge)


def bind_held_ports(bound: Iterable[SocketRecord], rng: EphemeralRange) -> frozenset[int]:
    """Ephemeral-range ports whose bind bucket bind() created: connect() skips them whatever the
    destination (__inet_hash_connect: tb->fastreuse >= 0). Counted from TCP listeners and
    bound-inactive sockets (their children share their port). A lower bound: a bind-before-
    connect client socket inside the range looks like any connection (connect-rules.md §8)."""
    return frozenset(
        r.local.port
        for r in bound
        if r.proto is Proto.TCP and r.state in (State.LISTEN, State.BOUND_INACTIVE) and r.local.port in rng
    )


@dataclass(frozen=True, slots=True)
class ConnectCount:
    src: IPAddress
    dest: Dest
    #: Ports connect() can certainly take for (src, dst, dport) now.
    free: int
    #: TIME_WAIT entries (src, *, dst, dport) in the range: each holds its port until it expires
    #: or tcp_tw_reuse lets connect() take it over (not counted as free).
    timewait: int
    #: Live connections (src, *, dst, dport) on ports of the range.
    live: int


def connect_counts(
    dest: Dest, src: IPAddress, usage: Iterable[DestUsage], rng: EphemeralRange, held: frozenset[int]
) -> ConnectCount:
    """connect-rules.md §0.2 step 4, as far as inet_diag shows it: a candidate port is free unless
    bind() holds it, or the 4-tuple (src, port, dst, dport) is taken by a live connection or a
    TIME_WAIT entry (whether tcp_tw_reuse would take that one over is not counted)."""
    live: set[int] = set()
    tw: set[int] = set()
    s = norm(src)
    for u in usage:
        if u.dest == dest and norm(u.src) == s:
            live.update(p for p in u.live if p in rng)
            tw.update(p for p in u.timewait if p in rng)
    taken = held | live | tw
    return ConnectCount(src, dest, rng.size - len(taken), len(tw - held - live), len(live - held))


# --------------------------------------------------------------------------------------------
# Configuration warnings


class WarningKind(enum.StrEnum):
    #: A watched server port inside ip_local_port_range and not in ip_local_reserved_ports:
    #: an outgoing connection can take it while the server is down (kubernetes#111682).
    SERVER_PORT_IN_EPHEMERAL_RANGE = "server_port_in_ephemeral_range"
    #: ip_local_port_range holds an odd number of ports: each connect() cannot reach one end
    #: (connect-rules.md C1).
    EPHEMERAL_RANGE_ODD = "ephemeral_range_odd"
    #: The socket table came from /proc/net: bound-inactive sockets (which block binds) are invisible.
    SOCKET_TABLE_FROM_PROCFS = "socket_table_from_procfs"


def config_warnings(snap: Snapshot) -> dict[WarningKind, int]:
    """Each kind's count (0 when fine; every kind is always exported)."""
    out = dict.fromkeys(WarningKind, 0)
    if snap.ephemeral is not None:
        inside = {w.port for w in snap.watches if w.port in snap.ephemeral}
        out[WarningKind.SERVER_PORT_IN_EPHEMERAL_RANGE] = len(inside)
        out[WarningKind.EPHEMERAL_RANGE_ODD] = (snap.ephemeral.hi - snap.ephemeral.lo + 1) % 2
    out[WarningKind.SOCKET_TABLE_FROM_PROCFS] = int(snap.source == "procfs")
    return out


# --------------------------------------------------------------------------------------------
# Tally: one pass over a dump, counting what needs no model and keeping what does


def addr_key(a: IPAddress) -> bytes:
    """The comparison key of an address: 4 bytes for IPv4 and v4-mapped IPv6, else 16."""
    return norm(a).packed


_WILDCARDS = (bytes(4), bytes(16))
_SERVER_STATES = (State.LISTEN, State.BOUND_INACTIVE)


class Tally:
    """Accumulates one scrape (mutable while gathering, then frozen into a Snapshot).

    Feed listeners and bound sockets first (``server``), then connections (``conn``): whether a
    connection is a listener's child depends on the listeners of its port. ``conn`` runs once
    per socket of the connection walk (thousands per scrape): plain ints and bytes only.
    """

    def __init__(self, watches: Iterable[Watch], dests: Iterable[Dest]) -> None:
        watches = tuple(watches)
        self.watch_set = frozenset(watches)
        self.tcp_ports = frozenset(w.port for w in watches if w.proto is Proto.TCP)
        self.dests = {(addr_key(d.addr), d.port): d for d in dests}
        self._server_counts: dict[tuple[Watch, State], int] = {}
        self._conn_counts: dict[tuple[int, int], int] = {}
        self._tw_max: dict[int, int] = {}
        self._peers: dict[tuple[int, bytes], int] = {}
        self.listeners: dict[int, set[bytes]] = {}
        self.usage: dict[tuple[Dest, bytes], tuple[set[int], set[int]]] = {}

    def server(self, r: SocketRecord) -> None:
        """A TCP listener or bound-inactive socket, or a UDP socket, on a watched port."""
        key = (Watch(r.local.port, r.proto), r.state)
        self._server_counts[key] = self._server_counts.get(key, 0) + 1
        if r.state is State.LISTEN:
            self.listeners.setdefault(r.local.port, set()).add(addr_key(r.local.addr))

    def conn(
        self, state: int, mini: bool, sport: int, dport: int, src: bytes, dst: bytes, expires: int
    ) -> bool:
        """A TCP connection-table socket (state as its number, addresses as keys). True when the
        conflict model needs it: a socket on a watched port that is neither a TIME_WAIT leftover
        nor a child of a listener on its port (children and leftovers carry the server's flags)."""
        wanted = False
        if sport in self.tcp_ports:
            key = (sport, state)
            self._conn_counts[key] = self._conn_counts.get(key, 0) + 1
            pkey = (sport, dst)
            self._peers[pkey] = self._peers.get(pkey, 0) + 1
            if mini:
                if expires > self._tw_max.get(sport, -1):
                    self._tw_max[sport] = expires
            else:
                keys = self.listeners.get(sport, ())
                child = dport != 0 and (src in keys or _WILDCARDS[0] in keys or _WILDCARDS[1] in keys)
                wanted = not child
        d = self.dests.get((dst, dport))
        if d is not None:
            live, tw = self.usage.setdefault((d, src), (set(), set()))
            (tw if mini or state == State.TIME_WAIT else live).add(sport)
        return wanted

    def records(self, recs: Iterable[SocketRecord]) -> list[SocketRecord]:
        """Feed whole records (the /proc/net path, tests): servers first, then connections.
        Returns the records the conflict model needs (what ``Snapshot.watched`` holds)."""
        recs = list(recs)
        wanted: list[SocketRecord] = []
        for r in recs:
            if (r.proto is Proto.UDP or r.state in _SERVER_STATES) and Watch(
                r.port, r.proto
            ) in self.watch_set:
                self.server(r)
                wanted.append(r)
        for r in recs:
            if r.proto is Proto.TCP and r.state not in _SERVER_STATES:
                keys = (addr_key(r.local.addr), addr_key(r.remote.addr))
                if self.conn(int(r.state), r.is_mini, r.port, r.remote.port, *keys, r.expires_ms or 0):
                    wanted.append(r)
        return wanted

    @property
    def counts(self) -> dict[tuple[Watch, State], int]:
        out = dict(self._server_counts)
        for (port, st), n in self._conn_counts.items():
            key = (Watch(port), State(st))
            out[key] = out.get(key, 0) + n
        return out

    @property
    def tw_max(self) -> dict[Watch, int]:
        return {Watch(p): ms for p, ms in self._tw_max.items()}

    def peers(self, k: int = TOP_PEERS) -> tuple[PeerCount, ...]:
        """The ``k`` remote addresses with the most sockets on each watched TCP port, and the
        rest summed as "other": bounded whatever the number of clients."""
        by_port: dict[int, list[tuple[int, bytes]]] = {}
        for (port, peer), n in self._peers.items():
            by_port.setdefault(port, []).append((n, peer))
        out: list[PeerCount] = []
        for port, items in sorted(by_port.items()):
            items.sort(key=lambda item: (-item[0], item[1]))
            out += [PeerCount(Watch(port), str(_from_key(peer)), n) for n, peer in items[:k]]
            rest = sum(n for n, _ in items[k:])
            if rest:
                out.append(PeerCount(Watch(port), OTHER, rest))
        return tuple(out)

    def dest_usage(self) -> tuple[DestUsage, ...]:
        return tuple(
            DestUsage(d, _from_key(src), frozenset(live), frozenset(tw))
            for (d, src), (live, tw) in self.usage.items()
        )


def _from_key(key: bytes) -> IPAddress:
    return IPv4Address(key) if len(key) == 4 else IPv6Address(key)
