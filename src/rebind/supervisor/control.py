"""`rebind reload`'s channel to a running `rebind run`: a Unix stream socket at --control PATH.

A signal (SIGHUP) cannot answer; deploy scripts need to know whether the new generation came up
or the old one was kept. The socket is created 0600 and peers are checked with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rebind.errors import EnvironmentProblem, UsageError
from rebind.supervisor import machine as m
from rebind.supervisor.client import peer_of
from rebind.supervisor.fdreserve import SHORTAGE, SPAWN_NEEDS, FdReserve
from rebind.textsafe import visible

MAX_LINE = 256
CONTROL_IDLE = 5.0  # a control client that has not sent its line by then is dropped
CONTROL_MAX = 32  # control clients still sending their line at once
ACCEPT_BACKOFF = 1.0  # after EMFILE/ENFILE in accept(): stop accepting this long


@dataclass(slots=True)
class Request:
    conn: socket.socket
    buf: bytes = b""
    command: str | None = None
    uid: int = -1
    since: float = 0.0  # monotonic time of accept(): idle clients are dropped after a while

    def reply(self, line: str) -> None:
        try:
            self.conn.setblocking(True)
            self.conn.settimeout(1.0)
            self.conn.sendall((line.rstrip("\n") + "\n").encode())
        except OSError:
            pass  # the client gave up waiting; the outcome is in the log anyway
        finally:
            self.conn.close()


@dataclass(slots=True)
class ControlServer:
    path: str
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        _clear_stale(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: only our user may reload us
        try:
            s.bind(self.path)
        except OSError as exc:
            s.close()
            raise EnvironmentProblem(f"cannot create control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        s.listen(16)
        s.setblocking(False)
        self.sock = s

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Request | None:
        """The next client, None if there is none; OSError (EMFILE...) is the caller's to handle."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        conn.setblocking(False)
        return Request(conn, uid=peer_of(conn).uid)  # the kernel's SO_PEERCRED (supervisor/client.py)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_request(req: Request) -> bool:
    """Read what is there; True once the request is complete (or the peer is gone/bad)."""
    try:
        chunk = req.conn.recv(MAX_LINE)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        chunk = b""
    req.buf += chunk
    if b"\n" in req.buf or not chunk or len(req.buf) >= MAX_LINE:
        req.command = req.buf.partition(b"\n")[0].decode("ascii", "replace").strip()
        return True
    return False


class ControlDesk:
    """The supervisor's end of --control: accepts peer-checked clients on the event loop's
    selector, turns `reload` into a machine event and answers it once the machine says how it went."""

    def __init__(
        self,
        path: str,
        sel: selectors.BaseSelector,
        reserve: FdReserve,
        log: Callable[[str], None],
        status: Callable[[], str],
    ) -> None:
        self.server = ControlServer(path)
        self.sel = sel
        self.reserve = reserve
        self.log = log
        self.status = status
        self.requests: list[Request] = []  # clients still sending their line
        self.waiters: dict[int, Request] = {}  # reload requests awaiting the outcome
        self.next_waiter = 0
        self.resume: float | None = None  # accepting paused (fd shortage) until then
        self.emfile_logged = False
        sel.register(self.server, selectors.EVENT_READ, self.on_accept)

    def on_accept(self) -> None:
        try:
            # One reserved fd may answer a client; the rest stays for starting a generation.
            req = self.reserve.retry(self.server.accept, self.log, "accept a control client", 1, SPAWN_NEEDS)
        except OSError as exc:
            if exc.errno not in (*SHORTAGE, errno.ENOBUFS, errno.ENOMEM):
                raise
            # Out of descriptors: the pending connection stays in the backlog and select() would
            # report it again at once. Stop watching the socket for a while instead of spinning.
            if not self.emfile_logged:
                self.log(
                    f"control socket: accept() failed ({exc.strerror}); pausing it for {ACCEPT_BACKOFF:g}s"
                )
                self.emfile_logged = True
            self.sel.unregister(self.server)
            self.resume = time.monotonic() + ACCEPT_BACKOFF
            return
        if req is None:
            return
        self.emfile_logged = False  # accept() works again: log the next shortage once more
        if req.uid not in (0, os.getuid()):
            req.reply("failed: permission denied")
            return
        if len(self.requests) >= CONTROL_MAX:
            req.reply("failed: busy")
            return
        req.since = time.monotonic()
        self.requests.append(req)
        self.sel.register(req.conn, selectors.EVENT_READ, lambda: self._on_request(req))

    def _on_request(self, req: Request) -> Iterator[m.Event]:
        if not read_request(req):
            return
        self.sel.unregister(req.conn)
        self.requests.remove(req)
        if req.command == "reload":
            self.log("reload requested on the control socket")
            self.next_waiter += 1
            self.waiters[self.next_waiter] = req
            yield m.Reload(self.next_waiter, time.monotonic())
        elif req.command == "status":
            req.reply(f"ok: {self.status()}")
        else:
            req.reply(f"failed: unknown command {visible(req.command or '')!r} (reload, status)")

    def reply(self, waiters: tuple[int, ...], line: str) -> None:
        for w in waiters:
            req = self.waiters.pop(w, None)
            if req is not None:
                req.reply(line)

    def wake_at(self) -> list[float]:
        times = [self.resume] if self.resume is not None else []
        if self.requests:
            times.append(min(r.since for r in self.requests) + CONTROL_IDLE)
        return times

    def resume_if_due(self, now: float) -> None:
        if self.resume is not None and now >= self.resume:
            self.resume = None
            self.sel.register(self.server, selectors.EVENT_READ, self.on_accept)

    def drop_idle(self, now: float) -> None:
        for req in [r for r in self.requests if now - r.since >= CONTROL_IDLE]:
            # idle: it must not hold a slot (or the loop) forever
            self.sel.unregister(req.conn)
            self.requests.remove(req)
            req.conn.close()

    def close_clients(self) -> None:
        for req in self.requests:
            req.conn.close()
        for req in self.waiters.values():
            req.reply("failed: supervisor exiting")

    def close(self) -> None:
        self.server.close()


def _clear_stale(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"--control {path}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a supervisor that died: nobody listens
            return
        except OSError:
            return
    raise UsageError(f"--control {path}: another `rebind run` is already using it")


def send(path: str, command: str, timeout: float) -> str:
    """Send COMMAND and wait for the one-line answer (the peer-checked client, client.ask)."""
    from rebind.supervisor.client import ask

    return ask(path, command, timeout)
