"""Serving the metrics: a bounded HTTP server (prometheus-client renders the exposition), or an
atomically written textfile."""

from __future__ import annotations

import errno
import gzip
import os
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from rebind.errors import EnvironmentProblem, UsageError
from rebind.model.addr import parse_ip, split_host_port
from rebind.model.validate import parse_port

DEFAULT_PORT = 9811


def parse_listen(text: str, *, what: str = "--listen") -> tuple[str, int]:
    """ADDR:PORT, [V6ADDR]:PORT, :PORT (every IPv4 address) or PORT; the address must be literal
    (a name could resolve differently at each start)."""
    host, port_text = split_host_port(text, what=what, alone="port")
    addr = parse_ip("127.0.0.1" if host is None else host or "0.0.0.0", what=f"{what} {text.strip()!r}:")
    return str(addr), parse_port(port_text or "", what=f"{what} port")


def registry_with(collector: Collector, *, process: bool = True) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    if process:
        # process_cpu_seconds_total / process_resident_memory_bytes of the exporter itself.
        ProcessCollector(registry=reg)
    return reg


def start_http(registry: CollectorRegistry, addr: str, port: int) -> MetricsServer:
    """Start serving /metrics in a daemon thread; returns the server (call .server_close())."""
    try:
        server = MetricsServer(registry, addr, port)
    except OSError as exc:
        shown = f"[{addr}]" if isinstance(ip_address(addr), IPv6Address) else addr
        hint = f" (see: rebind why {port})" if exc.errno == errno.EADDRINUSE else ""
        raise EnvironmentProblem(f"cannot listen on {shown}:{port}: {exc.strerror}{hint}") from exc
    return server


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint: one thread, one selector, a fixed budget of fds and time.
#
# prometheus-client's start_http_server runs a thread per connection with no timeout and no cap:
# ~1,100 idle connections from any local user took every fd of `rebind run` (its supervisor could
# no longer spawn a generation) and made `rebind exporter` spin on EMFILE (issue 18 items 2-3).
# Here a connection costs one fd out of MAX_CONNECTIONS and at most DEADLINE_S of wall time
# (reading the request and writing the answer together); past the cap the oldest connection is
# closed, so a flood of idle connections cannot keep a real scrape out for longer than it takes
# to arrive. The server never holds more than MAX_CONNECTIONS + 5 fds (listener, epoll, wake
# pipe, reserve), so the process it runs in keeps the rest of its fd table.

#: Connections served at once; a new one past this closes the oldest.
MAX_CONNECTIONS = 16
#: Wall seconds a connection may take from accept() to the last byte of the answer.
DEADLINE_S = 5.0
#: Request line and headers; a scrape sends well under 1 KiB.
MAX_REQUEST = 8192
#: After EMFILE/ENFILE on accept(): how long the listener is left alone (no busy loop).
EMFILE_BACKOFF_S = 0.25
_ACCEPT_BURST = 64
_REUSE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNABORTED, errno.EPROTO)
_NO_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None
    #: Sent part of a request but not all of it: the first to go when the cap is reached.
    partial: bool = False


