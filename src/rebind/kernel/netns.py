"""Private network namespaces for `rebind demo` and the kernel test-suite.

``unshare(CLONE_NEWNET)`` and ``setns()`` act on the calling *thread*, and every process it starts
afterwards inherits the namespace, so a caller can step into a throwaway namespace, start real
servers there, inspect them, and step back out. The namespace dies with its last user.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from rebind.errors import EnvironmentProblem
from rebind.kernel.procstat import libc

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_c = libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise EnvironmentProblem(f"{what}: {os.strerror(err)}")


def unshare_net() -> None:
    """Move this thread into a new, empty network namespace (needs CAP_SYS_ADMIN)."""
    _check(_c().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def setns_net(fd: int) -> None:
    _check(_c().setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")


def link_up(name: str = "lo") -> None:
    """Bring an interface up with SIOCSIFFLAGS (what `ip link set lo up` does), no tools needed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))


def namespaces_permitted() -> bool:
    """True when this process may create network namespaces (tried in a forked child)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            unshare_net()
            link_up()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@contextmanager
def private_netns() -> Iterator[int]:
    """Run the body in a fresh network namespace with ``lo`` up; yields the namespace inode.

    Processes started inside keep the namespace alive after the body ends; callers stop them.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare_net()
        try:
            link_up()
            yield os.stat("/proc/thread-self/ns/net").st_ino
        finally:
            setns_net(home)
    finally:
        os.close(home)
