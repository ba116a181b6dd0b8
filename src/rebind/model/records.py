"""Socket and owner records: the vocabulary every other layer speaks. Pure, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING

from rebind.textsafe import visible

if TYPE_CHECKING:  # field types only: `rebind ls` should not pay for the container parsers
    from rebind.model.birth import Birth
    from rebind.model.containers import ContainerRef, ProxyKind

IPAddress = IPv4Address | IPv6Address


def fmt_addr(addr: IPAddress) -> str:
    """The one address spelling every text and JSON output uses (no brackets, no port).

    IPv4-mapped IPv6 addresses print as ``::ffff:127.0.0.1`` on every Python: 3.11 and 3.12's
    ``str()`` give ``::ffff:7f00:1`` (3.13 prints the dotted form).
    """
    if isinstance(addr, IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return f"::ffff:{mapped}"
    return str(addr)


class Proto(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Family(enum.IntEnum):
    """Address family numbers as in <sys/socket.h>."""

    INET = 2
    INET6 = 10

    @property
    def label(self) -> str:
        return "ipv4" if self is Family.INET else "ipv6"


class State(enum.IntEnum):
    """Kernel socket states (include/net/tcp_states.h) with inet_diag's pseudo states.

    UDP reuses the TCP numbers: CLOSE (7) for a bound socket, ESTABLISHED (1) for a connected one.
    """

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    # Not a real sk_state: a request bit (Linux 6.8, 91051f003948). The kernel reports these
    # sockets with state CLOSE; the reader renames them so nobody confuses them with UDP's CLOSE.
    BOUND_INACTIVE = 13

    @property
    def bit(self) -> int:
        return 1 << self.value

    @property
    def label(self) -> str:
        """The name users see (``ss`` spelling, underscores kept for JSON stability)."""
        return _LABELS.get(self, self.name)


_LABELS = {State.CLOSE: "UNCONN", State.NEW_SYN_RECV: "SYN_RECV"}

#: What ``rebind ls`` shows without a port: listeners and bound-but-idle sockets.
LISTENING_STATES = frozenset({State.LISTEN, State.BOUND_INACTIVE, State.CLOSE})

STATE_ALIASES: dict[str, State] = {
    "established": State.ESTABLISHED,
    "estab": State.ESTABLISHED,
    "syn-sent": State.SYN_SENT,
    "syn-recv": State.SYN_RECV,
    "fin-wait-1": State.FIN_WAIT1,
    "fin-wait1": State.FIN_WAIT1,
    "fin-wait-2": State.FIN_WAIT2,
    "fin-wait2": State.FIN_WAIT2,
    "time-wait": State.TIME_WAIT,
    "timewait": State.TIME_WAIT,
    "unconn": State.CLOSE,
    "close": State.CLOSE,
    "close-wait": State.CLOSE_WAIT,
    "last-ack": State.LAST_ACK,
    "listen": State.LISTEN,
    "listening": State.LISTEN,
    "closing": State.CLOSING,
    "bound-inactive": State.BOUND_INACTIVE,
    "bound": State.BOUND_INACTIVE,
}


def parse_state(text: str) -> State:
    """Parse a state name as users type it (``time-wait``, ``TIME_WAIT``, ``listen``)."""
    key = text.strip().lower().replace("_", "-")
    try:
        return STATE_ALIASES[key]
    except KeyError:
        raise ValueError(f"unknown state {text!r} (try: {', '.join(sorted(STATE_ALIASES))})") from None


class Timer(enum.IntEnum):
    """``idiag_timer`` values (net/ipv4/inet_diag.c, inet_sk_diag_fill / inet_twsk_diag_fill)."""

    NONE = 0
    RETRANSMIT = 1
    KEEPALIVE = 2
    TIME_WAIT = 3  # also an orphaned FIN_WAIT2 kept as a timewait mini-socket (tcp_time_wait)
    PROBE0 = 4
    UNKNOWN = 255


@dataclass(frozen=True, slots=True)
class Endpoint:
    addr: IPAddress
    port: int

    def __str__(self) -> str:
        if isinstance(self.addr, IPv6Address):
            return f"[{fmt_addr(self.addr)}]:{self.port}"
        return f"{self.addr}:{self.port}"

    @classmethod
    def parse(cls, addr: str, port: int) -> Endpoint:
        return cls(ip_address(addr), port)

    @property
    def is_wildcard(self) -> bool:
        return self.addr.is_unspecified


@dataclass(frozen=True, slots=True)
class SocketRecord:
    """One kernel socket as inet_diag (or /proc/net) reports it.

    ``uid`` and ``inode`` are None for timewait mini-sockets: they have no owner and no file
    (inet_twsk_diag_fill reports 0 for both).
    """

    proto: Proto
    family: Family
    state: State
    local: Endpoint
    remote: Endpoint
    uid: int | None
    inode: int | None
    cookie: int | None = None
    ifindex: int = 0
    timer: Timer = Timer.NONE
    #: Milliseconds until the timer fires (idiag_expires); for TIME_WAIT, when the port frees.
    expires_ms: int | None = None
    v6only: bool | None = None
    cgroup_id: int | None = None
    rqueue: int = 0
    wqueue: int = 0
    #: The netns inode the socket was read in, so owners can be matched by namespace.
    netns: int | None = None
    #: Who bound it and when, from the kernel (``rebind trace --install``; model/birth.py).
    birth: Birth | None = None

    @property
    def port(self) -> int:
        return self.local.port

    @property
    def is_mini(self) -> bool:
        """A timewait mini-socket: TIME_WAIT, or an orphaned FIN_WAIT2 (tcp_time_wait)."""
        return self.timer is Timer.TIME_WAIT and self.state in (State.TIME_WAIT, State.FIN_WAIT2)

    @property
    def key(self) -> tuple[object, ...]:
        """Identity within one netns: protocol, 4-tuple, and the socket cookie."""
        return (self.proto, self.local, self.remote, self.cookie)


@dataclass(frozen=True, slots=True)
class Owner:
    """A process holding a socket through one file descriptor."""

    pid: int
    fd: int
    name: str
    cmdline: tuple[str, ...] = ()
    uid: int | None = None
    user: str | None = None
    ppid: int | None = None
    #: Process start as seconds since the epoch (psutil.Process.create_time()).
    start_time: float | None = None
    #: Kernel start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, a
    #: unique process identity that survives pid reuse checks.
    start_ticks: int | None = None
    #: The container the process runs in (from its cgroup), or the one a port proxy serves.
    container: ContainerRef | None = None
    #: The systemd unit (``nginx.service``), from the cgroup path systemd manages.
    unit: str | None = None
    #: Set when the process is a container engine's port proxy (docker-proxy, conmon, ...).
    proxy: ProxyKind | None = None


def process_label(name: str, pid: int) -> str:
    """``name[pid]``: the one place a process becomes text, whichever record carries it (an
    :class:`Owner`, free's targets, top's rows, a trace event, a connect consumer). The name is
    the process's own choice (prctl(PR_SET_NAME), argv[0]) and so hostile: control characters are
    shown escaped (rebind.textsafe.visible). Rich renderers still escape markup, or print it as
    ``Text``."""
    return f"{visible(name)}[{pid}]"


def owner_label(o: Owner) -> str:
    """:func:`process_label` with what the owner serves: its container or systemd unit."""
    label = process_label(o.name, o.pid)
    if o.proxy is not None:
        # A port proxy serves someone else: name who (killing the proxy is never the fix).
        return f"{label} → {visible(o.container.label) if o.container else 'a container'}"
    if o.container is not None:
        return f"{label} ({o.container.engine.value}:{visible(o.container.label)})"
    return f"{label} ({visible(o.unit)})" if o.unit else label


def socket_label(r: SocketRecord) -> str:
    """``tcp LISTEN 0.0.0.0:8080`` (`` -> PEER`` for a connection): the one place a socket of a
    plan, a wait or a free result becomes text."""
    remote = "" if r.remote.port == 0 and r.remote.addr.is_unspecified else f" -> {r.remote}"
    return f"{r.proto.value} {r.state.label} {r.local}{remote}"


def inaccessible_warning(count: int, euid: int) -> str:
    """What ``count`` unreadable fd tables (OwnerScanReport.inaccessible) mean for the caller."""
    if euid == 0:
        # Root is refused only by ptrace_may_access() (proc_fd_access_allowed): a process in
        # another user namespace, an LSM, or CAP_SYS_PTRACE dropped from rebind's capabilities.
        why = "permission denied even as root: another user namespace, an LSM, or CAP_SYS_PTRACE missing"
    else:
        why = "other users' processes: run as root to see them"
    return f"{count} process(es) could not be inspected ({why}): owners of their sockets may be missing"


@dataclass(frozen=True, slots=True)
class OwnerScanReport:
    """How complete an owner scan was; never guessed."""

    scanned: int = 0
    #: Processes whose fd table could not be read (permission denied): their sockets may be missed.
    inaccessible: int = 0
    #: Processes that exited while being read: normal churn, not an error.
    vanished: int = 0
    #: Processes skipped because they live in another network namespace.
    other_netns: int = 0


@dataclass(frozen=True, slots=True)
class SocketEntry:
    socket: SocketRecord
    owners: tuple[Owner, ...] = ()
    #: With ``--all-netns``: the namespace's name under /run/netns, or its container's name.
    netns_name: str | None = None


@dataclass(frozen=True, slots=True)
class SocketTable:
    entries: tuple[SocketEntry, ...]
    #: "netlink" or "procfs"; procfs cannot see bound-inactive sockets, cookies or v6only.
    source: str = "netlink"
    owners_scanned: bool = True
    scan: OwnerScanReport = field(default_factory=OwnerScanReport)
    warnings: tuple[str, ...] = ()
