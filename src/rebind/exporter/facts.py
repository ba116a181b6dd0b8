"""What one scrape knows, and what follows from it. Pure: no I/O, no prometheus-client.

* "Would a restart bind?" is the one assessment of rebind (``model.assess.judge``: the conflict
  model over the socket table, never a trial bind -- a scrape must not perturb kernel state), for
  each address the operator watches, with the facts this module assembles once per port
  (:func:`port_holders`, :func:`restart_request`).
* :func:`connect_counts` / :func:`bind_held_ports` are a small count over the socket table and the
  ``ip_local_port_range`` / ``ip_local_reserved_ports`` sysctls (connect-rules.md §0.2 step 4
  without the parts inet_diag cannot show). ``why --connect``'s client model replaces them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from rebind.errors import UsageError
from rebind.model.assess import (
    BindNow,
    HolderFacts,
    Judgement,
    Provenance,
    judge,
    kernel_holder,
    kernel_state_of,
    port_state,
)
from rebind.model.conflict import BindRequest, Flag, KernelSettings, SockOpts
from rebind.model.records import Family, IPAddress, Proto, SocketEntry, SocketRecord, State, fmt_addr
from rebind.model.sockstate import SockState

WILDCARD4 = IPv4Address("0.0.0.0")


@dataclass(frozen=True, slots=True, order=True)
class PortKey:
    """A watched port and protocol: what per-port metrics (states, peers, timers) are keyed by."""

    port: int
    proto: Proto = Proto.TCP


def _check_port(port: object, what: str) -> int:
    from rebind.model.validate import parse_port

    if not isinstance(port, int):
        raise UsageError(f"{what} {port!r} is not a port number (1-65535)")
    return parse_port(port, what=what)


def _check_addr(addr: object, what: str) -> IPAddress:
    if isinstance(addr, IPv4Address | IPv6Address):
        return addr
    try:
        return ip_address(str(addr))
    except ValueError:
        raise UsageError(f"{what} {addr!r} is not an IP address") from None


@dataclass(frozen=True, slots=True)
class Watch:
    """A watched server (``--watch [ADDR:]PORT[/udp]``): the address a restart binds (by default
    the IPv4 wildcard; ``[::]`` for a dual-stack server), the port and protocol. Validated here,
    so the API (``RebindCollector``) refuses what the command line refuses."""

    port: int
    proto: Proto = Proto.TCP
    addr: IPAddress = WILDCARD4

    def __post_init__(self) -> None:
        _check_port(self.port, "Watch port")
        try:
            proto = Proto(self.proto)
        except ValueError:
            raise UsageError(f"Watch proto {self.proto!r}: tcp or udp") from None
        object.__setattr__(self, "proto", proto)
        object.__setattr__(self, "addr", _check_addr(self.addr, "Watch addr"))

    @property
    def key(self) -> PortKey:
        return PortKey(self.port, self.proto)

    def sort_key(self) -> tuple[int, str, int, int]:
        return (self.port, self.proto.value, self.addr.version, int(self.addr))


@dataclass(frozen=True, slots=True)
class Dest:
    """A watched destination (``--dest HOST:PORT``); HOST resolved once, at start-up."""

    addr: IPAddress
    port: int
    host: str = ""

    def __post_init__(self) -> None:
        _check_port(self.port, "Dest port")
        object.__setattr__(self, "addr", _check_addr(self.addr, "Dest addr"))

    def sort_key(self) -> tuple[int, int, int]:
        return (self.addr.version, int(self.addr), self.port)


class Reason(enum.StrEnum):
    """Why a metric is missing (the ``reason`` label of rebind_exporter_missing)."""

    NETLINK_UNAVAILABLE = "netlink_unavailable"
    PERMISSION_DENIED = "permission_denied"
    KERNEL_TOO_OLD = "kernel_too_old"
    KERNEL_ERROR = "kernel_error"
    SYSCTL_UNREADABLE = "sysctl_unreadable"
    NO_ROUTE = "no_route"
    #: rebind_port_bindable is 0 because the answer hinges on this fact of a socket on the port,
    #: which nobody could read (e.g. SO_REUSEADDR of a TIME_WAIT whose server was never seen).
    REUSEADDR_UNKNOWN = "so_reuseaddr_unknown"
    REUSEPORT_UNKNOWN = "so_reuseport_unknown"
    UID_UNKNOWN = "socket_uid_unknown"
    V6ONLY_UNKNOWN = "ipv6_v6only_unknown"
    #: The port's bind bucket (tb->fastreuseport, fastuid, fast_rcv_saddr) or UDP chain order,
    #: which only the BPF socket iterator reads (root), decides a SO_REUSEPORT restart.
    BUCKET_UNKNOWN = "port_reuseport_cache_unknown"
    CHAIN_ORDER_UNKNOWN = "udp_chain_order_unknown"
    #: This kernel build's UDP rule was not calibrated (kernel/calibrate.py needs a network
    #: namespace of its own: root).
    UDP_RULE_UNKNOWN = "udp_rule_uncalibrated"


#: The Reason naming each fact the one assessment may miss (model.conflict.Flag).
MISSING_FACT = {
    Flag.REUSEADDR: Reason.REUSEADDR_UNKNOWN,
    Flag.REUSEPORT: Reason.REUSEPORT_UNKNOWN,
    Flag.UID: Reason.UID_UNKNOWN,
    Flag.V6ONLY: Reason.V6ONLY_UNKNOWN,
    Flag.BUCKET: Reason.BUCKET_UNKNOWN,
    Flag.CHAIN_ORDER: Reason.CHAIN_ORDER_UNKNOWN,
    Flag.UDP_RULE: Reason.UDP_RULE_UNKNOWN,
}


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
    key: PortKey
    peer: str
    sockets: int


@dataclass(frozen=True, slots=True)
class DestUsage:
    dest: Dest
    src: IPAddress
    live: frozenset[int]
    timewait: frozenset[int]


@dataclass(frozen=True, slots=True)
class ServerFlags:
    """What is known of the flags the server on a watched address uses: read from its listener
    (or bound UDP socket) while it lived, and remembered across scrapes by the gatherer (a
    server's TIME_WAITs outlive it). ``inode`` is the socket they were read from."""

    opts: SockOpts
    provenance: Provenance
    uid: int | None = None
    inode: int | None = None

    @property
    def exact(self) -> bool:
        return self.provenance.exact


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape gathered. ``None`` means "could not be gathered" (see ``missing``)."""

    watches: tuple[Watch, ...] = ()
    dests: tuple[Dest, ...] = ()
    #: The sockets on watched ports that the conflict model needs: listeners, bound-inactive and
    #: UDP sockets, connections that are not a listener's children, and one representative of
    #: the children and of the TIME_WAIT leftovers on each local address (see Tally.conn); the
    #: rest are only counted (``counts``, ``tw_expires_ms``).
    watched: tuple[SocketRecord, ...] | None = ()
    #: Sockets on watched ports by state: ((port, state), n).
    counts: tuple[tuple[tuple[PortKey, State], int], ...] = ()
    #: The longest TIME_WAIT/FIN_WAIT2 timer left on each watched TCP port (ms).
    tw_expires_ms: tuple[tuple[PortKey, int], ...] = ()
    #: The flags each watched server was seen with (only those the gatherer could read).
    server_flags: tuple[tuple[Watch, ServerFlags], ...] = ()
    #: The kernel's own state of the ``watched`` sockets the BPF socket iterator / lookup read
    #: (kernel/facts.py: iterator_plan, read_kernel_ports): their flags, the TCP bind bucket's
    #: fast-reuse cache, the UDP chain order. Empty when it could not run (unprivileged, no BTF).
    kernel: tuple[SockState, ...] = ()
    #: Connections to each dest, by source address: which ports are live and which in TIME_WAIT.
    usage: tuple[DestUsage, ...] | None = ()
    #: Connections on watched TCP ports by remote address: top TOP_PEERS per port, then "other".
    peers: tuple[PeerCount, ...] = ()
    #: TCP LISTEN and bound-inactive sockets whose local port lies in the ephemeral range.
    bound_in_range: tuple[SocketRecord, ...] | None = ()
    #: Ports of the range held by connections whose port bind() named (SOCK_BINDPORT_LOCK, read
    #: by the kernel's filter: inet_diag's INET_DIAG_BC_AUTO, negated).
    bind_held_conn: frozenset[int] = frozenset()
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


def on_port(records: Iterable[SocketRecord], key: PortKey) -> list[SocketRecord]:
    return [r for r in records if r.local.port == key.port and r.proto is key.proto]


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return (a.version, int(a))


#: The flags a server is assumed to use when they could not be read: nearly every server sets
#: SO_REUSEADDR (and its accepted sockets inherit it).
ASSUMED = ServerFlags(SockOpts(reuseaddr=True, reuseport=False), Provenance.ASSUMED)


def server_flags(snap: Snapshot, w: Watch) -> ServerFlags:
    """The flags of the server on ``w``: read (now or in an earlier scrape), else assumed."""
    got = dict(snap.server_flags).get(w)
    return got if got is not None and got.exact else ASSUMED


def _own_states(proto: Proto) -> frozenset[State]:
    """What a restart closes: the server's listeners (TCP) or bound sockets (UDP)."""
    return frozenset({State.LISTEN}) if proto is Proto.TCP else frozenset({State.CLOSE})


class _Listeners:
    """The listeners of one port, indexed so that finding a socket's parent is O(1): linear work
    per scrape whatever number of listeners and connections other users create."""

    def __init__(self, records: Iterable[SocketRecord]) -> None:
        self.by_addr: dict[IPAddress, SocketRecord] = {}
        self.wild: dict[Family, SocketRecord] = {}
        self.dual: SocketRecord | None = None  # a [::] listener without IPV6_V6ONLY
        for r in records:
            if r.state is not State.LISTEN:
                continue
            if r.local.is_wildcard:
                self.wild.setdefault(r.family, r)
                if r.local.addr.version == 6 and r.v6only is not True and self.dual is None:
                    self.dual = r
            else:
                self.by_addr.setdefault(norm(r.local.addr), r)

    def parent(self, r: SocketRecord) -> SocketRecord | None:
        """The listener whose address the socket's local address falls under (its accept()
        children): the same address, else a wildcard of its family, else a dual-stack [::]."""
        return self.by_addr.get(norm(r.local.addr)) or self.wild.get(r.family) or self.dual


def port_holders(
    records: Sequence[SocketRecord],
    key: PortKey,
    servers: Mapping[IPAddress, ServerFlags],
    kernel: Mapping[int, SockState] | None = None,
) -> tuple[HolderFacts, ...]:
    """The sockets on the port with what is known of their flags, built once per port.

    ``servers``: the flags of the server on each watched address of the port (normalised
    address -> :func:`server_flags`). Flags are facts or the stated assumption, never a guess:

    * a connection or leftover under a live listener of a watched server is that server's (an
      accepted socket inherits sk_reuse; inet_twsk_alloc copies it into the TIME_WAIT): the
      server's flags, with their provenance (read: ``inferred-listener``; else ``assumed``, the
      same assumption the restart is judged with);
    * a leftover with no live listener above it takes the flags of a watched server on its
      address only if they were *read* while that server lived; otherwise they are unknown --
      the seed's case: a server without SO_REUSEADDR is gone, its TIME_WAIT refuses the restart;
    * every other socket (a listener of someone else, a stray bind, a client that took the port
      as its source port) has unknown flags: the conflict model says where they decide.

    ``kernel`` (cookie -> the socket as the BPF iterator read it) comes first: the kernel's own
    sk_reuse / sk_reuseport / ipv6only (a TIME_WAIT's tw_* copies) are facts for every socket,
    a squatter's and an invisible owner's included, and carry the bucket and chain position
    :func:`rebind.model.assess.port_state` derives the port's state from.
    """
    recs = on_port(records, key)
    listeners = _Listeners(recs)
    wild = [(a, f) for a, f in servers.items() if a.is_unspecified]
    out: list[HolderFacts] = []
    for r in recs:
        st = kernel_state_of(r, kernel)
        if st is not None:
            out.append(kernel_holder(SocketEntry(r), st))
            continue
        opts, prov = SockOpts(), Provenance.UNKNOWN
        if r.state not in (State.LISTEN, State.BOUND_INACTIVE, State.CLOSE):
            parent = listeners.parent(r)
            if parent is not None:
                f = servers.get(norm(parent.local.addr))
                if f is not None:
                    how = Provenance.INFERRED_LISTENER if f.exact else Provenance.ASSUMED
                    opts, prov = f.opts, how
                if opts.v6only is None and r.v6only is None:
                    # inet_diag reports v6only for LISTEN/CLOSE only; a child keeps its listener's.
                    opts = SockOpts(opts.reuseaddr, opts.reuseport, parent.v6only)
            elif r.is_mini:
                f = servers.get(norm(r.local.addr))
                if f is None or not f.exact:
                    v = norm(r.local.addr).version  # a dual-stack [::] server covers both
                    f = next((g for a, g in wild if g.exact and a.version in (v, 6)), None)
                if f is not None and f.exact:
                    opts, prov = f.opts, Provenance.INFERRED_LISTENER
        out.append(HolderFacts(SocketEntry(r), opts, prov))
    return tuple(out)


def restart_request(w: Watch, flags: ServerFlags) -> BindRequest:
    """A restarting server's bind() on the watched address, with the flags it was seen with (else
    SO_REUSEADDR), then listen() for TCP. Privilege and the address are assumed (the server has
    them: a configured address is not re-checked per scrape)."""
    o = flags.opts
    return BindRequest(
        proto=w.proto,
        addr=w.addr,
        port=w.port,
        reuseaddr=o.reuseaddr if o.reuseaddr is not None else True,
        reuseport=bool(o.reuseport),
        v6only=o.v6only if w.addr.version == 6 else None,
        uid=flags.uid or 0,
        listen=w.proto is Proto.TCP,
        freebind=True,
    )


def assess_restart(
    holders: Sequence[HolderFacts], w: Watch, flags: ServerFlags, settings: KernelSettings
) -> Judgement:
    """Would the server on ``w`` get its port back if it restarted now? ``holders`` from
    :func:`port_holders` (once per port); the server's own listeners on ``w.addr`` are left out
    (the restart closes them), every other socket -- a squatter on another address included --
    is judged as a holder."""
    own = _own_states(w.proto)
    mine = norm(w.addr)
    hs = tuple(
        h for h in holders if not (h.entry.socket.state in own and norm(h.entry.socket.local.addr) == mine)
    )
    req = restart_request(w, flags)
    # The bucket outlives the restart's own listeners whenever another socket is left in it (its
    # cache is not recomputed when a socket leaves), and with none left the restart finds no holder.
    hs, port = port_state(req, hs)
    return judge(req, hs, _server_settings(settings), port=port)


def _server_settings(s: KernelSettings) -> KernelSettings:
    return KernelSettings(
        unprivileged_port_start=s.unprivileged_port_start,
        bindv6only=s.bindv6only,
        cap_net_bind_service=True,
        local_addresses=None,
        ip_local_port_range=s.ip_local_port_range,
        ip_local_reserved_ports=s.ip_local_reserved_ports,
        kernel_version=s.kernel_version,
        udp_first_match=s.udp_first_match,
    )


def bindable_value(j: Judgement) -> int:
    """1 only when the restart certainly binds; 0 when it fails or when unknown (never
    optimistic: rebind_exporter_missing names the missing fact)."""
    return 1 if j.bindable else 0


@dataclass(frozen=True, slots=True)
class RestartAnswer:
    watch: Watch
    judgement: Judgement


def restart_answers(snap: Snapshot) -> list[RestartAnswer]:
    """Every watched address's answer: holders built once per port, judged per address."""
    if snap.watched is None:
        return []
    by_port: dict[PortKey, list[Watch]] = {}
    for w in snap.watches:
        by_port.setdefault(w.key, []).append(w)
    out: list[RestartAnswer] = []
    kernel = {st.cookie: st for st in snap.kernel}
    for key, ws in by_port.items():
        servers: dict[IPAddress, ServerFlags] = {}
        for w in ws:
            f = server_flags(snap, w)
            servers[norm(w.addr)] = f
        holders = port_holders(snap.watched, key, servers, kernel)
        for w in ws:
            out.append(RestartAnswer(w, assess_restart(holders, w, servers[norm(w.addr)], snap.settings)))
    return out


def missing_facts(answers: Iterable[RestartAnswer]) -> list[Missing]:
    """rebind_exporter_missing entries for bindable series that are 0 only for want of a fact."""
    flags = {f for a in answers if a.judgement.now is BindNow.UNKNOWN for f in a.judgement.missing}
    return [Missing("rebind_port_bindable", MISSING_FACT[f]) for f in Flag if f in flags]


def frees_in_seconds(snap: Snapshot, key: PortKey) -> float:
    """Seconds until the last timed leftover (TIME_WAIT, orphaned FIN_WAIT2) on the port expires:
    after that, even a server without SO_REUSEADDR binds, unless a live socket holds the port.
    0 when none is left."""
    return dict(snap.tw_expires_ms).get(key, 0) / 1000.0


def state_label(s: State) -> str:
    """Lower-case state names: ``ss`` spelling with underscores (bound_inactive, time_wait)."""
    return s.label.lower()


#: The states each protocol's sockets can be in, as exported (a zero is exported for each, so
#: alerts need no ``absent()``). NEW_SYN_RECV shares syn_recv's label.
TCP_STATES = tuple(s for s in State if s not in (State.CLOSE, State.NEW_SYN_RECV))
UDP_STATES = (State.CLOSE, State.ESTABLISHED)


def state_counts(snap: Snapshot, key: PortKey) -> dict[str, int]:
    states = TCP_STATES if key.proto is Proto.TCP else UDP_STATES
    out = {state_label(s): 0 for s in states}
    for (k, state), n in snap.counts:
        if k == key:
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
    """The listeners on each watched TCP address (only those: labels come from the command line,
    never from what other users bind). For listeners, inet_diag reports sk_ack_backlog as rqueue
    and sk_max_ack_backlog as wqueue (inet_diag_msg_common_fill / tcp_diag_get_info)."""
    wanted = {(w.port, norm(w.addr)): w.addr for w in watches if w.proto is Proto.TCP}
    groups: dict[tuple[int, IPAddress], list[SocketRecord]] = {}
    for r in records:
        if r.proto is Proto.TCP and r.state is State.LISTEN:
            addr = wanted.get((r.local.port, norm(r.local.addr)))
            if addr is not None:
                groups.setdefault((r.local.port, addr), []).append(r)
    out = []
    for (port, addr), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _addr_key(kv[0][1]))):
        fullest = max(members, key=_fill)
        out.append(ListenerGroup(port, addr, len(members), fullest.rqueue, fullest.wqueue))
    return out


