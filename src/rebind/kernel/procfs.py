"""The one /proc layer: where processes are read, and which sockets a process holds.

A :class:`ProcFS` names the procfs root (psutil's ``PROCFS_PATH``, as an object handed to whoever
reads processes instead of a global): ``/proc`` on the host, another mount for tests and
containers (``REBIND_PROC_ROOT``, :meth:`ProcFS.default`). Only the live ``/proc`` is the kernel
the BPF programs and pidfds see (:attr:`ProcFS.live`).

:meth:`ProcFS.socket_fds` is the one walk of a ``/proc/PID/fd`` directory for sockets, with the
one reading of its errors (:func:`outcome`): every module that asks "which sockets does this
process hold" (the owner scan, `free`'s collateral, the supervisor's readiness proof, top's
supervisor finder, the watchdog) asks it here.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field

from rebind.kernel.procstat import ProcStat, default_root, read_stat, start_ticks

LIVE = "/proc"


class FdRead(enum.Enum):
    """How reading a process's fd table went."""

    OK = "ok"
    VANISHED = "vanished"  # the process (or the task) is gone: it holds nothing now
    INACCESSIBLE = "inaccessible"  # it may hold anything: we were not allowed to look


def outcome(exc: OSError) -> FdRead:
    """The one errno ladder of the /proc fd walk.

    * ENOENT: /proc/PID is gone (the process exited and was reaped), or, for one link, the fd
      was closed between the listing and the readlink; ESRCH: the task exited while its
      directory was open (proc_fd_link() finds no task). Either way it holds nothing more.
    * EACCES/EPERM: proc_fd_access_allowed() -> ptrace_may_access() said no (not root, another
      user namespace, an LSM, CAP_SYS_PTRACE dropped). Listing the directory can be allowed where
      each link is not. The process exists and may hold the socket: inaccessible, never "none".
    * Anything else (EMFILE, ENFILE, ENOMEM): we could not look either; the process did not
      vanish, so it is inaccessible too rather than counted as gone.
    """
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        return FdRead.VANISHED
    return FdRead.INACCESSIBLE


@dataclass(frozen=True, slots=True)
class SocketFds:
    """A process's socket fds (fd -> socket inode), and how the reading went. A table that could
    not be read completely keeps what was read before the refusal."""

    fds: dict[int, int] = field(default_factory=dict)
    read: FdRead = FdRead.OK

    def inodes(self) -> set[int]:
        return set(self.fds.values())


def socket_inode(link: str) -> int | None:
    """The inode of a ``socket:[N]`` fd link, None for any other file."""
    if link.startswith("socket:[") and link.endswith("]") and link[8:-1].isdigit():
        return int(link[8:-1])
    return None


@dataclass(frozen=True, slots=True)
class ProcFS:
    """A procfs root, and the reads rebind makes of it."""

    root: str = LIVE

    @classmethod
    def default(cls) -> ProcFS:
        """The host's /proc unless REBIND_PROC_ROOT names another (tests, containers)."""
        return cls(default_root())

    @property
    def live(self) -> bool:
        """The kernel's own /proc, where pids are the ones pidfds and BPF programs see."""
        return self.root == LIVE

    def path(self, pid: int | str, *parts: str) -> str:
        return "/".join((self.root, str(pid), *parts))

    def pids(self) -> Iterator[int]:
        """Every process listed now (raises OSError if the root cannot be listed)."""
        for name in os.listdir(self.root):
            if name.isdigit():
                yield int(name)

    def stat(self, pid: int) -> ProcStat | None:
        return read_stat(pid, self.root)

    def start_ticks(self, pid: int) -> int | None:
        return start_ticks(pid, self.root)

    def fd_links(
        self,
        pid: int,
        *,
        task: int | None = None,
        first: Iterable[int] = (),
        stop: Callable[[str], bool] | None = None,
        limit: int | None = None,
    ) -> tuple[dict[int, str], FdRead]:
        """fd -> link target of every fd of PID (of thread TASK's table if given), and how the
        reading went. ``first``: fds to read before the rest (where they were last seen);
        ``stop``: the reading ends at the first link it accepts (a question of "any", not "all");
        ``limit``: at most this many fds of the listing are read (a hostile process's million)."""
        where = self.path(pid, "task", str(task), "fd") if task is not None else self.path(pid, "fd")
        try:
            dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return {}, outcome(exc)
        out: dict[int, str] = {}
        readlink = os.readlink
        try:
            try:
                names = [*(str(f) for f in first), *os.listdir(dfd)[:limit]]
            except OSError as exc:
                return {}, outcome(exc)
            for name in names:
                try:
                    link = readlink(name, dir_fd=dfd)  # relative to the open directory: no path walk
                except OSError as exc:
                    if outcome(exc) is FdRead.VANISHED:
                        continue  # closed between listdir and readlink
                    return out, FdRead.INACCESSIBLE
                if name.isdigit():
                    out[int(name)] = link
                if stop is not None and stop(link):
                    break
        finally:
            os.close(dfd)
        return out, FdRead.OK

    def socket_fds(
        self, pid: int, *, task: int | None = None, first: Iterable[int] = (), until: Container[int] = ()
    ) -> SocketFds:
        """The sockets PID holds (fd -> inode), and how reading its fd table went; ``until``:
        stop at the first socket among these inodes (enough to say it holds one)."""

        def stop(link: str) -> bool:
            return socket_inode(link) in until

        links, read = self.fd_links(pid, task=task, first=first, stop=stop if until else None)
        fds = {fd: ino for fd, link in links.items() if (ino := socket_inode(link)) is not None}
        return SocketFds(fds, read)

    def unix_sockets(self, pid: int) -> list[tuple[int, int, int, str]]:
        """(inode, flags, type, path) of /proc/PID/net/unix, the kernel's unix socket table in
        PID's network namespace (path "" when unnamed, ``@name`` when abstract); [] if unreadable."""
        try:
            with open(self.path(pid, "net", "unix"), encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return []
        out = []
        for line in lines:
            parts = line.split(maxsplit=7)
            if len(parts) < 7:
                continue
            try:
                flags, kind, inode = int(parts[3], 16), int(parts[4], 16), int(parts[6])
            except ValueError:
                continue
            out.append((inode, flags, kind, parts[7] if len(parts) > 7 else ""))
        return out
