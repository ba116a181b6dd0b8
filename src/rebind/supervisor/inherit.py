"""`rebind run` started with sockets: socket activation, or systemd's fd store after a restart.

When systemd starts us with ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` (sd_listen_fds(3)),
the sockets already exist and may hold queued connections: serving them instead of binding is
what makes ``systemctl restart`` of rebind itself refuse nothing (the fd store keeps them open
while no rebind runs). Each ``--listen`` takes the passed socket of the same name, else one with
the same address; either way the socket is checked (getsockname, SO_TYPE, SO_ACCEPTCONN), never
trusted by its name alone. What matches no ``--listen`` is closed, with a log line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rebind.supervisor.listen import resolve
from rebind.supervisor.spec import ListenSpec

SD_LISTEN_FDS_START = 3
MAX_PASSED = 4096  # an absurd LISTEN_FDS is bounded (fds above this are not looked at)


@dataclass(frozen=True, slots=True)
class Passed:
    fd: int
    name: str


def passed_fds(environ: Mapping[str, str], pid: int) -> list[Passed]:
    """The fds passed to PID by LISTEN_*; [] when the variables are absent, malformed or not ours."""
    try:
        if int(environ.get("LISTEN_PID", "")) != pid:
            return []
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    count = max(0, min(count, MAX_PASSED))
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    out = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.fstat(fd)
        except OSError:
            continue  # announced but not open: nothing to adopt
        out.append(Passed(fd, names[i] if i < len(names) else ""))
    return out


def _as_socket(fd: int) -> socket.socket | None:
    """A socket object on a dup of FD, or None when FD is not a socket (socket(fileno=) would
    raise ENOTSOCK and stop `rebind run` with a message that names no fd)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
    except OSError:
        return None
    copy = os.dup(fd)
    try:
        return socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return None


def _kind(spec: ListenSpec) -> int:
    return socket.SOCK_DGRAM if spec.proto == "udp" else socket.SOCK_STREAM


def matches(spec: ListenSpec, sock: socket.socket) -> bool:
    """Is SOCK (an inet socket of the right type, bound to SPEC's address) usable for SPEC?"""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != _kind(spec):
            return False
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        host, port = sock.getsockname()[:2]
    except OSError:
        return False
    if port != spec.port:
        return False
    if spec.host in ("", "*"):
        return ipaddress.ip_address(host.split("%")[0]).is_unspecified
    try:
        _family, (want, _) = resolve(spec.host, spec.port)
    except OSError:
        return False
    return ipaddress.ip_address(host.split("%")[0]) == ipaddress.ip_address(want.split("%")[0])


def adopt(
    specs: Sequence[ListenSpec],
    passed: Sequence[Passed],
    backlog: int | None,
    log: Callable[[str], None],
) -> dict[int, socket.socket]:
    """spec index -> the passed socket it takes over; unused passed fds are closed."""
    socks: dict[int, socket.socket] = {}
    for p in passed:
        sock = _as_socket(p.fd)
        if sock is None:
            # A regular file, pipe or tty in the LISTEN_FDS range (a stray fd of the shell, or a
            # LISTEN_FDS that counts too many): not ours to serve; skipped like any mismatch.
            log(f"passed fd {p.fd} ({p.name or 'unnamed'}) is not a socket: skipped (closed)")
            continue
        socks[p.fd] = sock
    names = {p.fd: p.name for p in passed}
    taken: dict[int, socket.socket] = {}
    free = dict(socks)
    for i, spec in enumerate(specs):
        by_name = [fd for fd in free if names[fd] == spec.name]
        by_addr = [fd for fd in free if fd not in by_name]
        fd = next((fd for fd in (*by_name, *by_addr) if matches(spec, free[fd])), None)
        if fd is None:
            for other in by_name:
                log(f"passed fd {other} is named {spec.name!r} but is not {spec}: not used")
            continue
        sock = free.pop(fd)
        if spec.proto == "tcp" and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            # Bound but not listening (ListenStream always listens; a hand-made one may not).
            sock.listen(socket.SOMAXCONN if backlog is None else backlog)
        log(f"{spec}: using the socket passed as fd {fd} ({names[fd] or 'unnamed'}) instead of binding")
        taken[i] = sock
    for fd, sock in free.items():
        log(f"passed fd {fd} ({names[fd] or 'unnamed'}) matches no --listen: closed")
        sock.close()
    for p in passed:
        with contextlib.suppress(OSError):
            os.close(p.fd)  # our copies are the dups; the low numbers are needed for the children
    return taken
