"""What one scrape knows: the watched addresses and destinations, and the Snapshot the gatherer
fills (exporter/gather.py). Pure: no I/O, no prometheus-client.

What follows from a Snapshot lives beside it, one room per question:

* ``exporter/restart.py``: "would a restart bind?", the one assessment of rebind
  (``model.assess.judge``) per watched address;
* ``exporter/port_stats.py``: per-port counts, listener queues, configuration warnings;
* ``exporter/connect_counts.py``: the client side, a count over the socket table;
* ``exporter/tally.py``: the one pass over a dump that fills the Snapshot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from rebind.errors import UsageError
from rebind.model.assess import Provenance
from rebind.model.conflict import Flag, KernelSettings, SockOpts
from rebind.model.records import IPAddress, Proto, SocketRecord, State
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
    #: Some ports of the ephemeral range are held by a bind bucket nobody could read (made by
    #: bind(ip, 0) or by connect()? no SOCK_BINDPORT_LOCK tells): only the bucket, read by BPF
    #: (root), says whether connect() skips them. They are not counted free, nor bind-held.
    PORT_ORIGIN_UNKNOWN = "port_origin_unknown"


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


#: A client socket as a bind bucket lookup wants it (exporter/fastdiag.py: first_per_port): its
#: local and remote addresses (4 bytes for IPv4 and v4-mapped IPv6, else 16), remote port and
#: inet_diag cookie (0: none), keyed by its local port.
PortTuple = tuple[bytes, bytes, int, int]


@dataclass(frozen=True, slots=True)
class PortOrigins:
    """What the kernel's bind buckets said of the ports of the range: every port but the
    listeners' and the reserved ones, read from the bind hash (exporter/origins.py:
    bucket_origins), or, in the fallback, the ports whose client sockets show no
    SOCK_BINDPORT_LOCK (exporter/connect_counts.py: port_origins). Ports in neither set are
    free or shared by connect() (a connect()-made bucket)."""

    #: Buckets bind() made (bind(ip, 0), a port bind() named, a bound-inactive socket, a
    #: server's TIME_WAIT): connect() skips them.
    bind_made: frozenset[int] = frozenset()
    #: Buckets nobody could read (no BPF; a fault or a bucket freed mid-read; in the fallback a
    #: socket gone between the dump and the lookup): never counted free.
    unknown: frozenset[int] = frozenset()


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
    #: (kernel/sockstates.py: iterator_plan, read_kernel_ports): their flags, the TCP bind bucket's
    #: fast-reuse cache, the UDP chain order. Empty when it could not run (unprivileged, no BTF).
    kernel: tuple[SockState, ...] = ()
    #: Connections to each dest, by source address: which ports are live and which in TIME_WAIT.
    usage: tuple[DestUsage, ...] | None = ()
    #: Connections on watched TCP ports by remote address: top TOP_PEERS per port, then "other".
    peers: tuple[PeerCount, ...] = ()
    #: TCP LISTEN and bound-inactive sockets whose local port lies in the ephemeral range (where
    #: the bind hash was read, the listeners only: the buckets judged every other port).
    bound_in_range: tuple[SocketRecord, ...] | None = ()
    #: Ports of the range held by connections whose port bind() named (SOCK_BINDPORT_LOCK, read
    #: by the kernel's filter: inet_diag's INET_DIAG_BC_AUTO, negated).
    bind_held_conn: frozenset[int] = frozenset()
    #: The other ports of the range, sorted by their bind bucket (BPF).
    origins: PortOrigins = field(default_factory=PortOrigins)
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
# Addresses


def norm(a: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it carries."""
    if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a
