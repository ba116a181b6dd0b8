"""pidfds: signal and inspect exactly the process we identified, never a recycled pid.

A pid is only an identity together with its start time (/proc/PID/stat field 22). We open a
pidfd, then re-check the start time: if it still matches, the pidfd refers to the process we
identified, and every later signal or pidfd_getfd() goes to it even if the pid is reused.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from rebind.errors import EnvironmentProblem
from rebind.kernel.owners import read_start_ticks
from rebind.kernel.procstat import libc

SYS_pidfd_getfd = 438  # same number on every architecture but alpha (Linux 5.6)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)

_c = libc


class ProcessChanged(EnvironmentProblem):
    """The pid now names another process (or none): we refuse to touch it."""


def open_verified(pid: int, start_ticks: int | None) -> int:
    """A pidfd for ``pid`` if it is still the process that started at ``start_ticks``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessChanged(f"process {pid} has exited") from None
    # Check *after* opening: from here on the pidfd pins this exact process.
    now = read_start_ticks(pid)
    if start_ticks is not None and now != start_ticks:
        os.close(fd)
        raise ProcessChanged(f"pid {pid} was reused by another process; not touching it")
    return fd


@contextmanager
def pidfd(pid: int, start_ticks: int | None) -> Iterator[int]:
    fd = open_verified(pid, start_ticks)
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


def is_alive(pfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    import select

    r, _, _ = select.select([pfd], [], [], 0)
    return not r


def getfd(pfd: int, targetfd: int) -> int:
    """Duplicate another process's fd into ours (pidfd_getfd, Linux 5.6; ptrace access needed)."""
    fd = _c().syscall(SYS_pidfd_getfd, pfd, targetfd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def socket_flags(pid: int, fd: int, start_ticks: int | None = None) -> tuple[bool, bool, bool | None] | None:
    """(SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY or None) of a live process's socket, or None if
    not permitted.

    inet_diag does not report the first two at all (bind-rules.md 4.1); a duplicate of the fd
    reads the very same socket.
    """
    try:
        with pidfd(pid, start_ticks) as pfd:
            dup = getfd(pfd, fd)
    except (OSError, EnvironmentProblem):
        return None
    with socket.socket(fileno=dup) as s:
        try:
            ra = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
            rp = bool(s.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT))
            v6: bool | None = None
            if s.family == socket.AF_INET6:
                v6 = bool(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        except OSError:
            return None
        finally:
            # Closing our duplicate drops one file reference; the owner's socket is unaffected.
            s.detach()
            os.close(dup)
    return ra, rp, v6
