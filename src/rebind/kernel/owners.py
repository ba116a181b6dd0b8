"""Which processes hold a socket: a BPF iterator when possible, else the /proc/PID/fd scan.

inet_diag gives a socket's inode; the fd tables say who holds it. The fast path
(:mod:`rebind.kernel.bpf`, root with BTF, Linux 5.17+) reads every task's fd table in the
kernel, in one pass, without guessing or skipping anyone. Where it cannot run (not root, no
BTF, a verifier that says no, REBIND_PROC_ROOT set, or REBIND_NO_BPF=1) the /proc scan does
the same job. Reading every fd link there is the expensive part (ss -p, lsof and psutil all
do it), so:

* processes in another network namespace are skipped: a socket lives in the netns it was created
  in, and a process elsewhere can hold it only through SCM_RIGHTS or setns() tricks -- we check
  the namespace link, not guess;
* processes are ordered likely-first (the socket's uid), and the work is split across forked
  workers by fd count (stat() of /proc/PID/fd reports the number of open fds since Linux 6.2);
* when no wanted socket has an inode (timewait mini-sockets), nothing is scanned at all.

A hit names a process only with its identity: each process is pinned with a pidfd *before* its
fds are read and must still be alive after (pid + start time, as the BPF path records them),
so a pid reused meanwhile is never reported -- and never signalled by `rebind free`.
Processes vanishing mid-scan and permission-denied processes are normal: counted, never guessed.
The /proc root is a :class:`~rebind.kernel.procfs.ProcFS` handed down (psutil's ``PROCFS_PATH``, as
an object) instead of patching ``open``; ``REBIND_PROC_ROOT`` names another by default.
"""

from __future__ import annotations

import marshal
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, replace
from typing import NamedTuple

from rebind.kernel.pidfd import DupWatch, exited, own_duplicates, pin
from rebind.kernel.procfs import FdRead, ProcFS
from rebind.kernel.procstat import start_ticks
from rebind.model.records import Owner, OwnerScanReport, SocketRecord

#: Below this many fds in total a single process is faster than forking workers.
PARALLEL_MIN_FDS = 20_000
MAX_WORKERS = 4


@dataclass(frozen=True, slots=True)
class _Plan:
    pids: tuple[int, ...]
    fd_counts: tuple[int, ...]
    other_netns: int
    vanished: int


#: Why the last find_owners() call did not use BPF (None: it did, or it was not asked to).
bpf_fallback_reason: str | None = None


def proc_root() -> str:
    return ProcFS.default().root


def bpf_wanted(root: str) -> bool:
    """BPF looks at the live kernel: only for the real /proc, and not when told not to."""
    return ProcFS(root).live and os.environ.get("REBIND_NO_BPF", "") in ("", "0")


#: Test seam: called with each pid right after its fd table was read and before its identity
#: is confirmed (tests force pid reuse there). Never set outside tests.
_after_fd_scan: Callable[[int], None] | None = None


def find_owners(
    records: Iterable[SocketRecord],
    *,
    proc: ProcFS | None = None,
    workers: int | None = None,
    files: Mapping[int, int] | None = None,
) -> tuple[dict[int, tuple[Owner, ...]], OwnerScanReport]:
    """Map socket inode -> owners (every pid and fd), with a report of what could not be read.

    An owner is reported only if the process that held the socket is the one described: its
    identity (pid + start time) is taken before its fds are read and confirmed after.
    ``files``: inode -> the socket's struct file address, where the caller read it (the BPF
    scan's head start: kernel/bpf/scan.find_socket_holders).
    """
    global bpf_fallback_reason
    proc = proc or ProcFS.default()
    recs = [r for r in records if r.inode]
    bpf_fallback_reason = None
    if not recs:
        return {}, OwnerScanReport()
    # rebind's own transient pidfd_getfd duplicates (another thread reading socket flags) would
    # look like rebind holding the socket: leave out every fd that was one during the scan.
    with own_duplicates() as dups:
        if bpf_wanted(proc.root):
            from rebind.kernel import bpf as bpf_iter

            try:
                result = bpf_iter.find_socket_holders(
                    (r.inode for r in recs if r.inode),
                    uids=(r.uid for r in recs if r.uid is not None),
                    netns=_only(r.netns for r in recs),
                    files=files,
                )
            except bpf_iter.BPFUnavailable as exc:
                bpf_fallback_reason = str(exc)
            else:
                hits = [Hit(h.pid, h.fd, h.inode, h.start_ticks) for h in result.hits]
                # Every task of the system was visited (no namespace pruning, no permission
                # failures).
                return _owners(_not_ours(hits, dups), proc, OwnerScanReport(scanned=result.tables))
        wanted = frozenset(r.inode for r in recs if r.inode)
        netns = {r.netns for r in recs if r.netns is not None}
        uids = {r.uid for r in recs if r.uid is not None}
        plan = _plan(proc, netns, uids)
        hits, inaccessible, vanished = _scan(proc, plan, wanted, workers)
    report = OwnerScanReport(
        scanned=len(plan.pids) - inaccessible,
        inaccessible=inaccessible,
        vanished=plan.vanished + vanished,
        other_netns=plan.other_netns,
    )
    return _owners(_not_ours(hits, dups), proc, report)


