"""Make a port bindable again, touching only what blocks the requested bind: plan, act, verify.

* :func:`plan_free` is the dry run: the diagnosis (:func:`rebind.diagnosis.diagnose`) and the
  host's facts (:func:`host_facts`) go into the pure plan (``model/free.py: make_plan``), and
  :func:`add_collateral` names everything else each target holds;
* :func:`free` plans and, when the plan can make the port bindable (no ``obstacles``), carries
  it out with :func:`execute_plan`: the processes are stopped by the escalation through pidfds
  (``actions/free_signal.py``), leftovers without a process are SOCK_DESTROYed, and a trial bind
  verifies the result; what still holds the port is named (``model/free_result.py``).

Wording for people is the renderer's (``render/free.py``); the on_event lines come from the
escalation machine (``model/free_escalation.py``).
"""

from __future__ import annotations

import errno
import os
import signal as _signal
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Unpack

from rebind.diagnosis import BindOptions, diagnose, request_for
from rebind.errors import KernelError, UsageError
from rebind.model.conflict import BindRequest
from rebind.model.free import (
    DEFAULT_GRACE,
    FreePlan,
    HostFacts,
    Refusal,
    Target,
    is_socket_blocker,
    make_plan,
)
from rebind.model.free_collateral import group_sockets
from rebind.model.free_result import FreeResult, SocketFate, SocketOutcome, explain_remaining
from rebind.model.records import SocketRecord, State, socket_label
from rebind.model.validate import parse_seconds, parse_signal
from rebind.textsafe import visible

Event = Callable[[str], None]
#: Rounds of "re-read the port, destroy new orphans" after the processes are gone: their
#: connections turn into FIN_WAIT1/FIN_WAIT2/TIME_WAIT orphans as the files close.
SETTLE_ROUNDS = 4
SETTLE_PAUSE = 0.05
SETTLE_SECONDS = 2.0


def free(
    req: BindRequest | int | str,
    *,
    signal: int | str = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
    on_event: Event | None = None,
    **options: Unpack[BindOptions],
) -> FreeResult:
    """Make ``req`` bindable: stop its holders, destroy leftovers, verify.

    ``req`` is a :class:`BindRequest`, or a port with the bind options as keywords (``addr``,
    ``proto``, ``reuseaddr``, ``reuseport``, ``v6only``, ...: :func:`rebind.default_request`).
    ``signal`` goes first; processes still alive after ``grace`` seconds get SIGKILL. Other
    users' processes are signalled only as root with ``force``; outgoing connections that
    happen to use the port only with ``outgoing``. When the plan cannot make the port bindable
    (``plan.obstacles``: a refused holder, an owner nobody can see, no socket at all), nothing is
    touched. ``on_event`` gets one line per step (process names escaped). Returns what was done
    and what remains (``exit_code`` as the CLI's).
    """
    _check_callback(on_event)
    plan = plan_free(req, signal=signal, grace=grace, force=force, outgoing=outgoing, **options)
    if not plan.worth_acting:
        result = FreeResult(plan, (), (), plan.diagnosis)
        return replace(result, remaining=explain_remaining(result, host_facts(protected=False)))
    return execute_plan(plan, on_event=on_event)


def _check_callback(on_event: object) -> None:
    if on_event is not None and not callable(on_event):
        raise UsageError(f"on_event must be a function taking one line, not {on_event!r}")


def plan_free(
    req: BindRequest | int | str,
    *,
    signal: int | str = _signal.SIGTERM,
    grace: float = DEFAULT_GRACE,
    force: bool = False,
    outgoing: bool = False,
    **options: Unpack[BindOptions],
) -> FreePlan:
    """What :func:`free` would do, without doing it (``rebind free --dry-run``).

    Bad input raises UsageError before anything is read: ``grace`` must be finite seconds in
    [0, 24 days], ``signal`` a signal name or number.
    """
    grace = parse_seconds(grace, what="grace")
    sig = parse_signal(signal)
    request = request_for(req, **options)
    plan = make_plan(diagnose(request), host_facts(), signal=sig, grace=grace, force=force, outgoing=outgoing)
    return add_collateral(plan)


def host_facts(*, protected: bool = True) -> HostFacts:
    """Who is asking and what the kernel allows (``protected=False``: skip the walk up the
    process's ancestors, for wording that does not decide whom to signal)."""
    from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

    return HostFacts(
        os.geteuid(), protected_pids() if protected else {}, has_cap(CAP_NET_ADMIN), kernel_version()
    )


def protected_pids() -> dict[int, Refusal]:
    """PID 1, this process and its ancestors: never signalled."""
    from rebind.kernel.procstat import PPID, stat_field

    out = {1: Refusal.INIT, os.getpid(): Refusal.SELF}
    pid = os.getppid()
    while pid > 1 and pid not in out:
        out[pid] = Refusal.ANCESTOR
        pid = stat_field(pid, PPID) or 0
    return out


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
        targets.append(replace(t, also_holds=group_sockets(held[t.pid], records, unix)))
    return replace(plan, targets=tuple(targets), collateral=group_sockets(wanted, records, unix_all))


def _socket_inodes(t: Target, proc: str) -> set[int]:
    from rebind.kernel.procfs import ProcFS
    from rebind.kernel.procstat import start_ticks

    out = ProcFS(proc).socket_fds(t.pid).inodes()
    # Read after the fds: a pid recycled meanwhile is another process, not this target.
    return out if start_ticks(t.pid, proc) == t.start_ticks else set()


def _inet_records(inodes: set[int]) -> dict[int, SocketRecord]:
    """TCP (every state) and UDP sockets of this network namespace with these inodes."""
    from rebind.kernel.walk import records
    from rebind.model.query import SocketQuery

    out: dict[int, SocketRecord] = {}
    for r in records(SocketQuery.create(states=frozenset(State))):
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


def execute_plan(plan: FreePlan, *, on_event: Event | None = None) -> FreeResult:
    """Carry out a plan made earlier, then verify with a trial bind.

    Right before each signal the target is re-identified through a pidfd (same pid, same start
    time) and must still hold one of the blocking sockets; otherwise it is skipped and
    ``on_event`` says why. The plan is carried out even if ``plan.obstacles`` say it cannot free
    the port (:func:`free` does not act then).
    """
    from rebind.actions.free_signal import stop_processes

    if not isinstance(plan, FreePlan):
        raise UsageError(f"execute_plan() needs a FreePlan (from plan_free()), not {type(plan).__name__}")
    _check_callback(on_event)
    parse_seconds(plan.grace, what="grace")  # before any signal: a wait that cannot end
    facts = host_facts(protected=False)
    # Messages carry process names: control characters are escaped before anyone prints them.
    say: Event = (lambda msg: on_event(visible(msg))) if on_event else (lambda _msg: None)
    processes = stop_processes(plan, say)
    sockets = _destroy(plan.destroy, say)
    if processes:
        sockets += _settle(plan, facts, {s.socket.key for s in sockets}, say)
    result = FreeResult(plan, tuple(processes), tuple(sockets), diagnose(plan.request))
    return replace(result, remaining=explain_remaining(result, facts))


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


def _settle(plan: FreePlan, facts: HostFacts, done: set[object], say: Event) -> list[SocketOutcome]:
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
            and not facts.destroy_blocked(b.entry.socket)
        ]
        if fresh:
            done.update(r.key for r in fresh)
            out += _destroy(fresh, say)
            quiet = 0
        else:
            quiet += 1
        time.sleep(SETTLE_PAUSE)
    return out
