"""Which processes belong to a generation, and signalling them only when positively identified.

"The old generation is everything it started": its leader, the leader's process group, every
descendant, and the descendants that outlived their parent (they re-parent to us: we are a child
subreaper), even one that called setsid(). One /proc pass reads (ppid, pgrp, start time, state) of
every process; a process is a member when

* it is in the leader's process group, or descends from the leader while the leader lives, or
* it was recorded as a member earlier (same pid *and* start time: the snapshot the supervisor
  takes before signalling a generation, so a `sh -c` wrapper's child is known after sh exits), or
* it descends from a member, or from us with ``REBIND_GENERATION=<n>`` in its initial
  environment (an orphan that re-parented to us before we ever saw it),

and it is not a zombie. Signals go through a pidfd opened and checked against the start time at
that moment, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from rebind.kernel.procstat import read_stat

Identity = tuple[int, int]  # (pid, start time in clock ticks since boot)


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    pgrp: int
    start: int
    zombie: bool


def read_proc(pid: int) -> ProcInfo | None:
    st = read_stat(pid, "/proc")
    return None if st is None else ProcInfo(pid, st.ppid, st.pgrp, st.start_ticks, st.zombie)


class ScanFailed(OSError):
    """/proc could not be listed (EMFILE, ENFILE, ENOMEM): nothing can be said about anyone."""


def snapshot() -> dict[int, ProcInfo]:
    out: dict[int, ProcInfo] = {}
    try:
        entries = list(os.scandir("/proc"))
    except OSError as exc:
        raise ScanFailed(exc.errno, f"cannot list /proc: {exc.strerror}") from None
    for entry in entries:
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                out[info.pid] = info
    return out


def _generation_env(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read(1 << 20)
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(b"REBIND_GENERATION="):
            value = item[len(b"REBIND_GENERATION=") :]
            return int(value) if value.isdigit() else None
    return None


def members(
    number: int,
    leader: int | None,
    group: int | None,
    known: Iterable[Identity],
    me: int,
    procs: dict[int, ProcInfo] | None = None,
    exclude: frozenset[int] = frozenset(),
) -> set[Identity]:
    """Live processes of generation NUMBER (LEADER: its leader's pid while not reaped; GROUP:
    its process group id)."""
    procs = snapshot() if procs is None else procs
    known_set = set(known)
    seeds: set[int] = set()
    for p in procs.values():
        if p.pid in exclude or p.pid == me:
            continue
        recorded = (p.pid, p.start) in known_set or (group is not None and p.pgrp == group)
        if recorded or (p.ppid == me and p.pid != leader and _generation_env(p.pid) == number):
            seeds.add(p.pid)
    if leader is not None and leader in procs:
        seeds.add(leader)
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = list(seeds)
    while todo:
        pid = todo.pop()
        if pid in found or pid in exclude or pid == me:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return {(pid, procs[pid].start) for pid in found if not procs[pid].zombie}


def signal_verified(ident: Identity, sig: int) -> bool:
    """SIG to the process only if it is still the one we identified (pidfd + start time)."""
    pid, start = ident
    try:
        pfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # The pidfd pins the process: if the start time still matches after opening it, the pidfd
        # refers to the process we identified, and a reused pid cannot be hit through it.
        info = read_proc(pid)
        if info is None or info.start != start:
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pfd, sig)
            return True
        return False
    finally:
        os.close(pfd)
