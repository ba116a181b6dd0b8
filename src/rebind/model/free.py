"""`rebind free`'s plan, decided from data alone: a diagnosis and :class:`HostFacts` in, a
:class:`FreePlan` out. Pure: no I/O, so every refusal and obstacle is unit-tested without root.

* The blockers come from the diagnosis (the sockets that block *this* bind with *these* options),
  so a client connected *to* the port is never in the plan: its local port is an ephemeral one.
* A holder is a :class:`Target` (signalled, by the identity captured here: pid + start time) or
  :class:`Refused` (PID 1, rebind itself or an ancestor, another user's process without root and
  force, a container's port proxy, an outgoing connection without ``outgoing``).
* TIME_WAIT / orphan FIN_WAIT2 mini-sockets and orphaned connections have no process: they are
  destroyed with SOCK_DESTROY where the kernel permits it (CAP_NET_ADMIN; TIME_WAIT since Linux
  6.0, bind-rules.md 4.4), otherwise they expire.
* A plan that cannot make the port bindable says why (``FreePlan.obstacles``, most decisive
  first: it decides the exit status), and `free` does not act on it.

Executing a plan is ``actions/free.py`` (the escalation itself: ``model/free_escalation.py``).
"""

from __future__ import annotations

import enum
import errno
import signal as _signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from rebind.errors import ExitCode
from rebind.model.advice import BlockerInfo, Diagnosis
from rebind.model.conflict import BindRequest, Rule
from rebind.model.diagnosis import NO_SOCKET_KINDS, HolderKind, fmt_seconds
from rebind.model.free_collateral import OtherSocket, collateral_summary
from rebind.model.records import (
    LISTENING_STATES,
    Owner,
    OwnerScanReport,
    SocketRecord,
    inaccessible_warning,
    process_label,
    socket_label,
)
from rebind.model.validate import parse_seconds, parse_signal
from rebind.textsafe import visible

DEFAULT_GRACE = 5.0
#: SOCK_DESTROY learned TIME_WAIT (tcp_abort on a timewait sock) in Linux 6.0 (af9784d007d8).
DESTROY_TIME_WAIT_SINCE = (6, 0)
#: Exit status when what blocks the port is something rebind will not touch (PID 1, itself or an
#: ancestor, another user's process without root and --force, a container proxy, an outgoing
#: connection without --outgoing): distinct from 1 ("still busy") and 3 (missing permission).
EXIT_REFUSED = int(ExitCode.REFUSED)
#: Bind failures that involve no socket at all (__inet_bind / __inet6_bind checks that come
#: before any port lookup): nothing to signal or destroy.
NOT_A_SOCKET_RULES = frozenset({Rule.ADDRESS_NOT_LOCAL, Rule.PRIVILEGED_PORT, Rule.INVALID_ADDRESS})


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
    """What a plan depends on beyond the diagnosis: who is asking, and what the kernel allows
    (``actions.free.host_facts()`` reads them)."""

    euid: int
    #: PID 1, rebind itself and its ancestors: never signalled.
    protected: Mapping[int, Refusal]
    cap_net_admin: bool
    kernel_version: tuple[int, int]

    def destroy_blocked(self, rec: SocketRecord | None = None) -> str:
        """Why SOCK_DESTROY cannot remove (this) socket here; "" when it can."""
        if not self.cap_net_admin:
            return "SOCK_DESTROY needs CAP_NET_ADMIN (run as root)"
        if (rec is None or rec.is_mini) and self.kernel_version < DESTROY_TIME_WAIT_SINCE:
            return "SOCK_DESTROY removes TIME_WAIT only since Linux 6.0"
        return ""


@dataclass(frozen=True, slots=True)
class Target:
    """A process to signal, with the identity captured at plan time."""

    pid: int
    start_ticks: int
    name: str
    uid: int | None
    sockets: tuple[SocketRecord, ...]
    fds: tuple[int, ...]
    #: Every other socket it holds (``actions.free.add_collateral``): stopping it takes them down too.
    also_holds: tuple[OtherSocket, ...] = ()

    @property
    def label(self) -> str:
        return process_label(self.name, self.pid)


@dataclass(frozen=True, slots=True)
class Refused:
    pid: int
    name: str
    reason: Refusal
    sockets: tuple[SocketRecord, ...]

    @property
    def label(self) -> str:
        return process_label(self.name, self.pid)


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
    #: workers share sockets): filled in by ``actions.free.add_collateral``.
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
        return any(r.state not in LISTENING_STATES for t in self.targets for r in t.sockets)

    def collateral_summary(self) -> str:
        """``8080/tcp (LISTEN, 7 connections), 5353/udp, 1 unix socket``, or "" when stopping
        the targets takes down nothing but what blocks the port."""
        return collateral_summary(self.collateral)


def make_plan(
    d: Diagnosis,
    facts: HostFacts,
    *,
    signal: int | str = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
) -> FreePlan:
    """Decide, from a diagnosis and the host's facts, what to signal, what to destroy and what
    to leave alone. UsageError for a bad ``signal`` or ``grace``."""
    grace = parse_seconds(grace, what="grace")
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
    orphans = any(r.state not in LISTENING_STATES for t in targets for r in t.sockets)
    orphans_stay = facts.destroy_blocked() if orphans else ""
    obstacles: tuple[Obstacle, ...] = ()
    if not d.bindable:
        obstacles = _obstacles(d, facts, got, refused)
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


def is_socket_blocker(b: BlockerInfo) -> bool:
    """Is this blocker a real socket (not a privileged port, a foreign or invalid address)?"""
    return b.blocker.rule not in NOT_A_SOCKET_RULES and b.kind not in NO_SOCKET_KINDS


def _not_a_socket(text: str, permission: bool) -> Obstacle:
    code = ExitCode.ENVIRONMENT if permission else ExitCode.USAGE
    return Obstacle(
        ObstacleKind.NOT_A_SOCKET, f"{text}: no socket holds it, so there is nothing to free", int(code)
    )


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


def _obstacles(
    d: Diagnosis, facts: HostFacts, got: _Buckets, refused: tuple[Refused, ...]
) -> tuple[Obstacle, ...]:
    """Everything the plan leaves in place, most decisive first (it decides the exit status)."""
    no_owner = no_owner_reason(d.table.scan, facts.euid)
    # Unreadable fd tables are missing permission; otherwise the owner is simply not here.
    no_owner_code = ExitCode.ENVIRONMENT if d.table.scan.inaccessible else ExitCode.NO_MATCH
    return (
        *got.not_sockets,
        *_unexplained(d, got.not_sockets),
        *(_refused_obstacle(x) for x in refused),
        *(
            Obstacle(ObstacleKind.NO_OWNER, f"{socket_label(r)}: {no_owner}", int(no_owner_code))
            for r in got.unowned
        ),
        *(_expiring_obstacle(r, facts.destroy_blocked(r)) for r in got.expiring),
    )


def no_owner_reason(scan: OwnerScanReport, euid: int) -> str:
    """Why a socket that has a file shows no owner, from what the owner scan could not read."""
    if scan.inaccessible:
        return inaccessible_warning(scan.inaccessible, euid)
    return (
        "no process visible here holds it: its owner is outside this PID namespace (a container's "
        "host, or /proc mounted with hidepid), or it is held only in flight (SCM_RIGHTS)"
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