class MetricsServer:
    """Serves ``GET /metrics`` (and ``/``) from ``registry`` in one daemon thread.

    Bounded in fds (:data:`MAX_CONNECTIONS`), in time per connection (:data:`DEADLINE_S`) and in
    memory per request (:data:`MAX_REQUEST`); EMFILE on accept() is answered by closing a reserve
    fd, accepting and dropping one connection, and leaving the listener alone for a moment.
    HTTP/1.0-style: one request per connection, ``Connection: close``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        addr: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self.registry = registry
        self.max_connections = max(1, max_connections)
        self.deadline_s = deadline_s
        family = socket.AF_INET6 if isinstance(ip_address(addr), IPv6Address) else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((addr, port))
            lsock.listen(64)
            lsock.setblocking(False)
        except OSError:
            lsock.close()
            raise
        self._listener = lsock
        self.server_address: tuple[str, int] = lsock.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._reserve: int | None = _open_reserve()
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._listening = True
        self._resume_at = 0.0
        self._sel.register(lsock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="rebind-metrics", daemon=True)
        self._thread.start()

    # -- life cycle ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        if not self._stop.is_set():
            self._stop.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)

    def server_close(self) -> None:
        self.shutdown()
        for c in list(self._conns.values()):
            self._drop(c)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        self._sel.close()
        self._listener.close()

    def close(self) -> None:
        self.server_close()

    @property
    def connections(self) -> int:
        """Connections open now (tests, benchmarks)."""
        return len(self._conns)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = self._expire(now)
            if not self._listening and now >= self._resume_at:
                self._sel.register(self._listener, selectors.EVENT_READ, None)
                self._listening = True
            if not self._listening:
                timeout = min(timeout, max(0.0, self._resume_at - now))
            for key, events in self._sel.select(timeout):
                if self._stop.is_set():
                    return
                if key.fileobj is self._listener:
                    self._accept()
                elif key.data is None:
                    try:
                        os.read(self._wake_r, 64)
                    except OSError:
                        pass
                else:
                    conn: _Conn = key.data
                    try:
                        if events & selectors.EVENT_READ:
                            self._read(conn)
                        elif events & selectors.EVENT_WRITE:
                            self._write(conn)
                    except (OSError, ValueError, KeyError):
                        # One connection's surprise (a socket closed under us) never ends the
                        # loop: the endpoint outlives any client.
                        self._drop(conn)

    def _expire(self, now: float) -> float:
        """Close connections past their deadline; seconds until the next deadline (max 1 s)."""
        nxt = 1.0
        for c in list(self._conns.values()):
            if c.deadline <= now:
                self._drop(c)
            else:
                nxt = min(nxt, c.deadline - now)
        return nxt

    def _accept(self) -> None:
        # Only as many as there is room for, or one when full (closing the oldest): between two
        # rounds the loop reads what arrived, so a real scrape is served after at most
        # max_connections rounds of a flood, never evicted by one burst of it.
        for _ in range(max(1, min(_ACCEPT_BURST, self.max_connections - len(self._conns)))):
            try:
                sock, _peer = self._listener.accept()
            except OSError as exc:
                if exc.errno in _NO_FDS:
                    self._out_of_fds()
                elif exc.errno not in _REUSE:
                    self._pause()
                return
            if len(self._conns) >= self.max_connections:
                self._drop(self._victim())
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.deadline_s)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._read(conn)  # a scrape's request is usually there already: answer it now

    def _victim(self) -> _Conn:
        """The connection to close for a new one: the oldest that sent part of a request and
        stalled (a flood's), else the oldest. A real scrape sends its request at once and is
        answered when it is first read, so it is never the one that waits."""
        stalled = [c for c in self._conns.values() if c.partial and c.out is None]
        return min(stalled or self._conns.values(), key=lambda c: c.deadline)

    def _out_of_fds(self) -> None:
        """EMFILE: the process is out of fds (not because of us: we hold at most the cap). Use
        the reserve fd to take one pending connection off the queue and close it (the client
        sees a reset, not a hang), then leave the listener alone for a moment instead of
        spinning on a readable listener that cannot be accepted."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            try:
                sock, _ = self._listener.accept()
                _reset(sock)
            except OSError:
                pass
            self._reserve = _open_reserve()
        self._pause()

    def _pause(self) -> None:
        if self._listening:
            self._sel.unregister(self._listener)
            self._listening = False
        self._resume_at = time.monotonic() + EMFILE_BACKOFF_S

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if not data:
            self._drop(c)
            return
        c.inbuf += data
        c.partial = True
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = c.inbuf.find(b"\n\n")
        if end < 0:
            if len(c.inbuf) > MAX_REQUEST:
                self._answer(c, response(431, "request header too large\n"))
            return
        head = bytes(c.inbuf[:end]).decode("latin-1")
        self._answer(c, self.respond(head))

    def respond(self, head: str) -> bytes:
        """The whole HTTP answer to one request head (request line and headers)."""
        lines = head.split("\n")
        parts = lines[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return response(400, "bad request\n")
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            return response(405, "only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
        path, _, query = target.partition("?")
        if path not in ("/metrics", "/"):
            return response(404, "not found: try /metrics\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        reg: Any = self.registry
        names = [v for k, v in parse_qsl(query) if k == "name[]"]
        if names:
            reg = self.registry.restricted_registry(names)
        try:
            body: bytes = encoder(reg)
        except Exception as exc:  # a collector's failure is the scrape's, not the server's
            return response(500, f"error collecting metrics: {type(exc).__name__}\n")
        extra: list[tuple[str, str]] = []
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        return response(200, body, content_type=content_type, extra=extra, head=method == "HEAD")

    def _answer(self, c: _Conn, data: bytes) -> None:
        c.out = memoryview(data)
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        assert c.out is not None
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        c.out = c.out[n:]
        if not c.out:
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(c)

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0 and self._conns.pop(fd, None) is not None:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        _reset(c.sock)


def _reset(sock: socket.socket) -> None:
    """Close without lingering: SO_LINGER 0 would send RST; a plain close() never blocks on a
    non-blocking socket, and its FIN_WAIT/TIME_WAIT belong to the kernel, not to our fd table."""
    try:
        sock.close()
    except OSError:
        pass


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}  # fmt: skip


def response(
    status: int,
    body: bytes | str,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: Iterable[tuple[str, str]] = (),
    head: bool = False,
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else data)


def render(registry: CollectorRegistry) -> bytes:
    out: bytes = generate_latest(registry)
    return out


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never half.

    The temporary file is created next to the target (rename() is atomic only within one file
    system) with O_EXCL|O_NOFOLLOW, so a file or symlink planted under its name in a shared
    directory is never followed or overwritten; its name does not end in .prom, so node_exporter's
    textfile collector never reads it. fsync before rename: after a crash the file is old or new.
    """
    directory, name = os.path.split(os.path.abspath(path))
    if not name.endswith(".prom"):
        raise UsageError(f"--textfile {path!r}: the name must end in .prom (node_exporter reads only *.prom)")
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentProblem(f"--textfile directory {directory!r}: {exc.strerror}") from exc
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)  # the rename itself survives a crash
    except BaseException as exc:  # Ctrl-C and SIGTERM included: never leave the temp file behind
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise EnvironmentProblem(f"cannot write --textfile {path!r}: {exc.strerror}") from exc
        raise
    finally:
        os.close(dfd)
