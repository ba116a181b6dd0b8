"""Stopping a plan's processes: the escalation machine (``model/free_escalation.py``) driven
through pidfds. Every safety check lives here, at the moment of signalling:

* each target is pinned by a pidfd opened against the identity captured when the plan was made
  (pid + start time, :func:`rebind.kernel.pidfd.open_verified`), so a recycled pid is never hit;
* right before each signal (the first one and SIGKILL) the pinned process must still hold one of
  the blocking sockets (:func:`rebind.kernel.pidfd.holds_socket`): a plan made before "Proceed?"
  or before the grace period may be stale, and a process that let go is no longer the blocker;
* signals go through the pidfd (pidfd_send_signal), exits are seen by polling the pidfds.
"""

from __future__ import annotations

import math
import os
import select
import time
from collections import deque
from collections.abc import Callable

from rebind.model import free_escalation as esc
from rebind.model.free import FreePlan, Target
from rebind.model.free_result import Fate, ProcessOutcome

Say = Callable[[str], None]


def stop_processes(plan: FreePlan, say: Say) -> list[ProcessOutcome]:
    """Carry out the escalation for ``plan.targets``; one outcome each, in plan order."""
    cfg = esc.Config(plan.signal, plan.grace)
    state = esc.start((t.pid, t.label) for t in plan.targets)
    by_pid = {t.pid: t for t in plan.targets}
    pfds: dict[int, int] = {}
    try:
        events: deque[esc.Event] = deque(_pin(t, pfds) for t in plan.targets)
        events.append(esc.Begin(time.monotonic()))
        while events:
            state, actions = esc.step(cfg, state, events.popleft())
            for a in actions:
                events.extend(_carry_out(a, plan, by_pid, pfds, say))
    finally:
        for fd in pfds.values():
            os.close(fd)
    return [
        ProcessOutcome(by_pid[p.pid], p.fate, p.signals, p.seconds) for p in state.procs if p.fate is not None
    ]


def _pin(t: Target, pfds: dict[int, int]) -> esc.Pinned | esc.PinFailed:
    """Open a pidfd against the planned identity: from here on it names this very process."""
    from rebind.kernel.pidfd import ProcessChanged, open_verified

    try:
        pfds[t.pid] = open_verified(t.pid, t.start_ticks)
    except ProcessChanged:
        fate = _changed_fate(t)
        why = "pid reused by another process" if fate is Fate.REUSED else "already exited"
        return esc.PinFailed(t.pid, fate, why)
    except OSError as exc:  # EMFILE, or no pidfds at all: it cannot be pinned
        return esc.PinFailed(t.pid, Fate.UNVERIFIED, f"cannot open a pidfd ({exc.strerror})")
    return esc.Pinned(t.pid)


def _changed_fate(t: Target) -> Fate:
    from rebind.kernel.pidfd import PROC
    from rebind.kernel.procstat import start_ticks

    return Fate.GONE if start_ticks(t.pid, PROC) is None else Fate.REUSED


def _carry_out(
    a: esc.Action, plan: FreePlan, by_pid: dict[int, Target], pfds: dict[int, int], say: Say
) -> list[esc.Event]:
    if isinstance(a, esc.Say):
        say(a.line)
        return []
    if isinstance(a, esc.Signal):
        return [esc.Sent(a.pid, _signal_if_holding(pfds[a.pid], by_pid[a.pid], plan, a.sig))]
    return _wait_exits({p: pfds[p] for p in a.pids}, a.seconds)


def _signal_if_holding(pfd: int, t: Target, plan: FreePlan, sig: int) -> esc.Delivery:
    """Send SIG through the pidfd only while the pinned process still holds a blocking socket."""
    from rebind.kernel.pidfd import Holding, holds_socket, send_signal

    # The plan may be stale (Proceed? waited, or the grace period passed): a process that
    # closed its sockets meanwhile is no longer what blocks the port.
    holding = holds_socket(pfd, t.pid, plan.blocking_inodes or {s.inode for s in t.sockets if s.inode}, t.fds)
    if holding is not Holding.YES:
        return esc.Delivery.RELEASED if holding is Holding.NO else esc.Delivery.UNVERIFIED
    try:
        delivered = send_signal(pfd, sig)
    except PermissionError:
        return esc.Delivery.DENIED
    return esc.Delivery.DELIVERED if delivered else esc.Delivery.VANISHED


def _wait_exits(pfds: dict[int, int], timeout: float) -> list[esc.Event]:
    """One Exited per process whose pidfd became readable (it exited) within ``timeout`` seconds,
    then WaitOver if any is still running."""
    events: list[esc.Event] = []
    pending = {fd: pid for pid, fd in pfds.items()}
    poller = select.poll()  # not select(): pidfds may be numbered above FD_SETSIZE
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left < 0:
            return [*events, esc.WaitOver(time.monotonic())]
        for fd, _ in poller.poll(math.ceil(left * 1000)):
            if fd in pending:
                events.append(esc.Exited(pending.pop(fd), time.monotonic()))
                poller.unregister(fd)
    return events
