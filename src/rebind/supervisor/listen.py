"""The app side: one code path that works standalone, under systemd and under `rebind run`.

``listen()`` returns a socket handed over through the LISTEN_FDS protocol (sd_listen_fds(3)) when
there is one for this process, and binds one itself otherwise. ``notify_ready()`` is sd_notify(3).
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import stat
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rebind.errors import UsageError
from rebind.model.validate import parse_port

SD_LISTEN_FDS_START = 3  # systemd's fixed first fd
IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
_WILDCARDS = ("", "*", "any")
_EXPLAINED = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    fd: int
    name: str
    sock: socket.socket

    @property
    def port(self) -> int:
        addr = self.sock.getsockname()
        return int(addr[1]) if isinstance(addr, tuple) else 0

    @property
    def host(self) -> str:
        addr = self.sock.getsockname()
        return str(addr[0]) if isinstance(addr, tuple) else str(addr)


_lock = threading.Lock()
_inherited: tuple[InheritedSocket, ...] | None = None
_claimed: set[int] = set()


def inherited_sockets() -> tuple[InheritedSocket, ...]:
    """Sockets passed to this process with LISTEN_FDS; read once, then the variables are cleared.

    Follows sd_listen_fds(3): the fds are ours only if LISTEN_PID is our pid (otherwise the
    variables leaked from an ancestor and the fds are not for us); the variables are removed so
    children do not pick them up, and the fds are marked close-on-exec so programs we exec do not
    inherit listening sockets they never asked for.
    """
    global _inherited
    with _lock:
        if _inherited is None:
            _inherited = _read_listen_fds(os.environ)
        return _inherited


def _read_listen_fds(env: Any) -> tuple[InheritedSocket, ...]:
    pid_text = env.pop("LISTEN_PID", None)
    count_text = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if pid_text is None or count_text is None:
        return ()
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        _warn(f"ignoring malformed LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r}")
        return ()
    if pid != os.getpid() or count <= 0:
        return ()
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        _warn(f"LISTEN_FDNAMES has {len(names)} names for {count} fds; ignoring the names")
        names = []
    usable = min(count, _fd_ceiling() - SD_LISTEN_FDS_START)
    if usable < count:
        # LISTEN_FDS=2147483647 would otherwise mean two billion fstat() calls (and warnings):
        # no fd can exist past the highest open one, nor past RLIMIT_NOFILE.
        _warn(f"LISTEN_FDS={count} is more than this process can have open; looking at {max(usable, 0)}")
    found, missing = [], []
    for i in range(max(usable, 0)):
        fd = SD_LISTEN_FDS_START + i
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            missing.append(fd)
            continue
        os.set_inheritable(fd, False)
        if not stat.S_ISSOCK(mode):
            continue
        found.append(InheritedSocket(fd, names[i] if names else "unknown", socket.socket(fileno=fd)))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        _warn(f"LISTEN_FDS promises {len(missing)} fd(s) that are not open ({shown})")
    return tuple(found)


def _fd_ceiling() -> int:
    """One past the highest fd that can be open here: min(RLIMIT_NOFILE, highest open fd + 1)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        highest = max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        highest = soft
    return highest if soft == resource.RLIM_INFINITY else min(soft, highest)


def _warn(message: str) -> None:
    print(f"rebind: {message}", file=sys.stderr)


def listen(
    host: str | None = "",
    port: int = 0,
    *,
    name: str | None = None,
    reuseport: bool = False,
    backlog: int | None = None,
    dual_stack: bool | None = None,
) -> socket.socket:
    """A listening TCP socket: the one handed to this process (LISTEN_FDS), else a fresh one.

    Handed-over sockets are matched by ``name`` (LISTEN_FDNAMES), else by port. If sockets were
    handed over but none matches, this raises rather than binding a second socket the supervisor
    does not hold (that would bring "Address already in use" back on the next reload).
    """
    port = parse_port(port, what="listen() port", allow_zero=True)  # getaddrinfo wraps 70000 to 4464
    _check_listen_args(host, name, reuseport, backlog, dual_stack)
    inherited = inherited_sockets()
    if inherited:
        return _claim(inherited, host or "", port, name)
    return bind_listener(host, port, reuseport=reuseport, backlog=backlog, dual_stack=dual_stack)


#: listen(2)'s backlog is a C int; the kernel caps it at net.core.somaxconn (__sys_listen).
MAX_BACKLOG = 2**31 - 1


def _check_listen_args(
    host: object, name: object, reuseport: object, backlog: object, dual_stack: object
) -> None:
    """UsageError (one line) for arguments socket calls would reject with a raw TypeError,
    OverflowError or AttributeError, before any socket exists."""
    if host is not None and not isinstance(host, str):
        raise UsageError(f"listen() host must be a string (an address or a name), not {host!r}")
    if host is not None and "\0" in host:
        raise UsageError(f"listen() host {host!r} contains a NUL character")
    if name is not None and not isinstance(name, str):
        raise UsageError(f"listen() name must be a string (a LISTEN_FDNAMES name), not {name!r}")
    if not isinstance(reuseport, bool):
        raise UsageError(f"listen() reuseport must be True or False, not {reuseport!r}")
    if dual_stack is not None and not isinstance(dual_stack, bool):
        raise UsageError(f"listen() dual_stack must be True, False or None, not {dual_stack!r}")
    if backlog is not None and (
        isinstance(backlog, bool) or not isinstance(backlog, int) or not 0 <= backlog <= MAX_BACKLOG
    ):
        raise UsageError(
            f"listen() backlog must be an integer in 0-{MAX_BACKLOG} (the kernel caps it at "
            f"net.core.somaxconn), not {backlog!r}"
        )


