"""`rebind reload`'s channel to a running `rebind run`: a Unix stream socket at --control PATH.

A signal (SIGHUP) cannot answer; deploy scripts need to know whether the new generation came up
or the old one was kept. The socket is created 0600 and peers are checked with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass, field

from rebind.errors import EnvironmentProblem, UsageError
from rebind.supervisor.client import peer_of

MAX_LINE = 256


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
