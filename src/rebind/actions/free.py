"""Make a port bindable again, touching only what blocks the requested bind.

Plan, then act, then verify:

* the plan comes from :func:`rebind.diagnosis.diagnose` (the sockets that block *this* bind with
  *these* options), so a client connected *to* the port is never in it: its socket's local port
  is an ephemeral one, and the table is filtered by local port;
* processes are signalled only through pidfds opened against the identity (pid + start time)
  captured when the plan was made, so a recycled pid is never hit;
* TIME_WAIT / orphan FIN_WAIT2 mini-sockets and orphaned connections have no process to stop;
  they are removed with SOCK_DESTROY where the kernel permits it (CAP_NET_ADMIN; TIME_WAIT
  since Linux 6.0, bind-rules.md 4.4), otherwise the plan says how long they have left;
* the result is checked with a trial bind, and what still holds the port is named.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import signal as _signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rebind.actions.common import AddrLike, bind_request, owner_label, socket_label, where
from rebind.diagnosis import Diagnosis, diagnose
from rebind.errors import KernelError, UsageError
from rebind.model.conflict import BindRequest
from rebind.model.diagnosis import HolderKind, fmt_seconds
from rebind.model.records import Owner, Proto, SocketRecord, State

DEFAULT_GRACE = 5.0
#: After SIGKILL a process normally dies at once; one in uninterruptible sleep (D) may not.
KILL_WAIT = 5.0
#: Rounds of "re-read the port, destroy new orphans" after the processes are gone: their
#: connections turn into FIN_WAIT1/FIN_WAIT2/TIME_WAIT orphans as the files close.
SETTLE_ROUNDS = 4
SETTLE_PAUSE = 0.05
#: SOCK_DESTROY learned TIME_WAIT (tcp_abort on a timewait sock) in Linux 6.0 (af9784d007d8).
DESTROY_TIME_WAIT_SINCE = (6, 0)

Event = Callable[[str], None]


class Refusal(enum.StrEnum):
    INIT = "PID 1 is never signalled"
    SELF = "that is rebind itself"
    ANCESTOR = "an ancestor of rebind (signalling it would stop rebind's own caller)"
    OTHER_USER = "another user's process: only root with --force may signal it"
    NO_IDENTITY = "its start time could not be read, so a recycled pid could not be ruled out"
    OUTGOING = "only an outgoing connection whose local port is this port (pass --outgoing to include it)"
    CONTAINER = "a container runtime's port proxy: stop or re-map the container instead"


@dataclass(frozen=True, slots=True)
class Target:
    """A process to signal, with the identity captured at plan time."""

    pid: int
    start_ticks: int
    name: str
    uid: int | None
    sockets: tuple[SocketRecord, ...]
    fds: tuple[int, ...]

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
    #: Sockets with a file but no visible owner (another user's process without root, ...).
    unowned: tuple[SocketRecord, ...] = ()

    @property
    def bindable(self) -> bool:
        return self.diagnosis.bindable

    @property
    def has_actions(self) -> bool:
        return bool(self.targets or self.destroy)

    @property
    def leaves_orphans(self) -> bool:
        """Do the targets hold connections on the port? Closing them leaves FIN_WAIT/TIME_WAIT."""
        idle = (State.LISTEN, State.BOUND_INACTIVE, State.CLOSE)
        return any(r.state not in idle for t in self.targets for r in t.sockets)


class Fate(enum.StrEnum):
    EXITED = "exited"  # after the first signal
    KILLED = "killed"  # after SIGKILL (escalation)
    SURVIVED = "survived"  # still alive after SIGKILL (uninterruptible sleep?)
    GONE = "gone"  # had exited before it was signalled
    REUSED = "reused"  # the pid now names another process: not signalled
    DENIED = "denied"  # the kernel refused the signal (EPERM)


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
    #: One line per thing that still holds the port (empty when it is bindable).
    remaining: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.after.bindable


# ---------------------------------------------------------------------------------------------
# Plan


def parse_signal(sig: int | str) -> int:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` -> 15."""
    if isinstance(sig, int):
        number = sig
    else:
        text = sig.strip().upper()
        if text.isdigit():
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

    if not has_cap(CAP_NET_ADMIN):
        return "SOCK_DESTROY needs CAP_NET_ADMIN (run as root)"
    if (rec is None or rec.is_mini) and kernel_version() < DESTROY_TIME_WAIT_SINCE:
        return "SOCK_DESTROY removes TIME_WAIT only since Linux 6.0"
    return ""