def _fill(m: SocketRecord) -> tuple[float, int]:
    return (m.rqueue / m.wqueue if m.wqueue else float(m.rqueue > 0), m.rqueue)


# --------------------------------------------------------------------------------------------
# Client side: a count over the socket table (switch to the `why --connect` model at merge)


def bind_held_ports(
    bound: Iterable[SocketRecord], rng: EphemeralRange, conns: Iterable[int] = ()
) -> frozenset[int]:
    """Ephemeral-range ports whose bind bucket bind() created: connect() skips them whatever the
    destination (__inet_hash_connect: tb->fastreuse >= 0). Counted from TCP listeners and
    bound-inactive sockets (their children share their port) and ``conns``: the ports of
    connections whose port bind() named (a fixed-port client, SOCK_BINDPORT_LOCK; the kernel's
    filter finds them). Still a lower bound: a client that let bind(ip, 0) pick its port, and a
    fixed-port client's TIME_WAIT, keep the bucket bind-made and show no such lock
    (connect-rules.md §8); `why --connect` reads those from the kernel (root)."""
    held = {
        r.local.port
        for r in bound
        if r.proto is Proto.TCP and r.state in (State.LISTEN, State.BOUND_INACTIVE) and r.local.port in rng
    }
    return frozenset(held | {p for p in conns if p in rng})


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
        self.port_set = frozenset(w.key for w in watches)
        self.tcp_ports = frozenset(w.port for w in watches if w.proto is Proto.TCP)
        self.dests = {(addr_key(d.addr), d.port): d for d in dests}
        self._server_counts: dict[tuple[PortKey, State], int] = {}
        #: (port, leftover?, local address) already kept: one representative of each for the model.
        self._kept: set[tuple[int, bool, bytes]] = set()
        self._conn_counts: dict[tuple[int, int], int] = {}
        self._tw_max: dict[int, int] = {}
        self._peers: dict[tuple[int, bytes], int] = {}
        self.listeners: dict[int, set[bytes]] = {}
        self.usage: dict[tuple[Dest, bytes], tuple[set[int], set[int]]] = {}
        #: Ports of the range that connections bound by bind() hold (see client_range).
        self.bind_held: set[int] = set()
        self._range = (1, 0)

    def client_range(self, rng: EphemeralRange | None) -> None:
        """The connection dump also returns the connections on ports of this range whose port
        bind() named (gather.py's filter): ``conn`` then counts their ports as bind-held."""
        self._range = (rng.lo, rng.hi) if rng is not None else (1, 0)

    def server(self, r: SocketRecord) -> None:
        """A TCP listener or bound-inactive socket, or a UDP socket, on a watched port."""
        key = (PortKey(r.local.port, r.proto), r.state)
        self._server_counts[key] = self._server_counts.get(key, 0) + 1
        if r.state is State.LISTEN:
            self.listeners.setdefault(r.local.port, set()).add(addr_key(r.local.addr))

    def conn(
        self, state: int, mini: bool, sport: int, dport: int, src: bytes, dst: bytes, expires: int
    ) -> bool:
        """A TCP connection-table socket (state as its number, addresses as keys). True when the
        conflict model needs it: a socket on a watched port that is not a child of a listener on
        its port, or the first child or TIME_WAIT leftover on its local address (the others
        decide alike: bind conflicts compare local addresses, and they share their flags' source).
        Linear in the sockets, bounded by their distinct local addresses."""
        wanted = False
        if sport in self.tcp_ports:
            key = (sport, state)
            self._conn_counts[key] = self._conn_counts.get(key, 0) + 1
            pkey = (sport, dst)
            self._peers[pkey] = self._peers.get(pkey, 0) + 1
            if mini:
                if expires > self._tw_max.get(sport, -1):
                    self._tw_max[sport] = expires
                child = True
            else:
                keys = self.listeners.get(sport, ())
                child = dport != 0 and (src in keys or _WILDCARDS[0] in keys or _WILDCARDS[1] in keys)
            if not child:
                wanted = True
            elif (sport, mini, src) not in self._kept:
                self._kept.add((sport, mini, src))
                wanted = True
        d = self.dests.get((dst, dport))
        if d is not None:
            live, tw = self.usage.setdefault((d, src), (set(), set()))
            (tw if mini or state == State.TIME_WAIT else live).add(sport)
        elif sport not in self.tcp_ports and self._range[0] <= sport <= self._range[1]:
            # neither watched nor to a dest: only the filter's bind-named group returns it
            self.bind_held.add(sport)
        return wanted

    def records(self, recs: Iterable[SocketRecord]) -> list[SocketRecord]:
        """Feed whole records (the /proc/net path, tests): servers first, then connections.
        Returns the records the conflict model needs (what ``Snapshot.watched`` holds)."""
        recs = list(recs)
        wanted: list[SocketRecord] = []
        for r in recs:
            if (r.proto is Proto.UDP or r.state in _SERVER_STATES) and PortKey(
                r.port, r.proto
            ) in self.port_set:
                self.server(r)
                wanted.append(r)
        for r in recs:
            if r.proto is Proto.TCP and r.state not in _SERVER_STATES:
                keys = (addr_key(r.local.addr), addr_key(r.remote.addr))
                if self.conn(int(r.state), r.is_mini, r.port, r.remote.port, *keys, r.expires_ms or 0):
                    wanted.append(r)
        return wanted

    @property
    def counts(self) -> dict[tuple[PortKey, State], int]:
        out = dict(self._server_counts)
        for (port, st), n in self._conn_counts.items():
            key = (PortKey(port), State(st))
            out[key] = out.get(key, 0) + n
        return out

    @property
    def tw_max(self) -> dict[PortKey, int]:
        return {PortKey(p): ms for p, ms in self._tw_max.items()}

    def peers(self, k: int = TOP_PEERS) -> tuple[PeerCount, ...]:
        """The ``k`` remote addresses with the most sockets on each watched TCP port, and the
        rest summed as "other": bounded whatever the number of clients."""
        by_port: dict[int, list[tuple[int, bytes]]] = {}
        for (port, peer), n in self._peers.items():
            by_port.setdefault(port, []).append((n, peer))
        out: list[PeerCount] = []
        for port, items in sorted(by_port.items()):
            items.sort(key=lambda item: (-item[0], item[1]))
            out += [PeerCount(PortKey(port), fmt_addr(_from_key(peer)), n) for n, peer in items[:k]]
            rest = sum(n for n, _ in items[k:])
            if rest:
                out.append(PeerCount(PortKey(port), OTHER, rest))
        return tuple(out)

    def dest_usage(self) -> tuple[DestUsage, ...]:
        return tuple(
            DestUsage(d, _from_key(src), frozenset(live), frozenset(tw))
            for (d, src), (live, tw) in self.usage.items()
        )


def _from_key(key: bytes) -> IPAddress:
    return IPv4Address(key) if len(key) == 4 else IPv6Address(key)
