"""pidfds: signal and inspect exactly the process we identified, never a recycled pid.

A pid is only an identity together with its start time (/proc/PID/stat field 22). We open a
pidfd, then re-check the start time: if it still matches, the pidfd refers to the process we
identified, and every later signal or pidfd_getfd() goes to it even if the pid is reused.

Reading /proc/PID/... by pid is a separate lookup that a reused pid would redirect. Such reads
are trusted only when bracketed by a pidfd: pinned before, and still not exited after (a pid
cannot be reused while its process has not exited, so everything read in between was its).
"""

from __future__ import annotations

import ctypes
import enum
import os
import select
import signal
import socket
import threading
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

from rebind.errors import EnvironmentProblem
from rebind.kernel.procfs import FdRead, ProcFS
from rebind.kernel.procstat import libc, start_ticks

SYS_pidfd_getfd = 438  # same number on every architecture but alpha (Linux 5.6)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
#: pidfds name processes of the live kernel: their /proc is the real one, whatever
#: REBIND_PROC_ROOT says.
PROC = "/proc"

_c = libc


class ProcessChanged(EnvironmentProblem):
    """The pid now names another process (or none): we refuse to touch it."""


class Holding(enum.Enum):
    """Does a pinned process still hold one of the given sockets?"""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"  # its fd table could not be read (permission denied)


def pin(pid: int) -> int | None:
    """A pidfd for whichever process has ``pid`` now, or None if none has."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def exited(pfd: int) -> bool:
    """Has the pinned process exited? A pidfd polls readable once it has (pidfd_poll, Linux 5.3)."""
    p = select.poll()  # not select(): pidfds may be numbered above FD_SETSIZE
    p.register(pfd, select.POLLIN)
    return bool(p.poll(0))


def open_verified(pid: int, start: int | None) -> int:
    """A pidfd for ``pid`` if it is still the process that started at ``start`` (clock ticks)."""
    fd = pin(pid)
    if fd is None:
        raise ProcessChanged(f"process {pid} has exited")
    # Check *after* opening: from here on the pidfd pins this exact process.
    now = start_ticks(pid, PROC)
    if start is not None and now != start:
        os.close(fd)
        raise ProcessChanged(f"pid {pid} was reused by another process; not touching it")
    return fd


@contextmanager
def pidfd(pid: int, start: int | None) -> Iterator[int]:
    fd = open_verified(pid, start)
    try:
        yield fd
    finally:
        os.close(fd)


def send_signal(pfd: int, sig: int) -> bool:
    """Signal through the pidfd; False if the process already exited."""
    try:
        signal.pidfd_send_signal(pfd, sig)
    except ProcessLookupError:
        return False
    return True


def holds_socket(pfd: int, pid: int, inodes: Collection[int], hint_fds: Iterable[int] = ()) -> Holding:
    """Does the process pinned by ``pfd`` (``pid`` here) still hold one of these socket inodes?

    ``hint_fds`` (where it held them when last seen) are read first; the whole table is read if
    they moved, then the tables of threads that unshared theirs (CLONE_FILES). A process that
    exited meanwhile holds nothing.
    """
    want = frozenset(inodes)
    proc = ProcFS(PROC)

    def read(task: int | None, first: Iterable[int] = ()) -> tuple[bool, bool]:
        """(found, inaccessible) for one fd table."""
        got = proc.socket_fds(pid, task=task, first=first, until=want)
        return not want.isdisjoint(got.fds.values()), got.read is FdRead.INACCESSIBLE

    found, denied = read(None, hint_fds)
    if not (found or denied):
        for tid in _other_tasks(pid):
            found, denied = read(tid)
            if found or denied:
                break
    # What was read is the pinned process's only if it was alive throughout: it was when
    # pinned, and it still is now.
    if exited(pfd):
        return Holding.NO
    if found:
        return Holding.YES
    return Holding.UNKNOWN if denied else Holding.NO


def _other_tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"{PROC}/{pid}/task") if t != str(pid)]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# Our own transient duplicates
#
# pidfd_getfd() installs a duplicate of another process's socket in *our* fd table for as long
# as it takes to read its flags. A concurrent owner scan (another thread) would see rebind
# itself holding that socket. Every duplicate is registered while it exists, and a scan learns
# every fd number that was a duplicate at any moment while it ran.

_dup_lock = threading.Lock()
_dups: set[int] = set()
_history: list[int] = []  # fds duplicated since the oldest running watch began
_watchers = 0


class DupWatch:
    """Filled when the watch ends: our fd numbers that were duplicates at some point during it."""

    __slots__ = ("_initial", "_start", "fds")

    def __init__(self, start: int, initial: frozenset[int]) -> None:
        self._start = start
        self._initial = initial
        self.fds: frozenset[int] = initial


@contextmanager
def own_duplicates() -> Iterator[DupWatch]:
    """Watch our transient pidfd_getfd duplicates while an owner scan runs (see DupWatch)."""
    global _watchers
    with _dup_lock:
        _watchers += 1
        watch = DupWatch(len(_history), frozenset(_dups))
    try:
        yield watch
    finally:
        with _dup_lock:
            watch.fds = watch._initial | _dups | frozenset(_history[watch._start :])
            _watchers -= 1
            if not _watchers:
                _history.clear()


def getfd(pfd: int, targetfd: int) -> int:
    """Duplicate another process's fd into ours (pidfd_getfd, Linux 5.6; ptrace access needed).

    The duplicate is registered until :func:`close_dup` (owner scans leave it out).
    """
    with _dup_lock:
        fd = _c().syscall(SYS_pidfd_getfd, pfd, targetfd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        _dups.add(fd)
        if _watchers:
            _history.append(fd)
    return int(fd)


def close_dup(fd: int) -> None:
    with _dup_lock:
        _dups.discard(fd)
        # Closing our duplicate drops one file reference; the owner's socket is unaffected.
        os.close(fd)


def socket_flags(pid: int, fd: int, start: int | None = None) -> tuple[bool, bool, bool | None] | None:
    """(SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY or None) of a live process's socket, or None if
    not permitted.

    inet_diag does not report the first two at all (bind-rules.md 4.1); a duplicate of the fd
    reads the very same socket.
    """
    try:
        with pidfd(pid, start) as pfd:
            dup = getfd(pfd, fd)
    except (OSError, EnvironmentProblem):
        return None
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        close_dup(dup)
        return None
    try:
        return _read_flags(s)
    except OSError:
        return None
    finally:
        s.detach()
        close_dup(dup)


def _read_flags(s: socket.socket) -> tuple[bool, bool, bool | None]:
    ra = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
    rp = bool(s.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT))
    v6: bool | None = None
    if s.family == socket.AF_INET6:
        v6 = bool(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return ra, rp, v6