def _only(values: Iterable[int | None]) -> int | None:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _not_ours(hits: Iterable[Hit], dups: DupWatch) -> list[Hit]:
    me = os.getpid()
    return [h for h in hits if not (h.pid == me and h.fd in dups.fds)]


def _owners(
    hits: list[Hit], proc: ProcFS, report: OwnerScanReport
) -> tuple[dict[int, tuple[Owner, ...]], OwnerScanReport]:
    owners: dict[int, list[Owner]] = {}
    details: dict[int, Owner | None] = {}
    for hit in sorted(hits):
        if hit.pid not in details:
            details[hit.pid] = _describe_as(hit.pid, hit.start_ticks, proc)
        base = details[hit.pid]
        if base is not None:
            owners.setdefault(hit.inode, []).append(_with_fd(base, hit.fd))
    vanished = sum(base is None for base in details.values())  # processes, not fds
    if vanished:
        report = replace(report, vanished=report.vanished + vanished)
    return {k: tuple(sorted(v, key=lambda o: (o.pid, o.fd))) for k, v in owners.items()}, report


def _describe_as(pid: int, start: int, proc: ProcFS) -> Owner | None:
    """Details of the process that held the socket, or None if the pid now names another one.

    The scan saw the process that started at ``start``; a different start now means it exited
    and the pid was reused. A pidfd brackets the reads where it can, so a process that exits
    while being described is not mixed up with its successor either.
    """
    with _Identity(proc, pid) as ident:
        if ident.gone:
            return None
        base = describe_process(pid, proc=proc)
        if base is None or base.start_ticks != start or ident.confirm() != start:
            return None
        return base


def _with_fd(base: Owner, fd: int) -> Owner:
    return Owner(
        pid=base.pid,
        fd=fd,
        name=base.name,
        cmdline=base.cmdline,
        uid=base.uid,
        user=base.user,
        ppid=base.ppid,
        start_time=base.start_time,
        start_ticks=base.start_ticks,
    )


def _plan(proc: ProcFS, netns: set[int], uids: set[int]) -> _Plan:
    rows: list[tuple[int, int, int]] = []  # (priority, pid, fd count)
    other = vanished = 0
    for pid in proc.pids():
        try:
            if netns and os.stat(proc.path(pid, "ns", "net")).st_ino not in netns:
                other += 1
                continue
        except FileNotFoundError:
            vanished += 1
            continue
        except PermissionError:
            pass  # cannot tell its namespace: scan it rather than guess
        try:
            st_dir = os.stat(proc.path(pid))
            # The number of open fds since Linux 6.2 (proc_fd_getattr); 0 before: order only.
            nfds = os.stat(proc.path(pid, "fd")).st_size
        except FileNotFoundError:
            vanished += 1
            continue
        except PermissionError:
            st_dir = None
            nfds = 0
        prio = 0 if st_dir is not None and st_dir.st_uid in uids else 1
        rows.append((prio, pid, nfds))
    rows.sort()
    return _Plan(tuple(r[1] for r in rows), tuple(r[2] for r in rows), other, vanished)


class Hit(NamedTuple):
    pid: int
    fd: int
    inode: int
    #: The holder's start time (/proc/PID/stat field 22), confirmed for the process whose fds
    #: were read.
    start_ticks: int


def _scan_pids(proc: ProcFS, pids: Sequence[int], wanted: Set[int]) -> tuple[list[Hit], int, int]:
    hits: list[Hit] = []
    inaccessible = vanished = 0
    for pid in pids:
        # Identity first: pin the process (or note its start time), then read its fds, then
        # confirm it is the same process. Reading the start time only afterwards would describe
        # whichever process got the pid meanwhile (and `rebind free` would signal it).
        with _Identity(proc, pid) as ident:
            if ident.gone:
                vanished += 1
                continue
            found, state = _read_fds(proc, pid, wanted)
            inaccessible += state is FdRead.INACCESSIBLE
            if not found:
                vanished += state is FdRead.VANISHED
                continue
            if _after_fd_scan is not None:
                _after_fd_scan(pid)
            start = ident.confirm()
            if start is None:
                vanished += 1  # exited (and maybe replaced) while being read: not an owner
                continue
            hits.extend(Hit(pid, fd, inode, start) for fd, inode in found)
    return hits, inaccessible, vanished


