"""Make a port bindable again, touching only what blocks the requested bind.

Plan, then act, then verify:

* the plan comes from :func:`rebind.diagnosis.diagnose` (the sockets that block *this* bind with
  *these* options), so a client connected *to* the port is never in it: its socket's local port
  is an ephemeral one, and the table is filtered by local port;
* planning is pure (:func:`make_plan`: a diagnosis and :class:`HostFacts` in, a
  :class:`FreePlan` out); a plan that cannot make the port bindable says why
  (``FreePlan.obstacles``: a holder rebind refuses to signal, an owner nobody can see, or no
  socket at all -- a privileged port, an address that is not local) and :func:`free` does not
  act on it;
* processes are signalled only through pidfds opened against the identity (pid + start time)
  captured when the plan was made, so a recycled pid is never hit, and only while they still
  hold a blocking socket (checked right before each signal);
* TIME_WAIT / orphan FIN_WAIT2 mini-sockets and orphaned connections have no process to stop;
  they are removed with SOCK_DESTROY where the kernel permits it (CAP_NET_ADMIN; TIME_WAIT
  since Linux 6.0, bind-rules.md 4.4), otherwise the plan says how long they have left;
* the result is checked with a trial bind, and what still holds the port is named.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import select
import signal as _signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from rebind.actions.common import AddrLike, bind_request, owner_label, socket_label
from rebind.diagnosis import BlockerInfo, Diagnosis, diagnose
from rebind.errors import ExitCode, KernelError, UsageError
from rebind.model.conflict import BindRequest, Rule
from rebind.model.diagnosis import NO_SOCKET_KINDS, HolderKind, fmt_seconds
from rebind.model.records import Owner, OwnerScanReport, Proto, SocketRecord, State
from rebind.model.validate import parse_seconds
from rebind.textsafe import visible

DEFAULT_GRACE = 5.0
#: After SIGKILL a process normally dies at once; one in uninterruptible sleep (D) may not.
KILL_WAIT = 5.0
#: Rounds of "re-read the port, destroy new orphans" after the processes are gone: their
#: connections turn into FIN_WAIT1/FIN_WAIT2/TIME_WAIT orphans as the files close.
SETTLE_ROUNDS = 4
SETTLE_PAUSE = 0.05
SETTLE_SECONDS = 2.0
#: SOCK_DESTROY learned TIME_WAIT (tcp_abort on a timewait sock) in Linux 6.0 (af9784d007d8).
DESTROY_TIME_WAIT_SINCE = (6, 0)
#: Exit status when what blocks the port is something rebind will not touch (PID 1, itself or an
#: ancestor, another user's process without root and --force, a container proxy, an outgoing
#: connection without --outgoing): distinct from 1 ("still busy") and 3 (missing permission).
EXIT_REFUSED = int(ExitCode.REFUSED)

#: Bind failures that involve no socket at all (__inet_bind / __inet6_bind checks that come
#: before any port lookup): nothing to signal or destroy.
NOT_A_SOCKET_RULES = frozenset({Rule.ADDRESS_NOT_LOCAL, Rule.PRIVILEGED_PORT, Rule.INVALID_ADDRESS})

Event = Callable[[str], None]
#: Socket states that leave nothing behind when their process closes them.
_IDLE = frozenset({State.LISTEN, State.BOUND_INACTIVE, State.CLOSE})


class Refusal(enum.StrEnum):
    INIT = "PID 1 is never signalled"
    SELF = "that is rebind itself"
    ANCESTOR = "an ancestor of rebind (signalling it would stop rebind's own caller)"
    OTHER_USER = "another user's process: only root with --force may signal it"
    NO_IDENTITY = "its start time could not be read, so a recycled pid could not be ruled out"
    OUTGOING = "only an outgoing connection whose local port is this port (pass --outgoing to include it)"
    CONTAINER = (
        "a container engine's port proxy: stop or re-map the container instead "
        "(--force kills the proxy anyway, cutting the container off)"
    )


class ObstacleKind(enum.StrEnum):
    """Why a plan cannot make the port bindable (in the order they matter)."""

    NOT_A_SOCKET = "not-a-socket"  # privileged port, address not local, invalid address
    REFUSED = "refused"  # held by a process rebind will not signal
    NO_OWNER = "no-owner"  # held through a file, by no process rebind can see
    CANNOT_DESTROY = "cannot-destroy"  # a leftover SOCK_DESTROY cannot remove here: it expires


@dataclass(frozen=True, slots=True)
class Obstacle:
    kind: ObstacleKind
    #: What blocks and why rebind cannot remove it (process-supplied names escaped).
    text: str
    #: The exit status it stands for: 2 the request itself, 3 missing permission or kernel
    #: feature, EXIT_REFUSED, or 1.
    exit_code: int


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What a plan depends on beyond the diagnosis: who is asking, and what the kernel allows."""

    euid: int
    #: PID 1, rebind itself and its ancestors: never signalled.
    protected: Mapping[int, Refusal]
    cap_net_admin: bool
    kernel_version: tuple[int, int]

    @classmethod
    def gather(cls) -> HostFacts:
        from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

        return cls(os.geteuid(), protected_pids(), has_cap(CAP_NET_ADMIN), kernel_version())

    def destroy_blocked(self, rec: SocketRecord | None = None) -> str:
        """Why SOCK_DESTROY cannot remove (this) socket here; "" when it can."""
        if not self.cap_net_admin:
            return "SOCK_DESTROY needs CAP_NET_ADMIN (run as root)"
        if (rec is None or rec.is_mini) and self.kernel_version < DESTROY_TIME_WAIT_SINCE:
            return "SOCK_DESTROY removes TIME_WAIT only since Linux 6.0"
        return ""


