"""If `rebind run` is SIGKILLed, its generations must not keep the port (issue 8, item 10).

PR_SET_PDEATHSIG kills each leader, but not what the leader forked (pre-fork workers, a
daemonized grandchild): they re-parent and keep the listening socket, and the next `rebind run`
fails with EADDRINUSE. The watchdog is a small forked process that holds no socket (every fd but
a pipe is closed), ignores terminal signals and sits in read() on the pipe. The supervisor writes
each generation leader's pid to it and ``bye`` when it exits normally; end-of-file without ``bye``
means the supervisor died. Then the watchdog SIGKILLs every process in a generation's process
group or carrying the supervisor's token in its environment (``REBIND_SUPERVISOR``, inherited by
everything a generation starts, setsid() or not), each identified by pidfd and start time at that
moment, until the listening sockets are gone from /proc/net/tcp{,6}. Only if one is still listed
after that does it look for holders fd by fd: that pass reads every fd of every process (seconds
on a host where some process has a million fds), so it is the last resort, not the first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

from rebind.kernel.procfs import ProcFS
from rebind.supervisor.members import ProcInfo, signal_verified, snapshot

_BYE = b"bye\n"
_ROUNDS = 50  # a process may fork while we kill its group: scan again until nothing is left
_FD_SCAN_AFTER = 10  # rounds (of 20 ms) with the socket still listed before scanning every fd
TOKEN_ENV = b"REBIND_SUPERVISOR"


class Watchdog:
    def __init__(self, inodes: frozenset[int], token: bytes) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the watchdog process
                try:
                    _main(r, w, inodes, token)
                finally:
                    os._exit(0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(r)
        self.pid = pid
        self._w: int | None = w

    def watch(self, leader: int) -> None:
        self._send(f"{leader}\n".encode())

    def _send(self, data: bytes) -> None:
        if self._w is not None:
            with contextlib.suppress(OSError):
                os.write(self._w, data)

    def close(self) -> None:
        """Normal exit: tell the watchdog to stand down and reap it."""
        if self._w is None:
            return
        self._send(_BYE)
        os.close(self._w)
        self._w = None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _main(r: int, w: int, inodes: frozenset[int], token: bytes) -> None:  # pragma: no cover - child
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.close(w)
    # Hold nothing of the supervisor's: above all not the listening sockets.
    keep = {0, 1, 2, r}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # a kill of the supervisor's process group does not take us along
    data = b""
    while chunk := _read(r):
        data += chunk
    if data.endswith(_BYE):
        return
    leaders = {int(x) for x in data.split() if x.isdigit()}
    for round_ in range(_ROUNDS):
        hit = _kill_round(leaders, token)
        if not _listed(inodes):
            if not hit:
                return
        elif round_ >= _FD_SCAN_AFTER:
            _kill_holders(inodes)
        time.sleep(0.02)


def _read(fd: int) -> bytes:  # pragma: no cover - forked child
    while True:
        try:
            return os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            return b""


def _kill_round(groups: set[int], token: bytes) -> bool:  # pragma: no cover - forked child
    me = os.getpid()
    hit = False
    for p in snapshot().values():
        if p.pid == me or p.zombie:
            continue
        if p.pgrp in groups or _has_token(p.pid, token):
            hit = signal_verified((p.pid, p.start), signal.SIGKILL) or hit
    return hit


def _kill_holders(inodes: frozenset[int]) -> None:  # pragma: no cover - forked child
    me = os.getpid()
    for p in snapshot().values():
        if p.pid != me and not p.zombie and _holds(p, inodes):
            signal_verified((p.pid, p.start), signal.SIGKILL)


def _has_token(pid: int, token: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read(1 << 20)
    except OSError:
        return False
    return TOKEN_ENV + b"=" + token in env.split(b"\0")


def _listed(inodes: frozenset[int]) -> bool:
    """Does any of our sockets still exist? (/proc/net/{tcp,udp}*: column 10 is the inode.)"""
    for name in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name, "rb") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[9].isdigit() and int(fields[9]) in inodes:
                return True
    return False


def _holds(p: ProcInfo, inodes: Iterable[int]) -> bool:
    return not ProcFS().socket_fds(p.pid).inodes().isdisjoint(inodes)
