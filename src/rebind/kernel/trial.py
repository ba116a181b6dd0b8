"""Trial bind: ground truth for "would bind() work right now?".

A probe socket gets the requested options, is bound, and is closed at once. It never listens:
a listening probe could take connections (or join a SO_REUSEPORT group and steal them). The
second conflict check that listen() runs (inet_csk_listen_start -> get_port) is therefore
predicted by the model, not tried.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import Proto

IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


@dataclass(frozen=True, slots=True)
class TrialResult:
    ok: bool
    errno: int | None = None

    @property
    def error_name(self) -> str | None:
        return errno.errorcode.get(self.errno, str(self.errno)) if self.errno else None

    def __str__(self) -> str:
        if self.ok:
            return "bind() succeeded"
        return f"bind() failed: [Errno {self.errno}] {os.strerror(self.errno or 0)}"


def trial_bind(
    proto: Proto,
    addr: IPv4Address | IPv6Address,
    port: int,
    *,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
    device: str | None = None,
    freebind: bool = False,
) -> TrialResult:
    """Bind a throwaway socket with these options and close it. Never listens, never sends."""
    family = socket.AF_INET6 if isinstance(addr, IPv6Address) else socket.AF_INET
    kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
    with socket.socket(family, kind | socket.SOCK_CLOEXEC) as s:
        if reuseaddr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, int(v6only))
        if device:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if freebind:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        try:
            s.bind((str(addr), port))
        except OSError as exc:
            return TrialResult(False, exc.errno)
        # An abortive close (SO_LINGER 0) is not needed: a bound, never-connected socket leaves
        # no TIME_WAIT behind; close() releases the port immediately.
    return TrialResult(True)