def _claim(inherited: tuple[InheritedSocket, ...], host: str, port: int, name: str | None) -> socket.socket:
    with _lock:
        # listen() is TCP: a UDP socket (or a Unix one) sharing the port in LISTEN_FDS is not it.
        free = [s for s in inherited if s.fd not in _claimed and _is_tcp(s.sock)]
        if name is not None:
            pick = [s for s in free if s.name == name]
        else:
            same_port = [s for s in free if s.port == port or port == 0]
            pick = sorted(same_port, key=lambda s: s.host != host)
        if not pick:
            offered = ", ".join(f"{s.name}={s.host}:{s.port}" for s in inherited)
            want = f"name {name!r}" if name is not None else f"port {port}"
            raise UsageError(f"no inherited socket matches {want} (LISTEN_FDS passed: {offered})")
        _claimed.add(pick[0].fd)
        return pick[0].sock


def _is_tcp(sock: socket.socket) -> bool:
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    except OSError:
        return False
    return kind == socket.SOCK_STREAM and family in (socket.AF_INET, socket.AF_INET6)


def bind_listener(
    host: str | None,
    port: int,
    *,
    reuseport: bool = False,
    backlog: int | None = None,
    dual_stack: bool | None = None,
) -> socket.socket:
    """Bind and listen with explicit, platform-correct options (what the origin post needed)."""
    sock = _bound(socket.SOCK_STREAM, host, port, reuseport, dual_stack)
    try:
        # Kernel clamps to net.core.somaxconn; a long queue is what lets connections wait
        # (instead of being dropped) while no generation is accepting.
        sock.listen(socket.SOMAXCONN if backlog is None else backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_datagram(host: str | None, port: int, *, reuseport: bool = False) -> socket.socket:
    """A bound UDP socket for `rebind run --listen udp:PORT` (the same options as a listener)."""
    return _bound(socket.SOCK_DGRAM, host, port, reuseport, None)


def _bound(kind: int, host: str | None, port: int, reuseport: bool, dual_stack: bool | None) -> socket.socket:
    """A socket of ``kind`` bound to (host, port); a failed bind carries rebind's explanation."""
    port = parse_port(port, what="port", allow_zero=True)
    family, addr = resolve(host, port)
    sock = socket.socket(family, kind)
    try:
        _set_options(sock, family, addr[0], reuseport, dual_stack)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno in _EXPLAINED:
                exc.add_note(_explain(addr[0], port, reuseport))
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def resolve(host: str | None, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """(family, sockaddr) for HOST; empty/``*`` means every address, dual-stack when possible."""
    h = (host or "").strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in _WILDCARDS:
        if socket.has_ipv6 and _ipv6_usable():
            return socket.AF_INET6, ("::", port)
        return socket.AF_INET, ("0.0.0.0", port)
    try:
        infos = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host {h!r}: {exc.strerror}") from None
    except UnicodeError:  # the idna codec: a label longer than 63 characters, an empty label
        raise UsageError(f"{h!r} is not a valid host name") from None
    fam, _, _, _, sa = infos[0]
    return fam, (str(sa[0]), int(sa[1]))


def _ipv6_usable() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _set_options(
    sock: socket.socket, family: int, host: str, reuseport: bool, dual_stack: bool | None
) -> None:
    if sys.platform == "win32":
        # On Windows SO_REUSEADDR lets another process steal a bound port; the safe equivalent
        # of the POSIX meaning is SO_EXCLUSIVEADDRUSE.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined,unused-ignore]
    else:
        # POSIX SO_REUSEADDR: bind even while old connections on the port sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # Explicit: the default follows net.ipv6.bindv6only (Linux) or is 1 (Windows, BSD).
        wildcard = host == "::"
        both = wildcard if dual_stack is None else dual_stack
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, 0 if both else 1)


def _explain(host: str, port: int, reuseport: bool) -> str:
    try:
        from rebind.diagnosis import explain_bind_failure
    except ImportError:  # pragma: no cover - diagnose ships with rebind
        return f"(run `rebind why {host}:{port}` for who holds the port)"
    return explain_bind_failure(host, port, "tcp", reuseaddr=True, reuseport=reuseport)


async def start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None],
    host: str | None = "",
    port: int = 0,
    *,
    name: str | None = None,
    **listen_kw: Any,
) -> asyncio.Server:
    """``asyncio.start_server`` on ``listen()``'s socket (inherited or freshly bound)."""
    port = parse_port(port, what="start_server() port", allow_zero=True)
    sock = listen(host, port, name=name, **listen_kw)
    return await asyncio.start_server(client_connected_cb, sock=sock)


def notify(state: str) -> bool:
    """sd_notify(3): send STATE to $NOTIFY_SOCKET; False when there is no one to tell."""
    if not isinstance(state, str):
        raise UsageError(f"notify() state must be a string such as 'READY=1', not {state!r}")
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or target[0] not in "@/":
        return False
    # '@' marks a Linux abstract socket name (leading NUL), as systemd documents.
    addr = "\0" + target[1:] if target[0] == "@" else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), addr)
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell the supervisor (systemd or `rebind run`) that this process serves now."""
    if status is not None and not isinstance(status, str):
        raise UsageError(f"notify_ready() status must be a string or None, not {status!r}")
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def _reset_for_tests() -> None:
    global _inherited
    with _lock:
        _inherited = None
        _claimed.clear()