@dataclass(frozen=True, slots=True)
class OtherSocket:
    """A socket a target holds besides the ones that block the port: the signal that stops the
    target takes it down too (another server port, its connections, a UDP socket, a unix
    socket). Alike connections are one entry with a count."""

    #: ``tcp``, ``udp``, ``unix``, or ``socket`` (not identified here: another network
    #: namespace, netlink, ...).
    proto: str
    #: ``LISTEN``, ``BOUND_INACTIVE``, ``UNCONN``, ``ESTABLISHED``...; "" for unix / unknown.
    state: str = ""
    #: ``127.0.0.1:8080``, a unix socket's path (escaped), or "".
    local: str = ""
    port: int | None = None
    count: int = 1

    @property
    def serves(self) -> bool:
        """A server's own socket (listening or bound), rather than a connection."""
        return self.state in ("LISTEN", "BOUND_INACTIVE", "UNCONN")

    def __str__(self) -> str:
        text = " ".join(x for x in (self.proto, self.state, self.local) if x)
        if self.proto == "socket":
            text = "socket not identified here (another network namespace, netlink, ...)"
        return f"{text} ×{self.count}" if self.count > 1 else text


@dataclass(frozen=True, slots=True)
class Target:
    """A process to signal, with the identity captured at plan time."""

    pid: int
    start_ticks: int
    name: str
    uid: int | None
    sockets: tuple[SocketRecord, ...]
    fds: tuple[int, ...]
    #: Every other socket it holds (:func:`add_collateral`): stopping it takes them down too.
    also_holds: tuple[OtherSocket, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}[{self.pid}]"


@dataclass(frozen=True, slots=True)
class Refused:
    pid: int
    name: str
    reason: Refusal
    sockets: tuple[SocketRecord, ...]

    @property
    def label(self) -> str:
        return f"{self.name}[{self.pid}]"


@dataclass(frozen=True, slots=True)
class FreePlan:
    request: BindRequest
    diagnosis: Diagnosis
    signal: int
    grace: float
    targets: tuple[Target, ...] = ()
    refused: tuple[Refused, ...] = ()
    #: Sockets without a file (timewait mini-sockets, orphaned connections) to SOCK_DESTROY.
    destroy: tuple[SocketRecord, ...] = ()
    #: Sockets without a file that cannot be destroyed here: they expire by themselves.
    expiring: tuple[SocketRecord, ...] = ()
    #: Why SOCK_DESTROY is not available ("" when it is).
    destroy_blocked: str = ""
    #: Sockets with a file but no visible owner (see ``obstacles`` for why).
    unowned: tuple[SocketRecord, ...] = ()
    #: Why this plan cannot make the port bindable, most important first (empty: it can).
    obstacles: tuple[Obstacle, ...] = ()
    #: Inodes of every blocking socket that has a file: a target is signalled only while it
    #: still holds one of them.
    blocking_inodes: frozenset[int] = frozenset()
    #: Everything else the signals take down, each socket once over all targets (forked
    #: workers share sockets): filled in by :func:`add_collateral`.
    collateral: tuple[OtherSocket, ...] = ()

    @property
    def bindable(self) -> bool:
        return self.diagnosis.bindable

    @property
    def has_actions(self) -> bool:
        return bool(self.targets or self.destroy)

    @property
    def worth_acting(self) -> bool:
        """Would acting make the port bindable (at once, or once leftovers expire)?

        Stopping processes while something else keeps the port busy anyway only does harm.
        """
        return self.has_actions and all(o.kind is ObstacleKind.CANNOT_DESTROY for o in self.obstacles)

    @property
    def exit_code(self) -> int:
        """0 if carrying out the plan makes the port bindable, else the first obstacle's status."""
        return self.obstacles[0].exit_code if self.obstacles and not self.bindable else 0

    @property
    def leaves_orphans(self) -> bool:
        """Do the targets hold connections on the port? Closing them leaves FIN_WAIT/TIME_WAIT."""
        return any(r.state not in _IDLE for t in self.targets for r in t.sockets)

    def collateral_summary(self) -> str:
        """``8080/tcp (LISTEN, 7 connections), 5353/udp, 1 unix socket``, or "" when stopping
        the targets takes down nothing but what blocks the port."""
        return collateral_summary(self.collateral)


