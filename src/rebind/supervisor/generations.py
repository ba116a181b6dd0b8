"""The generations' processes: what the machine knows nothing of (pids, process groups, the
members recorded before each signal) and the starting, recording and signalling of them.

"The old generation is everything it started" (members.py): each generation's processes are
recorded before it is signalled and every few seconds; a lingering generation (leader gone,
the rest being stopped) is looked at often, and the machine hears :class:`~vocab.Emptied` once
nothing of it is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from rebind.supervisor import machine as m
from rebind.supervisor import members
from rebind.supervisor.spawn import spawn
from rebind.supervisor.watchdog import Watchdog

MEMBERS_EVERY = 5.0  # how often live generations' process lists are recorded (a /proc pass)
LINGER_POLL = 0.25  # how often a lingering generation is checked for being empty


@dataclass(slots=True)
class Generations:
    leaders: dict[int, int] = field(default_factory=dict)  # number -> leader pid (until reaped)
    by_pid: dict[int, int] = field(default_factory=dict)  # leader pid -> number
    groups: dict[int, int] = field(default_factory=dict)  # number -> process group id (until forgotten)
    known: dict[int, set[members.Identity]] = field(default_factory=dict)  # number -> recorded members
    recorded_at: float = 0.0
    watchdog: Watchdog | None = None  # never a member of any generation

    def started(self, number: int, pid: int) -> None:
        self.leaders[number] = pid
        self.groups[number] = pid  # spawn() makes the leader a process group leader
        self.by_pid[pid] = number
        if self.watchdog is not None:
            self.watchdog.watch(pid)

    def reaped(self, pid: int) -> int | None:
        """The generation whose leader PID was reaped; None for an orphan re-parented to us."""
        number = self.by_pid.pop(pid, None)
        if number is not None:
            self.leaders.pop(number, None)
        return number

    def forget(self, number: int) -> None:
        self.known.pop(number, None)
        self.groups.pop(number, None)

    def name(self, number: int) -> str:
        pid = self.leaders.get(number)
        return f"generation {number}" + (f" (pid {pid})" if pid else "")

    # -- who belongs to a generation ----------------------------------------------------------------

    def members(self, number: int, snap: dict[int, members.ProcInfo] | None = None) -> set[members.Identity]:
        """Live processes of generation NUMBER; what was recorded if /proc cannot be read now."""
        if snap is None:
            try:
                snap = members.snapshot()
            except members.ScanFailed:
                return set(self.known.get(number, set()))
        others = {pid for n, pid in self.leaders.items() if n != number}
        # Leaders of other generations are never members of this one, nor is the watchdog.
        exclude = frozenset(others | ({self.watchdog.pid} if self.watchdog else set()))
        group = self.groups.get(number)
        # A process group id stays reserved while the group has members; once empty, the pid
        # may be reused, e.g. by a newer generation's leader (whose group is not ours).
        if group in others:
            group = None
        known = self.known.get(number, set())
        return members.members(number, self.leaders.get(number), group, known, os.getpid(), snap, exclude)

    def next_record(self, state: m.State) -> float:
        lingering = any(g.role is m.Role.LINGERING for g in state.gens)
        return self.recorded_at + (LINGER_POLL if lingering else MEMBERS_EVERY)

    def record(self, gens: Sequence[m.Gen], now: float) -> Iterator[m.Event]:
        """Record who belongs to which generation; a lingering generation that emptied is an event."""
        self.recorded_at = now
        try:
            snap = members.snapshot()
        except members.ScanFailed:
            return  # out of fds for a moment: look again at the next round
        for gen in gens:
            found = self.members(gen.number, snap)
            self.known[gen.number] = found
            if gen.role is m.Role.LINGERING and not found:
                yield m.Emptied(gen.number, now)

    # -- signals --------------------------------------------------------------------------------------

    def signal_leader(self, number: int, sig: int) -> None:
        pid = self.leaders.get(number)
        if pid is None:
            return
        # Record the whole generation first: a `sh -c` wrapper that exits on this signal leaves
        # orphans that only this record ties to the generation.
        self.known[number] = self.known.get(number, set()) | self.members(number)
        # Safe by pid: a leader is our unreaped child, so its pid cannot be recycled yet.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def signal_rest(self, number: int, sig: int) -> None:
        targets = self.members(number)
        self.known[number] = self.known.get(number, set()) | targets
        for ident in targets:
            members.signal_verified(ident, sig)

    def kill_all(self) -> None:
        """When run() unwinds on an error: SIGKILL to every process of every generation, reaped."""
        for number in {*self.known, *self.leaders, *self.groups}:
            self.signal_rest(number, signal.SIGKILL)
        for pid in list(self.by_pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.reap_orphans()

    def reap_orphans(self) -> None:
        """Kill and reap processes that re-parented to us (we are a child subreaper)."""
        me = os.getpid()
        watchdog = self.watchdog.pid if self.watchdog else -1
        try:
            snap = members.snapshot()
        except members.ScanFailed:
            return
        for p in snap.values():
            if p.ppid == me and p.pid != watchdog:
                if not p.zombie:
                    members.signal_verified((p.pid, p.start), signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, 0)


def fork_generation(
    exe: str,
    argv: Sequence[str],
    env: dict[bytes, bytes],
    fds: Sequence[int],
    reset: Sequence[int],
    tee_optional: bool,
) -> tuple[int, int]:
    """Start a generation; (its leader's pid, the read end of its stderr pipe or -1)."""
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        if not tee_optional:
            raise
        r = w = -1
    try:
        pid = spawn(exe, argv, env, fds, reset, w if w >= 0 else None)
    except BaseException:
        if r >= 0:
            os.close(r)
        raise
    finally:
        if w >= 0:
            os.close(w)
    return pid, r
