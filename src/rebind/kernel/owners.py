"""Which processes hold a socket: a BPF iterator when possible, else the /proc/PID/fd scan.

inet_diag gives a socket's inode; the fd tables say who holds it. The fast path
(:mod:`rebind.kernel.bpf_iter`, root with BTF, Linux 5.8+) reads every task's fd table in the
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

Processes vanishing mid-scan and permission-denied entries are normal: counted, never guessed.
The /proc root is configurable (as psutil does) instead of patching ``open``.
"""

from __future__ import annotations

import errno
import marshal
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rebind.kernel.procstat import STARTTIME, stat_field
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
    return os.environ.get("REBIND_PROC_ROOT", "/proc")


def bpf_wanted(root: str) -> bool:
    """BPF looks at the live kernel: only for the real /proc, and not when told not to."""
    return root == "/proc" and os.environ.get("REBIND_NO_BPF", "") in ("", "0")


def find_owners(
    records: Iterable[SocketRecord],
    *,
    root: str | None = None,
    workers: int | None = None,
) -> tuple[dict[int, tuple[Owner, ...]], OwnerScanReport]:
    """Map socket inode -> owners (every pid and fd), with a report of what could not be read."""
    global bpf_fallback_reason
    root = root or proc_root()
    recs = [r for r in records if r.inode]
    bpf_fallback_reason = None
    if not recs:
        return {}, OwnerScanReport()
    if bpf_wanted(root):
        from rebind.kernel import bpf as bpf_iter

        try:
            return _find_owners_bpf(recs, root)
        except bpf_iter.BPFUnavailable as exc:
            bpf_fallback_reason = str(exc)
    wanted = {f"socket:[{r.inode}]": r.inode for r in recs if r.inode}
    netns = {r.netns for r in recs if r.netns is not None}
    uids = {r.uid for r in recs if r.uid is not None}
    plan = _plan(root, netns, uids)
    hits, inaccessible, vanished = _scan(root, plan, wanted, workers)
    owners: dict[int, list[Owner]] = {}
    details: dict[int, Owner | None] = {}
    for pid, fd, inode in hits:
        if pid not in details:
            details[pid] = describe_process(pid, root=root)
        base = details[pid]
        if base is None:
            vanished += 1
            continue
        owners.setdefault(inode, []).append(_with_fd(base, fd))
    report = OwnerScanReport(
        scanned=len(plan.pids) - inaccessible,
        inaccessible=inaccessible,
        vanished=plan.vanished + vanished,
        other_netns=plan.other_netns,
    )
    return {k: tuple(sorted(v, key=lambda o: (o.pid, o.fd))) for k, v in owners.items()}, report


def _find_owners_bpf(
    recs: list[SocketRecord], root: str
) -> tuple[dict[int, tuple[Owner, ...]], OwnerScanReport]:
    from rebind.kernel import bpf as bpf_iter

    netns = {r.netns for r in recs}
    result = bpf_iter.find_socket_holders(
        (r.inode for r in recs if r.inode),
        uids=(r.uid for r in recs if r.uid is not None),
        netns=next(iter(netns)) if len(netns) == 1 else None,
    )
    owners: dict[int, list[Owner]] = {}
    details: dict[int, Owner | None] = {}
    vanished = 0
    for hit in sorted(result.hits, key=lambda h: (h.pid, h.fd)):
        if hit.pid not in details:
            base = describe_process(hit.pid, root=root)
            # The scan saw the process that started at hit.start_ticks; a different start now
            # means it exited and the pid was reused: not an owner.
            if base is not None and base.start_ticks not in (None, hit.start_ticks):
                base = None
            details[hit.pid] = base
        base = details[hit.pid]
        if base is None:
            vanished += 1
            continue
        owners.setdefault(hit.inode, []).append(_with_fd(base, hit.fd))
    # Every task of the system was visited (no namespace pruning, no permission failures).
    report = OwnerScanReport(scanned=result.tables, vanished=vanished)
    return {k: tuple(sorted(v, key=lambda o: (o.pid, o.fd))) for k, v in owners.items()}, report


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


