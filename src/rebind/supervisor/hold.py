"""The sockets `rebind run` holds for its whole life: bound here (or adopted from systemd, see
inherit.py), then moved above the fds every generation gets, so placing them never clobbers one."""

from __future__ import annotations

import fcntl
import socket
from collections.abc import Sequence

from rebind.errors import ExitCode, Fault, RebindError
from rebind.supervisor.listen import bind_datagram, bind_listener
from rebind.supervisor.spec import ListenSpec


class BindFailed(RebindError):
    fault = Fault.USER

    @property
    def exit_code(self) -> int:
        return int(ExitCode.NO_MATCH)  # "port busy", as `rebind why` reports it


def bind_all(
    specs: Sequence[ListenSpec],
    reuseport: bool,
    backlog: int | None,
    adopted: dict[int, socket.socket] | None = None,
) -> list[socket.socket]:
    """Bind every spec not ADOPTED (passed by systemd); on failure close all and explain in one line."""
    adopted = dict(adopted or {})
    bound: list[socket.socket] = []
    try:
        for i, spec in enumerate(specs):
            sock = adopted.pop(i, None)
            bound.append(sock if sock is not None else _bind_one(spec, reuseport, backlog))
    except BaseException:
        for s in (*bound, *adopted.values()):
            s.close()
        raise
    return _park_high(bound)


def _bind_one(spec: ListenSpec, reuseport: bool, backlog: int | None) -> socket.socket:
    # A host that does not resolve never gets here as an OSError: listen.resolve() turns
    # getaddrinfo's gaierror into a UsageError (exit 2, tests/unit/test_supervisor_hold.py).
    try:
        if spec.proto == "udp":
            return bind_datagram(spec.host, spec.port, reuseport=reuseport)
        return bind_listener(spec.host, spec.port, reuseport=reuseport, backlog=backlog)
    except OSError as exc:
        notes: list[str] = getattr(exc, "__notes__", [])
        detail = "; ".join(p.strip().lstrip("- ") for note in notes for p in note.splitlines() if p.strip())
        msg = f"cannot listen on {spec}: {exc.strerror or exc}"
        raise BindFailed(msg + (f" — {detail}" if detail else "")) from None


def _park_high(socks: list[socket.socket]) -> list[socket.socket]:
    """Move our copies above 3+n so placing them at 3, 4, ... in a child never clobbers one."""
    floor = 3 + len(socks)
    out = []
    for s in socks:
        fd = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, floor)
        out.append(socket.socket(s.family, s.type, s.proto, fileno=fd))
        s.close()
    return out