class Fate(enum.StrEnum):
    EXITED = "exited"  # after the first signal
    KILLED = "killed"  # after SIGKILL (escalation)
    SURVIVED = "survived"  # still alive after SIGKILL (uninterruptible sleep?)
    GONE = "gone"  # had exited before it was signalled
    REUSED = "reused"  # the pid now names another process: not signalled
    DENIED = "denied"  # the kernel refused the signal (EPERM)
    RELEASED = "released"  # no longer held a blocking socket when its turn came: not signalled
    UNVERIFIED = "unverified"  # its fds could not be read to confirm it still holds one: not signalled


@dataclass(frozen=True, slots=True)
class ProcessOutcome:
    target: Target
    fate: Fate
    signals: tuple[str, ...] = ()
    #: Seconds from the first signal until the process was seen gone.
    seconds: float | None = None


class SocketFate(enum.StrEnum):
    DESTROYED = "destroyed"
    GONE = "gone"  # already gone when we asked (ENOENT)
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SocketOutcome:
    socket: SocketRecord
    fate: SocketFate
    error: str = ""


@dataclass(frozen=True, slots=True)
class FreeResult:
    plan: FreePlan
    processes: tuple[ProcessOutcome, ...]
    sockets: tuple[SocketOutcome, ...]
    #: The diagnosis after acting: ``after.trial`` is the verifying trial bind.
    after: Diagnosis
    #: One line per thing that still holds the port (empty when it is bindable); process names
    #: in them are escaped (rebind.textsafe.visible).
    remaining: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.after.bindable

    @property
    def exit_code(self) -> int:
        """0 bindable now; the plan's obstacle status; 3 if a signal was not permitted; else 1."""
        if self.ok:
            return 0
        if self.plan.obstacles:
            return self.plan.exit_code
        if any(p.fate is Fate.DENIED for p in self.processes):
            return int(ExitCode.ENVIRONMENT)
        return int(ExitCode.NO_MATCH)


# ---------------------------------------------------------------------------------------------
# Plan (pure: facts in, plan out)