def _plan(root: str, netns: set[int], uids: set[int]) -> _Plan:
    rows: list[tuple[int, int, int]] = []  # (priority, pid, fd count)
    other = vanished = 0
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if netns and os.stat(f"{root}/{pid}/ns/net").st_ino not in netns:
                other += 1
                continue
        except FileNotFoundError:
            vanished += 1
            continue
        except PermissionError:
            pass  # cannot tell its namespace: scan it rather than guess
        try:
            st_dir = os.stat(f"{root}/{pid}")
            nfds = os.stat(f"{root}/{pid}/fd").st_size
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


Hit = tuple[int, int, int]  # pid, fd, inode


def _scan_pids(root: str, pids: Sequence[int], wanted: dict[str, int]) -> tuple[list[Hit], int, int]:
    hits: list[Hit] = []
    inaccessible = vanished = 0
    readlink = os.readlink
    for pid in pids:
        try:
            dfd = os.open(f"{root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            vanished += 1
            continue
        except PermissionError:
            inaccessible += 1
            continue
        except OSError:
            vanished += 1
            continue
        try:
            try:
                names = os.listdir(dfd)
            except PermissionError:
                inaccessible += 1
                continue
            except OSError:
                vanished += 1
                continue
            for name in names:
                try:
                    link = readlink(name, dir_fd=dfd)
                except OSError:
                    continue  # fd closed between listdir and readlink
                inode = wanted.get(link)
                if inode is not None:
                    hits.append((pid, int(name), inode))
        finally:
            os.close(dfd)
    return hits, inaccessible, vanished


def _partition(plan: _Plan, n: int) -> list[list[int]]:
    """Greedy split by fd count, heaviest first, so workers finish together."""
    parts: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for pid, cnt in sorted(zip(plan.pids, plan.fd_counts, strict=True), key=lambda x: -x[1]):
        i = loads.index(min(loads))
        parts[i].append(pid)
        loads[i] += max(cnt, 1)
    return parts


def _scan(root: str, plan: _Plan, wanted: dict[str, int], workers: int | None) -> tuple[list[Hit], int, int]:
    total = sum(plan.fd_counts)
    n = workers if workers is not None else min(os.cpu_count() or 1, MAX_WORKERS)
    # fork() is only safe while this is the sole thread (a lock held by another thread would be
    # inherited locked); libraries embedding rebind in threaded programs get the serial scan.
    if n <= 1 or total < PARALLEL_MIN_FDS or threading.active_count() > 1:
        return _scan_pids(root, plan.pids, wanted)
    parts = _partition(plan, n)
    children: list[tuple[int, int, list[int]]] = []
    for part in parts[1:]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker
            try:
                os.close(r)
                data = marshal.dumps(_scan_pids(root, part, wanted))
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view) :]
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r, part))
    hits, inacc, van = _scan_pids(root, parts[0], wanted)
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
        hits.extend(tuple(x) for x in h)
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
    return stat_field(pid, STARTTIME, root or proc_root())


def describe_process(pid: int, *, root: str | None = None) -> Owner | None:
    """Details of a live process (psutil), or None if it is gone. fd is left 0."""
    import psutil

    root = root or proc_root()
    if root != psutil.PROCFS_PATH:
        psutil.PROCFS_PATH = root
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name = proc.name()
            ppid = proc.ppid()
            start = proc.create_time()
            uids = proc.uids()
            try:
                cmdline = tuple(proc.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
            try:
                user: str | None = proc.username()
            except (KeyError, psutil.Error):
                user = None  # uid without a passwd entry (e.g. a container's user)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return Owner(pid=pid, fd=0, name="?", start_ticks=read_start_ticks(pid, root))
    return Owner(
        pid=pid,
        fd=0,
        name=name,
        cmdline=cmdline,
        uid=uids.real,
        user=user or str(uids.real),
        ppid=ppid,
        start_time=start,
        start_ticks=read_start_ticks(pid, root),
    )


def is_permission_error(exc: OSError) -> bool:
    return exc.errno in (errno.EACCES, errno.EPERM)
