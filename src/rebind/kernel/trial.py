"""Trial bind: ground truth for "would bind() work right now?".

A probe socket gets the requested options, is bound, and is closed at once. It never listens:
a listening probe could take connections (or join a SO_REUSEPORT group and steal them). The
second conflict check that listen() runs (inet_csk_listen_start -> get_port) is therefore
predicted by the model, not tried.
"""

from __future__ import annotations

import socket
from ipaddress import IPv6Address

from rebind.model.records import Proto
from rebind.model.request import BindRequest, TrialResult

__all__ = ["TrialResult", "trial_bind"]

IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78  # include/uapi/linux/in6.h (Linux 4.15); not in Python's socket module
SO_BINDTOIFINDEX = getattr(socket, "SO_BINDTOIFINDEX", 62)  # Linux 5.0: no name lookup, no race


def trial_bind(req: BindRequest) -> TrialResult:
    """Bind a throwaway socket exactly as ``req`` asks and close it. Never listens, never sends.

    Every field that changes the kernel's answer is set: ``ifindex`` is the device the socket
    ends up bound to (SO_BINDTODEVICE, or a link-local address's scope id); ``bindtodevice`` a
    SO_BINDTODEVICE set first that the scope id then overrides (the kernel's order, reproduced).
    Not ``uid``: the probe's sk_uid is this process's fsuid. Callers compare ``req.uid`` with
    os.geteuid() before trusting a SO_REUSEPORT trial (see kernel/facts.py).
    """
    proto, addr, port, ifindex = req.proto, req.addr, req.port, req.ifindex
    family = socket.AF_INET6 if isinstance(addr, IPv6Address) else socket.AF_INET
    kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
    scoped = isinstance(addr, IPv6Address) and addr.is_link_local
    with socket.socket(family, kind | socket.SOCK_CLOEXEC) as s:
        try:
            if req.reuseaddr:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if req.reuseport:
                s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and req.v6only is not None:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, int(req.v6only))
            if req.bindtodevice:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX, req.bindtodevice)
            elif ifindex and not scoped:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX, ifindex)
            if req.freebind:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                else:
                    s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            # A link-local address carries its device as the scope id (__inet6_bind sets
            # sk_bound_dev_if from sin6_scope_id); a numeric tuple skips getaddrinfo entirely.
            target: tuple[str, int] | tuple[str, int, int, int] = (
                (str(addr), port, 0, ifindex) if family == socket.AF_INET6 else (str(addr), port)
            )
            s.bind(target)
        except OSError as exc:
            return TrialResult(False, exc.errno)
        # An abortive close (SO_LINGER 0) is not needed: a bound, never-connected socket leaves
        # no TIME_WAIT behind; close() releases the port immediately.
    return TrialResult(True)