class _Identity:
    """Whichever process has ``pid`` before its fds are read; :meth:`confirm` after reading says
    whether it still is the same one (and gives its start time)."""

    def __init__(self, proc: ProcFS, pid: int) -> None:
        self.proc, self.pid = proc, pid
        self.pfd: int | None = None
        self.before: int | None = None
        if proc.live:
            try:
                self.pfd = pin(pid)
            except OSError:
                pass  # no pidfds (Linux < 5.3) or no fd left: the start time alone
        if self.pfd is None:
            self.before = proc.start_ticks(pid)
        self.gone = self.pfd is None and self.before is None

    def confirm(self) -> int | None:
        start = self.proc.start_ticks(self.pid)
        if self.pfd is not None:
            # Pinned before the reads and not exited after: the pid named it all along.
            return None if exited(self.pfd) else start
        return start if start == self.before else None

    def __enter__(self) -> _Identity:
        return self

    def __exit__(self, *_: object) -> None:
        if self.pfd is not None:
            os.close(self.pfd)


def _read_fds(proc: ProcFS, pid: int, wanted: Set[int]) -> tuple[list[tuple[int, int]], FdRead]:
    """(fd, inode) of the wanted sockets in a process's fd table, and how the reading went."""
    got = proc.socket_fds(pid)
    return [(fd, ino) for fd, ino in got.fds.items() if ino in wanted], got.read


def _partition(plan: _Plan, n: int) -> list[list[int]]:
    """Greedy split by fd count, heaviest first, so workers finish together."""
    parts: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for pid, cnt in sorted(zip(plan.pids, plan.fd_counts, strict=True), key=lambda x: -x[1]):
        i = loads.index(min(loads))
        parts[i].append(pid)
        loads[i] += max(cnt, 1)
    return parts


def _scan(proc: ProcFS, plan: _Plan, wanted: Set[int], workers: int | None) -> tuple[list[Hit], int, int]:
    total = sum(plan.fd_counts)
    n = workers if workers is not None else min(os.cpu_count() or 1, MAX_WORKERS)
    # fork() is only safe while this is the sole thread (a lock held by another thread would be
    # inherited locked); libraries embedding rebind in threaded programs get the serial scan.
    if n <= 1 or total < PARALLEL_MIN_FDS or threading.active_count() > 1:
        return _scan_pids(proc, plan.pids, wanted)
    parts = _partition(plan, n)
    children: list[tuple[int, int, list[int]]] = []
    for part in parts[1:]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker
            try:
                os.close(r)
                h, i, v = _scan_pids(proc, part, wanted)
                data = marshal.dumps(([tuple(x) for x in h], i, v))
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view) :]
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r, part))
    hits, inacc, van = _scan_pids(proc, parts[0], wanted)
    for pid, r, part in children:
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.close(r)
        _waitpid(pid)
        try:
            h, i, v = marshal.loads(b"".join(chunks))
        except (EOFError, ValueError, TypeError):
            # The worker died before answering: its processes were not inspected. Count them
            # as such rather than report a partial answer as complete.
            inacc += len(part)
            continue
        hits.extend(Hit(*x) for x in h)
        inacc += i
        van += v
    return hits, inacc, van


def _waitpid(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


# ---------------------------------------------------------------------------------------------
# Process details


def read_start_ticks(pid: int, root: str | None = None) -> int | None:
    """Start time in clock ticks since boot (/proc/PID/stat field 22): identity with the pid."""
    return start_ticks(pid, root or proc_root())


def describe_process(pid: int, *, proc: ProcFS | None = None) -> Owner | None:
    """Details of a live process (psutil), or None if it is gone. fd is left 0."""
    import psutil

    fs = proc or ProcFS.default()
    if fs.root != psutil.PROCFS_PATH:
        psutil.PROCFS_PATH = fs.root
    try:
        ps = psutil.Process(pid)
        with ps.oneshot():
            name = ps.name()
            ppid = ps.ppid()
            start = ps.create_time()
            uids = ps.uids()
            try:
                cmdline = tuple(ps.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
            try:
                user: str | None = ps.username()
            except (KeyError, psutil.Error):
                user = None  # uid without a passwd entry (e.g. a container's user)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return Owner(pid=pid, fd=0, name="?", start_ticks=fs.start_ticks(pid))
    return Owner(
        pid=pid,
        fd=0,
        name=name,
        cmdline=cmdline,
        uid=uids.real,
        user=user or str(uids.real),
        ppid=ppid,
        start_time=start,
        start_ticks=fs.start_ticks(pid),
    )
