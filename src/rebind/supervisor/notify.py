"""The supervisor's end of sd_notify: a datagram socket whose messages carry the sender's pid.

With SO_PASSCRED set on the receiver, the kernel attaches SCM_CREDENTIALS (pid, uid, gid) to
every datagram, filled in by the kernel for senders that send none (net/core/scm.c,
unix_dgram_sendmsg), so a READY=1 can be attributed to a process tree without trusting its text.

Any local user can reach the socket (an abstract name is listed in /proc/net/unix and has no
permission check) and may pass fds with SCM_RIGHTS, which recvmsg() installs in our table before
we can look at the sender. Closing such an fd must never block the event loop (issue 18, item 7):
a TCP socket with SO_LINGER {1, 3600} and a send queue nobody drains makes the close() that drops
its last reference sleep in sk_stream_wait_close() (inet_release -> tcp_close) for up to an hour.
:class:`FdDisposal` closes what we were sent: a foreign sender's inet sockets with SO_LINGER
{1, 0} first (tcp_close then resets at once instead of waiting), everything else on a
closer thread, whose backlog the supervisor bounds by pausing its reads of the socket.
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import stat
import struct
import threading
from dataclasses import dataclass

_UCRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_BUF = 4096  # systemd's NOTIFY_BUFFER_MAX (PIPE_BUF)
_ANC = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(253 * 4)  # creds + SCM_RIGHTS (FDSTORE)
_NO_LINGER = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close() resets


@dataclass(frozen=True, slots=True)
class NotifyMessage:
    pid: int  # 0 when the kernel attached no credentials
    uid: int
    fields: tuple[tuple[str, str], ...]
    fds: tuple[int, ...] = ()  # passed with SCM_RIGHTS, open in our table: give them to FdDisposal

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.fields if k == key), None)


class NotifyReceiver:
    """An abstract AF_UNIX datagram socket: nothing on disk to clean up, scoped to the netns."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        name = f"rebind/notify/{os.getpid()}/{secrets.token_hex(8)}"
        self.sock.bind("\0" + name)
        self.address = "@" + name  # sd_notify(3) spelling of an abstract address

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, limit: int = 64) -> list[NotifyMessage]:
        """Up to LIMIT queued messages; the rest stay queued (the socket stays readable)."""
        out: list[NotifyMessage] = []
        while len(out) < limit:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(_BUF, _ANC)
            except (BlockingIOError, InterruptedError):
                return out
            out.append(_parse(data, anc))
        return out

    def close(self) -> None:
        self.sock.close()


def _parse(data: bytes, anc: list[tuple[int, int, bytes]]) -> NotifyMessage:
    pid = uid = 0
    fds: list[int] = []
    for level, kind, payload in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            pid, uid, _gid = _UCRED.unpack_from(payload)
        elif kind == socket.SCM_RIGHTS:
            # Passed fds (FDSTORE=1, or anyone's) are installed in our table on receipt; they
            # are not closed here: how to close them safely depends on who sent them.
            fds += [fd for (fd,) in struct.iter_unpack("i", payload[: len(payload) - len(payload) % 4])]
    fields = []
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields.append((key, value))
    return NotifyMessage(pid, uid, tuple(fields), tuple(fds))


class FdDisposal:
    """Closes fds passed to us, never blocking the caller.

    An fd from a *foreign* sender (outside every generation's tree) that is an inet socket gets
    SO_LINGER {1, 0} and is closed here: with l_onoff set and l_linger 0, inet_release() waits 0
    and tcp_close() sends a RST instead of waiting for the send queue to drain. It is ours to
    close, and nobody else should be relying on it. Anything else (a generation's socket, which
    the app may still be using: its linger setting is not ours to change; a unix socket, whose
    queued SCM_RIGHTS fds are released when it is; a file on a FUSE mount, whose flush can wait)
    goes to one closer thread. ``pending`` counts fds handed over and not yet closed: they occupy
    our fd table, so the caller stops reading the notify socket while it is at ``limit``.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    @property
    def full(self) -> bool:
        return self.pending >= self.limit

    def dispose(self, fds: tuple[int, ...], foreign: bool) -> None:
        for fd in fds:
            if foreign and _is_inet_socket(fd) and _set_no_linger(fd):
                os.close(fd)  # a RST at once if it was the last reference; never sleeps
            else:
                self._later(fd)

    def _later(self, fd: int) -> None:
        with self._lock:
            self._pending += 1
        if self._thread is None:
            # A daemon thread: at exit (PF_EXITING) the kernel skips the linger wait anyway.
            self._thread = threading.Thread(target=self._run, name="rebind-fd-closer", daemon=True)
            self._thread.start()
        self._queue.put(fd)

    def _run(self) -> None:
        while (fd := self._queue.get()) is not None:
            try:
                os.close(fd)
            except OSError:
                pass
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        """Stop the closer once it has closed what it holds (it is not waited for)."""
        if self._thread is not None:
            self._queue.put(None)


def _is_inet_socket(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.family in (socket.AF_INET, socket.AF_INET6)
    finally:
        sock.detach()


def _set_no_linger(fd: int) -> bool:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    except OSError:
        return False
    finally:
        sock.detach()
    return True


class OuterNotifier:
    """Our own end of sd_notify towards the service manager that started us ($NOTIFY_SOCKET).

    Send errors are dropped (systemd may be restarting; a notification is advisory): one failed
    datagram must never stop the supervisor. The socket is close-on-exec, so no generation gets it.
    """

    def __init__(self, address: str) -> None:
        # sd_notify(3): an absolute path, or '@' for the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> OuterNotifier | None:
        address = environ.get("NOTIFY_SOCKET", "")
        if not address.startswith(("/", "@")) or len(address) < 2:
            return None  # unset, or a vsock address we do not speak
        return cls(address)

    def send(self, state: str, fds: tuple[int, ...] = ()) -> bool:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        try:
            self.sock.sendmsg([state.encode()], anc, 0, self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