def _owner_refusal(
    o: Owner, kind: HolderKind, protected: dict[int, Refusal], euid: int, force: bool, outgoing: bool
) -> Refusal | None:
    if o.pid in protected:
        return protected[o.pid]
    if kind is HolderKind.CONTAINER_PROXY:
        return Refusal.CONTAINER
    if kind is HolderKind.OUTGOING and not outgoing:
        return Refusal.OUTGOING
    if o.uid != euid and not (euid == 0 and force):
        return Refusal.OTHER_USER
    if o.start_ticks is None:
        return Refusal.NO_IDENTITY
    return None


def make_plan(
    d: Diagnosis,
    *,
    signal: int = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
    protected: dict[int, Refusal] | None = None,
    euid: int | None = None,
    destroy_blocked: Callable[[SocketRecord], str] = destroy_blocked_reason,
) -> FreePlan:
    """Decide, from a diagnosis, what to signal, what to destroy and what to leave alone."""
    protected = protected_pids() if protected is None else protected
    euid = os.geteuid() if euid is None else euid
    targets: dict[int, tuple[Owner, list[SocketRecord], list[int]]] = {}
    refused: dict[int, tuple[Owner, Refusal, list[SocketRecord]]] = {}
    destroy: list[SocketRecord] = []
    expiring: list[SocketRecord] = []
    unowned: list[SocketRecord] = []
    blocked = ""
    if not d.bindable:
        for b in d.blockers:
            r = b.entry.socket
            if not r.inode:
                # No file refers to it: a timewait mini-socket or an orphaned connection.
                why = destroy_blocked(r)
                (expiring if why else destroy).append(r)
                blocked = blocked or why
                continue
            if not b.entry.owners:
                unowned.append(r)
                continue
            for o in b.entry.owners:
                refusal = _owner_refusal(o, b.kind, protected, euid, force, outgoing)
                if refusal is None:
                    _, socks, fds = targets.setdefault(o.pid, (o, [], []))
                    socks.append(r)
                    fds.append(o.fd)
                else:
                    refused.setdefault(o.pid, (o, refusal, []))[2].append(r)
    return FreePlan(
        request=d.request,
        diagnosis=d,
        signal=signal,
        grace=grace,
        targets=tuple(
            Target(o.pid, o.start_ticks or 0, o.name, o.uid, tuple(socks), tuple(fds))
            for o, socks, fds in targets.values()
        ),
        refused=tuple(
            Refused(o.pid, o.name, why, tuple(socks))
            for o, why, socks in refused.values()
            if o.pid not in targets
        ),
        destroy=tuple(destroy),
        expiring=tuple(expiring),
        destroy_blocked=blocked,
        unowned=tuple(unowned),
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
    """What :func:`free` would do, without doing it (``rebind free --dry-run``)."""
    if grace < 0:
        raise UsageError(f"grace must be >= 0 seconds, not {grace}")
    sig = parse_signal(signal)
    req = bind_request(port, addr=addr, proto=proto, reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only)
    return make_plan(diagnose(req), signal=sig, grace=grace, force=force, outgoing=outgoing)


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
    happen to use the port only with ``outgoing``. Returns what was done and what remains.
    """
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
    return execute_plan(plan, on_event=on_event)


def execute_plan(plan: FreePlan, *, on_event: Event | None = None) -> FreeResult:
    """Carry out a plan made earlier (identities are re-checked through pidfds)."""
    say = on_event or (lambda _msg: None)
    processes = _stop_processes(plan, say)
    sockets = _destroy(plan.destroy, say)
    if processes:
        sockets += _settle(plan, {s.socket.key for s in sockets}, say)
    after = diagnose(plan.request)
    result = FreeResult(plan, tuple(processes), tuple(sockets), after)
    return FreeResult(plan, result.processes, result.sockets, after, explain_remaining(result))


def _stop_processes(plan: FreePlan, say: Event) -> list[ProcessOutcome]:
    from rebind.kernel.pidfd import ProcessChanged, open_verified

    out: dict[int, ProcessOutcome] = {}
    pfds: dict[int, int] = {}
    by_pid = {t.pid: t for t in plan.targets}
    try:
        for t in plan.targets:
            try:
                pfds[t.pid] = open_verified(t.pid, t.start_ticks)
            except ProcessChanged:
                fate = _changed_fate(t)
                out[t.pid] = ProcessOutcome(t, fate)
                why = "pid reused by another process" if fate is Fate.REUSED else "already exited"
                say(f"{t.label}: {why}; not signalled")
        started = time.monotonic()
        alive = _signal_all(pfds, by_pid, plan.signal, out, say)
        gone = _wait_exit({p: pfds[p] for p in alive}, plan.grace)
        _record_exits(gone, by_pid, out, Fate.EXITED, (signal_name(plan.signal),), started, say)
        alive -= gone
        if alive and plan.signal != _signal.SIGKILL:
            say(
                f"still running after {plan.grace:g}s: {', '.join(by_pid[p].label for p in sorted(alive))}; "
                "sending SIGKILL"
            )
            alive = _signal_all({p: pfds[p] for p in alive}, by_pid, _signal.SIGKILL, out, say)
            gone = _wait_exit({p: pfds[p] for p in alive}, KILL_WAIT)
            sent = (signal_name(plan.signal), "SIGKILL")
            _record_exits(gone, by_pid, out, Fate.KILLED, sent, started, say)
            alive -= gone
        for p in alive:
            out[p] = ProcessOutcome(by_pid[p], Fate.SURVIVED, (signal_name(plan.signal), "SIGKILL"))
    finally:
        for fd in pfds.values():
            os.close(fd)
    return [out[t.pid] for t in plan.targets if t.pid in out]


def _changed_fate(t: Target) -> Fate:
    from rebind.kernel.owners import read_start_ticks

    return Fate.GONE if read_start_ticks(t.pid) is None else Fate.REUSED


def _signal_all(
    pfds: dict[int, int], by_pid: dict[int, Target], sig: int, out: dict[int, ProcessOutcome], say: Event
) -> set[int]:
    """Signal each pidfd; returns the pids that were signalled (the others are recorded)."""
    from rebind.kernel.pidfd import send_signal

    sent: set[int] = set()
    for pid, pfd in pfds.items():
        t = by_pid[pid]
        try:
            delivered = send_signal(pfd, sig)
        except PermissionError:
            out[pid] = ProcessOutcome(t, Fate.DENIED)
            say(f"{t.label}: not permitted to send {signal_name(sig)}")
            continue
        if delivered:
            sent.add(pid)
            say(f"sent {signal_name(sig)} to {t.label}")
        elif pid not in out:
            out[pid] = ProcessOutcome(t, Fate.GONE)
    return sent


def _wait_exit(pfds: dict[int, int], timeout: float) -> set[int]:
    """Pids whose pidfd became readable (the process exited) within timeout seconds."""
    gone: set[int] = set()
    pending = dict(pfds)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left < 0:
            break
        ready, _, _ = select.select(list(pending.values()), [], [], left)
        if not ready:
            break
        for pid, fd in list(pending.items()):
            if fd in ready:
                gone.add(pid)
                del pending[pid]
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
    """Destroy the orphans the stopped processes left behind (their server-side connections)."""
    out: list[SocketOutcome] = []
    for _ in range(SETTLE_ROUNDS):
        d = diagnose(plan.request, owners=False)
        if d.bindable:
            break
        fresh = [
            b.entry.socket
            for b in d.blockers
            if not b.entry.socket.inode
            and b.entry.socket.key not in done
            and not destroy_blocked_reason(b.entry.socket)
        ]
        if fresh:
            done.update(r.key for r in fresh)
            out += _destroy(fresh, say)
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
        if not r.inode:
            lines.append(f"{what}: {_orphan_note(r, failed.get(r.key))}")
            continue
        if not b.entry.owners:
            lines.append(f"{what}: held by a process rebind cannot see (another user's, without root?)")
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
    return tuple(lines)


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
    return (
        f"held by {who}, which was not in the plan (started or forked after planning, or it "
        "inherited the fd); run `rebind free` again"
    )


def describe_target(t: Target) -> str:
    socks = ", ".join(sorted({socket_label(s) for s in t.sockets}))
    fds = ",".join(str(f) for f in sorted(set(t.fds)))
    return f"{t.label} (uid {t.uid}): {socks} via fd {fds}"


def summary(plan: FreePlan) -> str:
    return f"{where(plan.request)}: {plan.diagnosis.headline}"