def parse_signal(sig: int | str) -> int:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` -> 15."""
    if isinstance(sig, bool) or not isinstance(sig, int | str):
        raise UsageError(f"signal must be a name or a number (e.g. TERM, 15), not {sig!r}")
    if isinstance(sig, int):
        number = sig
    else:
        text = sig.strip().upper()
        if text.isascii() and text.isdigit():
            number = int(text)
        else:
            name = text if text.startswith("SIG") else f"SIG{text}"
            member = getattr(_signal.Signals, name, None)
            if member is None:
                raise UsageError(f"unknown signal {sig!r} (e.g. TERM, INT, HUP, KILL)")
            number = int(member)
    valid = {int(s) for s in _signal.valid_signals()}
    if number not in valid or number == 0:
        raise UsageError(f"{sig!r} is not a signal number")
    return number


def signal_name(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return str(sig)


def protected_pids() -> dict[int, Refusal]:
    """PID 1, this process and its ancestors: never signalled."""
    out = {1: Refusal.INIT, os.getpid(): Refusal.SELF}
    pid = os.getppid()
    while pid > 1 and pid not in out:
        out[pid] = Refusal.ANCESTOR
        pid = _ppid(pid) or 0
    return out


def _ppid(pid: int) -> int | None:
    from rebind.kernel.procstat import PPID, stat_field

    return stat_field(pid, PPID)


def destroy_blocked_reason(rec: SocketRecord | None = None) -> str:
    """Why SOCK_DESTROY cannot remove (this) socket here; "" when it can."""
    from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

    return HostFacts(os.geteuid(), {}, has_cap(CAP_NET_ADMIN), kernel_version()).destroy_blocked(rec)


def is_socket_blocker(b: BlockerInfo) -> bool:
    """Is this blocker a real socket (not a privileged port, a foreign or invalid address)?"""
    return b.blocker.rule not in NOT_A_SOCKET_RULES and b.kind not in NO_SOCKET_KINDS


def owner_refusal(
    o: Owner, kind: HolderKind, facts: HostFacts, *, force: bool = False, outgoing: bool = False
) -> Refusal | None:
    """Why this owner of a blocking socket must not be signalled, or None if it may be."""
    if o.pid in facts.protected:
        return facts.protected[o.pid]
    if kind is HolderKind.CONTAINER_PROXY and not force:
        # The proxy forwards to (or reserves the port for) a container: killing it cuts the
        # container off and the engine may not recreate it. Only --force overrides.
        return Refusal.CONTAINER
    if kind is HolderKind.OUTGOING and not outgoing:
        return Refusal.OUTGOING
    if o.uid != facts.euid and not (facts.euid == 0 and force):
        return Refusal.OTHER_USER
    if o.start_ticks is None:
        return Refusal.NO_IDENTITY
    return None


def no_owner_reason(scan: OwnerScanReport, euid: int) -> str:
    """Why a socket that has a file shows no owner, from what the owner scan could not read."""
    if scan.inaccessible:
        from rebind.kernel.owners import inaccessible_warning

        return inaccessible_warning(scan.inaccessible, euid)
    return (
        "no process visible here holds it: its owner is outside this PID namespace (a container's "
        "host, or /proc mounted with hidepid), or it is held only in flight (SCM_RIGHTS)"
    )


@dataclass(slots=True)
class _Buckets:
    """Each blocker of a diagnosis, sorted by what the plan does with it."""

    targets: dict[int, tuple[Owner, list[SocketRecord], list[int]]] = field(default_factory=dict)
    refused: dict[int, tuple[Owner, Refusal, list[SocketRecord]]] = field(default_factory=dict)
    destroy: list[SocketRecord] = field(default_factory=list)
    expiring: list[SocketRecord] = field(default_factory=list)
    unowned: list[SocketRecord] = field(default_factory=list)
    not_sockets: list[Obstacle] = field(default_factory=list)
    blocked: str = ""


def _sort_blockers(d: Diagnosis, facts: HostFacts, force: bool, outgoing: bool) -> _Buckets:
    out = _Buckets()
    for b in () if d.bindable else d.blockers:
        r = b.entry.socket
        if not is_socket_blocker(b):
            out.not_sockets.append(_not_a_socket(b.blocker.reason, b.blocker.rule is Rule.PRIVILEGED_PORT))
        elif not r.inode:
            # No file refers to it: a timewait mini-socket or an orphaned connection.
            why = facts.destroy_blocked(r)
            (out.expiring if why else out.destroy).append(r)
            out.blocked = out.blocked or why
        elif not b.entry.owners:
            out.unowned.append(r)
        else:
            for o in b.entry.owners:
                refusal = owner_refusal(o, b.kind, facts, force=force, outgoing=outgoing)
                if refusal is None:
                    _, socks, fds = out.targets.setdefault(o.pid, (o, [], []))
                    socks.append(r)
                    fds.append(o.fd)
                else:
                    out.refused.setdefault(o.pid, (o, refusal, []))[2].append(r)
    return out


def make_plan(
    d: Diagnosis,
    *,
    signal: int = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
    facts: HostFacts | None = None,
) -> FreePlan:
    """Decide, from a diagnosis, what to signal, what to destroy and what to leave alone.

    Pure given ``facts`` (gathered from this process and kernel when omitted).
    """
    grace = parse_seconds(grace, what="grace")
    facts = HostFacts.gather() if facts is None else facts
    got = _sort_blockers(d, facts, force, outgoing)
    targets = tuple(
        Target(o.pid, o.start_ticks or 0, o.name, o.uid, tuple(socks), tuple(fds))
        for o, socks, fds in got.targets.values()
    )
    refused = tuple(
        Refused(o.pid, o.name, why, tuple(socks))
        for o, why, socks in got.refused.values()
        if o.pid not in got.targets
    )
    # Stopping a process that holds connections leaves FIN_WAIT/TIME_WAIT orphans behind.
    orphans = any(r.state not in _IDLE for t in targets for r in t.sockets)
    orphans_stay = facts.destroy_blocked() if orphans else ""
    obstacles: tuple[Obstacle, ...] = ()
    if not d.bindable:
        obstacles = _obstacles(d, facts, got.not_sockets, refused, got.unowned, got.expiring)
    if orphans_stay and not d.bindable:
        text = f"connections the stopped processes leave behind: {orphans_stay}; they expire by themselves"
        obstacles = (*obstacles, Obstacle(ObstacleKind.CANNOT_DESTROY, text, int(ExitCode.ENVIRONMENT)))
    return FreePlan(
        request=d.request,
        diagnosis=d,
        signal=parse_signal(signal),
        grace=grace,
        targets=targets,
        refused=refused,
        destroy=tuple(got.destroy),
        expiring=tuple(got.expiring),
        destroy_blocked=got.blocked or orphans_stay,
        unowned=tuple(got.unowned),
        obstacles=obstacles,
        blocking_inodes=frozenset(
            b.entry.socket.inode for b in d.blockers if b.entry.socket.inode and is_socket_blocker(b)
        ),
    )


def _obstacles(
    d: Diagnosis,
    facts: HostFacts,
    not_sockets: list[Obstacle],
    refused: tuple[Refused, ...],
    unowned: list[SocketRecord],
    expiring: list[SocketRecord],
) -> tuple[Obstacle, ...]:
    """Everything the plan leaves in place, most decisive first (it decides the exit status)."""
    no_owner = no_owner_reason(d.table.scan, facts.euid)
    # Unreadable fd tables are missing permission; otherwise the owner is simply not here.
    no_owner_code = ExitCode.ENVIRONMENT if d.table.scan.inaccessible else ExitCode.NO_MATCH
    return (
        *not_sockets,
        *_unexplained(d, not_sockets),
        *(_refused_obstacle(x) for x in refused),
        *(
            Obstacle(ObstacleKind.NO_OWNER, f"{socket_label(r)}: {no_owner}", int(no_owner_code))
            for r in unowned
        ),
        *(_expiring_obstacle(r, facts.destroy_blocked(r)) for r in expiring),
    )


def _not_a_socket(text: str, permission: bool) -> Obstacle:
    code = ExitCode.ENVIRONMENT if permission else ExitCode.USAGE
    return Obstacle(
        ObstacleKind.NOT_A_SOCKET, f"{text}: no socket holds it, so there is nothing to free", int(code)
    )


def _unexplained(d: Diagnosis, not_sockets: list[Obstacle]) -> tuple[Obstacle, ...]:
    """The trial bind fails and the model names no blocker: say what the kernel said."""
    if d.blockers or not_sockets:
        return ()
    # No trial runs where it could change the user's own bind (conflict.probe_is_harmless):
    # then the model's answer stands in for the kernel's.
    trial = d.trial
    err = trial.errno if trial is not None else d.outcome.errno
    if err is not None and err != errno.EADDRINUSE:
        return (_not_a_socket(str(trial) if trial else d.headline, err in (errno.EACCES, errno.EPERM)),)
    what = str(trial) if trial is not None and not trial.ok else "listen() would fail with EADDRINUSE"
    return (Obstacle(ObstacleKind.NO_OWNER, f"{what}, but no socket that blocks it is visible", 1),)


def _refused_obstacle(x: Refused) -> Obstacle:
    socks = ", ".join(sorted({socket_label(s) for s in x.sockets}))
    return Obstacle(ObstacleKind.REFUSED, visible(f"{x.label} holds {socks}: {x.reason}"), EXIT_REFUSED)


def _expiring_obstacle(r: SocketRecord, why: str) -> Obstacle:
    left = (
        f"frees by itself in {fmt_seconds(r.expires_ms)}" if r.expires_ms is not None else "frees by itself"
    )
    return Obstacle(
        ObstacleKind.CANNOT_DESTROY, f"{socket_label(r)}: {why}; {left}", int(ExitCode.ENVIRONMENT)
    )


def plan_free(
    port: int,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
    signal: int | str = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
) -> FreePlan:
    """What :func:`free` would do, without doing it (``rebind free --dry-run``).

    Bad input raises UsageError before anything is read: ``grace`` must be finite seconds in
    [0, 24 days], ``signal`` a signal name or number.
    """
    grace = parse_seconds(grace, what="grace")
    sig = parse_signal(signal)
    req = bind_request(port, addr=addr, proto=proto, reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only)
    return add_collateral(make_plan(diagnose(req), signal=sig, grace=grace, force=force, outgoing=outgoing))


# ---------------------------------------------------------------------------------------------
# Collateral: what else stopping a target takes down (I/O: /proc and one socket dump)

#: More entries than this per target are summarised as "+N more".
MAX_OTHER_SOCKETS = 50
#: ``OtherSocket.local`` of a target's outgoing connections (grouped: one entry per state).
OUTGOING = "(outgoing)"
_SERVING = ("LISTEN", "BOUND_INACTIVE", "UNCONN")


def collateral_summary(others: Iterable[OtherSocket]) -> str:
    """One line naming every other port (and counting other sockets) the signals take down."""
    ports: dict[tuple[int, str], list[str]] = {}
    conns: dict[tuple[int, str], int] = {}
    unix = unknown = outgoing = 0
    for o in others:
        if o.local == OUTGOING:
            outgoing += o.count
        elif o.port is not None:
            key = (o.port, o.proto)
            ports.setdefault(key, [])
            if o.serves:
                if o.state not in ports[key] and o.state != "UNCONN":
                    ports[key].append(o.state)
            else:
                conns[key] = conns.get(key, 0) + o.count
        elif o.proto == "unix":
            unix += o.count
        else:
            unknown += o.count
    parts = []
    for port, proto in sorted(ports):
        notes = list(ports[(port, proto)])
        n = conns.get((port, proto), 0)
        if n:
            notes.append(f"{n} connection{'s' if n != 1 else ''}")
        parts.append(f"{port}/{proto}" + (f" ({', '.join(notes)})" if notes else ""))
    if outgoing:
        parts.append(f"{outgoing} outgoing connection{'s' if outgoing != 1 else ''}")
    if unix:
        parts.append(f"{unix} unix socket{'s' if unix != 1 else ''}")
    if unknown:
        parts.append(f"{unknown} other socket{'s' if unknown != 1 else ''}")
    return ", ".join(parts)


def add_collateral(plan: FreePlan, proc: str | None = None) -> FreePlan:
    """The plan with each target's ``also_holds`` filled in from its fd table (free kills the
    whole process, not just the socket: the user must see every other port it serves before
    saying yes). Best effort: a process that exited or changed meanwhile shows nothing extra."""
    if not plan.targets:
        return plan
    if proc is None:
        from rebind.kernel.owners import proc_root

        proc = proc_root()
    blocking = set(plan.blocking_inodes) | {r.inode for t in plan.targets for r in t.sockets if r.inode}
    held = {t.pid: _socket_inodes(t, proc) - blocking for t in plan.targets}
    wanted = set().union(*held.values())
    if not wanted:
        return plan
    records = _inet_records(wanted)
    targets = []
    unix_all: dict[int, str] = {}
    for t in plan.targets:
        unix = _unix_paths(t.pid, held[t.pid] - records.keys(), proc)
        unix_all.update(unix)
        targets.append(replace(t, also_holds=_group(held[t.pid], records, unix)))
    return replace(plan, targets=tuple(targets), collateral=_group(wanted, records, unix_all))


def _socket_inodes(t: Target, proc: str) -> set[int]:
    from rebind.kernel.procfs import ProcFS
    from rebind.kernel.procstat import start_ticks

    out = ProcFS(proc).socket_fds(t.pid).inodes()
    # Read after the fds: a pid recycled meanwhile is another process, not this target.
    return out if start_ticks(t.pid, proc) == t.start_ticks else set()


def _inet_records(inodes: set[int]) -> dict[int, SocketRecord]:
    """TCP (every state) and UDP sockets of this network namespace with these inodes."""
    from rebind.sockets import iter_records

    out: dict[int, SocketRecord] = {}
    recs, _source, _warnings = iter_records(states=frozenset(State))
    for r in recs:
        if r.inode in inodes:
            out.setdefault(r.inode, r)
    return out


def _unix_paths(pid: int, inodes: set[int], proc: str) -> dict[int, str]:
    """Inode -> path (or "" when unnamed; ``@name`` when abstract) of the process's unix sockets."""
    if not inodes:
        return {}
    out: dict[int, str] = {}
    try:
        with open(f"{proc}/{pid}/net/unix", encoding="utf-8", errors="surrogateescape") as f:
            next(f, None)
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=7)
                if len(parts) >= 7 and parts[6].isdigit() and int(parts[6]) in inodes:
                    out[int(parts[6])] = parts[7] if len(parts) > 7 else ""
    except OSError:
        pass
    return out


def _other_order(o: OtherSocket) -> tuple[int, int, str, bool, str, str]:
    # Other ports first (by port), then outgoing connections, unix sockets, the unidentified.
    rank = 0 if o.port is not None else 1 if o.local == OUTGOING else 2 if o.proto == "unix" else 3
    return (rank, o.port or 0, o.proto, not o.serves, o.state, o.local)


def _group(
    inodes: set[int], records: dict[int, SocketRecord], unix: dict[int, str]
) -> tuple[OtherSocket, ...]:
    # Connections on a port the process serves are its server side (grouped per local address);
    # the others are its outgoing connections (grouped together: ephemeral ports say nothing).
    served = {(r.proto, r.local.port) for r in records.values() if r.inode in inodes and r.state in _IDLE}
    counts: dict[OtherSocket, int] = {}
    for ino in sorted(inodes):
        r = records.get(ino)
        if r is not None and (r.state in _IDLE or (r.proto, r.local.port) in served):
            key = OtherSocket(r.proto.value, r.state.label, str(r.local), r.local.port)
        elif r is not None:
            key = OtherSocket(r.proto.value, r.state.label, OUTGOING)
        elif ino in unix:
            key = OtherSocket("unix", "", visible(unix[ino]))
        else:
            key = OtherSocket("socket")
        counts[key] = counts.get(key, 0) + 1
    out = [replace(k, count=n) for k, n in counts.items()]
    out.sort(key=_other_order)
    if len(out) > MAX_OTHER_SOCKETS:
        rest = sum(o.count for o in out[MAX_OTHER_SOCKETS:])
        out = [*out[:MAX_OTHER_SOCKETS], OtherSocket("socket", count=rest)]
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Act


def free(
    port: int,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
    signal: int | str = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
    on_event: Event | None = None,
) -> FreeResult:
    """Make ``addr:port`` bindable with these options: stop its holders, destroy leftovers, verify.

    ``signal`` goes first; processes still alive after ``grace`` seconds get SIGKILL. Other
    users' processes are signalled only as root with ``force``; outgoing connections that
    happen to use the port only with ``outgoing``. When the plan cannot make the port bindable
    (``plan.obstacles``: a refused holder, an owner nobody can see, no socket at all), nothing is
    touched. ``on_event`` gets one line per step (process names escaped). Returns what was done
    and what remains (``exit_code`` as the CLI's).
    """
    if on_event is not None and not callable(on_event):
        raise UsageError(f"on_event must be a function taking one line, not {on_event!r}")
    plan = plan_free(
        port,
        addr=addr,
        proto=proto,
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=v6only,
        signal=signal,
        grace=grace,
        force=force,
        outgoing=outgoing,
    )
    if not plan.worth_acting:
        result = FreeResult(plan, (), (), plan.diagnosis)
        return replace(result, remaining=explain_remaining(result))
    return execute_plan(plan, on_event=on_event)


def execute_plan(plan: FreePlan, *, on_event: Event | None = None) -> FreeResult:
    """Carry out a plan made earlier, then verify with a trial bind.

    Right before each signal the target is re-identified through a pidfd (same pid, same start
    time) and must still hold one of the blocking sockets; otherwise it is skipped and
    ``on_event`` says why. The plan is carried out even if ``plan.obstacles`` say it cannot free
    the port (:func:`free` does not act then).
    """
    if not isinstance(plan, FreePlan):
        raise UsageError(f"execute_plan() needs a FreePlan (from plan_free()), not {type(plan).__name__}")
    if on_event is not None and not callable(on_event):
        raise UsageError(f"on_event must be a function taking one line, not {on_event!r}")
    parse_seconds(plan.grace, what="grace")  # before any signal: a wait that cannot end
    # Messages carry process names: control characters are escaped before anyone prints them.
    say: Event = (lambda msg: on_event(visible(msg))) if on_event else (lambda _msg: None)
    processes = _stop_processes(plan, say)
    sockets = _destroy(plan.destroy, say)
    if processes:
        sockets += _settle(plan, {s.socket.key for s in sockets}, say)
    after = diagnose(plan.request)
    result = FreeResult(plan, tuple(processes), tuple(sockets), after)
    return replace(result, remaining=explain_remaining(result))


def _stop_processes(plan: FreePlan, say: Event) -> list[ProcessOutcome]:
    from rebind.kernel.pidfd import ProcessChanged, open_verified

    out: dict[int, ProcessOutcome] = {}
    pfds: dict[int, int] = {}
    by_pid = {t.pid: t for t in plan.targets}
    first = (signal_name(plan.signal),)
    try:
        for t in plan.targets:
            try:
                pfds[t.pid] = open_verified(t.pid, t.start_ticks)
            except ProcessChanged:
                fate = _changed_fate(t)
                out[t.pid] = ProcessOutcome(t, fate)
                why = "pid reused by another process" if fate is Fate.REUSED else "already exited"
                say(f"{t.label}: {why}; not signalled")
            except OSError as exc:  # EMFILE, or no pidfds at all: it cannot be pinned
                out[t.pid] = ProcessOutcome(t, Fate.UNVERIFIED)
                say(f"{t.label}: cannot open a pidfd ({exc.strerror}); not signalled")
        started = time.monotonic()
        alive = _signal_all(pfds, by_pid, plan, plan.signal, (), out, say)
        gone = _wait_exit({p: pfds[p] for p in alive}, plan.grace)
        _record_exits(gone, by_pid, out, Fate.EXITED, first, started, say)
        alive -= gone
        if alive and plan.signal != _signal.SIGKILL:
            say(
                f"still running after {plan.grace:g}s: {', '.join(by_pid[p].label for p in sorted(alive))}; "
                "sending SIGKILL"
            )
            alive = _signal_all({p: pfds[p] for p in alive}, by_pid, plan, _signal.SIGKILL, first, out, say)
            gone = _wait_exit({p: pfds[p] for p in alive}, KILL_WAIT)
            sent = (*first, "SIGKILL")
            _record_exits(gone, by_pid, out, Fate.KILLED, sent, started, say)
            alive -= gone
        for p in alive:
            out[p] = ProcessOutcome(by_pid[p], Fate.SURVIVED, (*first, "SIGKILL"))
    finally:
        for fd in pfds.values():
            os.close(fd)
    return [out[t.pid] for t in plan.targets if t.pid in out]


def _changed_fate(t: Target) -> Fate:
    from rebind.kernel.pidfd import PROC
    from rebind.kernel.procstat import start_ticks

    return Fate.GONE if start_ticks(t.pid, PROC) is None else Fate.REUSED


def _signal_all(
    pfds: dict[int, int],
    by_pid: dict[int, Target],
    plan: FreePlan,
    sig: int,
    sent_before: tuple[str, ...],
    out: dict[int, ProcessOutcome],
    say: Event,
) -> set[int]:
    """Signal each pinned process that still holds a blocking socket; returns the pids signalled
    (the others are recorded in ``out``)."""
    from rebind.kernel.pidfd import Holding, holds_socket, send_signal

    sent: set[int] = set()
    for pid, pfd in pfds.items():
        t = by_pid[pid]
        # The plan may be stale (Proceed? waited, or the grace period passed): a process that
        # closed its sockets meanwhile is no longer what blocks the port.
        holding = holds_socket(
            pfd, pid, plan.blocking_inodes or {s.inode for s in t.sockets if s.inode}, t.fds
        )
        if holding is not Holding.YES:
            fate = Fate.RELEASED if holding is Holding.NO else Fate.UNVERIFIED
            out[pid] = ProcessOutcome(t, fate, sent_before)
            why = (
                "no longer holds a socket that blocks the port"
                if fate is Fate.RELEASED
                else "could not read its fds to confirm it still holds the socket"
            )
            say(f"{t.label}: {why}; not sent {signal_name(sig)}")
            continue
        try:
            delivered = send_signal(pfd, sig)
        except PermissionError:
            out[pid] = ProcessOutcome(t, Fate.DENIED, sent_before)
            say(f"{t.label}: not permitted to send {signal_name(sig)}")
            continue
        if delivered:
            sent.add(pid)
            say(f"sent {signal_name(sig)} to {t.label}")
        elif pid not in out:
            out[pid] = ProcessOutcome(t, Fate.GONE, sent_before)
    return sent


def _wait_exit(pfds: dict[int, int], timeout: float) -> set[int]:
    """Pids whose pidfd became readable (the process exited) within timeout seconds."""
    gone: set[int] = set()
    pending = {fd: pid for pid, fd in pfds.items()}
    poller = select.poll()  # not select(): pidfds may be numbered above FD_SETSIZE
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left < 0:
            break
        for fd, _ in poller.poll(math.ceil(left * 1000)):
            if fd in pending:
                gone.add(pending.pop(fd))
                poller.unregister(fd)
    return gone


def _record_exits(
    gone: Iterable[int],
    by_pid: dict[int, Target],
    out: dict[int, ProcessOutcome],
    fate: Fate,
    sent: tuple[str, ...],
    started: float,
    say: Event,
) -> None:
    now = time.monotonic() - started
    for pid in gone:
        out[pid] = ProcessOutcome(by_pid[pid], fate, sent, now)
        how = "exited" if fate is Fate.EXITED else "killed by SIGKILL"
        say(f"{by_pid[pid].label}: {how} after {now:.1f}s")


def _destroy(recs: Iterable[SocketRecord], say: Event) -> list[SocketOutcome]:
    from rebind.kernel.diag import destroy

    out = []
    for r in recs:
        try:
            destroy(r)
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                out.append(SocketOutcome(r, SocketFate.GONE))  # expired or closed meanwhile
            else:
                out.append(SocketOutcome(r, SocketFate.FAILED, str(exc)))
                say(f"could not destroy {socket_label(r)}: {exc}")
            continue
        out.append(SocketOutcome(r, SocketFate.DESTROYED))
        say(f"destroyed {socket_label(r)}")
    return out


def _settle(plan: FreePlan, done: set[object], say: Event) -> list[SocketOutcome]:
    """Destroy the orphans the stopped processes left behind (their server-side connections).

    A closed connection turns into its leftover (FIN_WAIT1, then the FIN_WAIT2/TIME_WAIT
    mini-socket) only as the peers exchange FIN and ACK, which a loaded machine may delay: keep
    looking until SETTLE_ROUNDS passes in a row find nothing new, or SETTLE_SECONDS pass.
    """
    out: list[SocketOutcome] = []
    deadline = time.monotonic() + SETTLE_SECONDS
    quiet = 0
    while quiet < SETTLE_ROUNDS and time.monotonic() < deadline:
        d = diagnose(plan.request, owners=False)
        if d.bindable:
            break
        fresh = [
            b.entry.socket
            for b in d.blockers
            if is_socket_blocker(b)
            and not b.entry.socket.inode
            and b.entry.socket.key not in done
            and not destroy_blocked_reason(b.entry.socket)
        ]
        if fresh:
            done.update(r.key for r in fresh)
            out += _destroy(fresh, say)
            quiet = 0
        else:
            quiet += 1
        time.sleep(SETTLE_PAUSE)
    return out


# ---------------------------------------------------------------------------------------------
# Verify


def explain_remaining(result: FreeResult) -> tuple[str, ...]:
    """One line per socket that still blocks the bind, saying why it is still there."""
    after = result.after
    if after.bindable:
        return ()
    plan = result.plan
    refused = {r.pid: r for r in plan.refused}
    fates = {o.target.pid: o for o in result.processes}
    failed = {s.socket.key: s.error for s in result.sockets if s.fate is SocketFate.FAILED}
    lines: list[str] = []
    for b in after.blockers:
        r = b.entry.socket
        what = socket_label(r)
        if not is_socket_blocker(b):
            lines.append(f"{b.blocker.reason} (no socket involved)")
            continue
        if not r.inode:
            lines.append(f"{what}: {_orphan_note(r, failed.get(r.key))}")
            continue
        if not b.entry.owners:
            lines.append(f"{what}: {no_owner_reason(after.table.scan, os.geteuid())}")
            continue
        idle = (
            " (bound but not listening: a listener stopped by SOCK_DESTROY or shutdown() keeps an "
            "explicitly bound port until every fd to it is closed)"
            if r.state is State.BOUND_INACTIVE
            else ""
        )
        for o in b.entry.owners:
            lines.append(f"{what}: {_owner_note(o, refused, fates)}{idle}")
    if not after.blockers:
        lines.append(f"{after.trial}, but no socket that blocks it is visible")
    return tuple(visible(line) for line in lines)


def _orphan_note(r: SocketRecord, error: str | None) -> str:
    if r.is_mini and r.expires_ms is not None:
        left = f"frees by itself in {fmt_seconds(r.expires_ms)}"
    else:
        left = "frees when the kernel gives up on the connection"
    why = error or destroy_blocked_reason(r) or "appeared after the last SOCK_DESTROY pass"
    return f"{why}; {left}"


def _owner_note(o: Owner, refused: dict[int, Refused], fates: dict[int, ProcessOutcome]) -> str:
    who = f"{owner_label(o)} fd {o.fd}"
    if o.pid in refused:
        return f"held by {who}, left alone: {refused[o.pid].reason}"
    outcome = fates.get(o.pid)
    if outcome is not None and outcome.fate in (Fate.SURVIVED, Fate.DENIED):
        return f"held by {who}, which {outcome.fate.value} ({' then '.join(outcome.signals) or 'no signal'})"
    if outcome is not None and outcome.fate is Fate.UNVERIFIED:
        return f"held by {who}, not signalled: its fds could not be read to confirm it still held the socket"
    return (
        f"held by {who}, which was not in the plan (started or forked after planning, or it "
        "inherited the fd); run `rebind free` again"
    )


def describe_target(t: Target) -> str:
    socks = ", ".join(sorted({socket_label(s) for s in t.sockets}))
    fds = ",".join(str(f) for f in sorted(set(t.fds)))
    return f"{t.label} (uid {t.uid}): {socks} via fd {fds}"
