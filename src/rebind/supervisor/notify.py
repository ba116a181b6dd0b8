"""The supervisor's end of sd_notify: a datagram socket whose messages carry the sender's pid.

With SO_PASSCRED set on the receiver, the kernel attaches SCM_CREDENTIALS (pid, uid, gid) to
every datagram, filled in by the kernel for senders that send none (net/core/scm.c,
unix_dgram_sendmsg), so a READY=1 can be attributed to a process tree without trusting its text.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_BUF = 4096  # systemd's NOTIFY_BUFFER_MAX (PIPE_BUF)
_ANC = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(253 * 4)  # creds + SCM_RIGHTS (FDSTORE)


@dataclass(frozen=True, slots=True)
class NotifyMessage:
    pid: int  # 0 when the kernel attached no credentials
    uid: int
    fields: tuple[tuple[str, str], ...]

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
    for level, kind, payload in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            pid, uid, _gid = _UCRED.unpack_from(payload)
        elif kind == socket.SCM_RIGHTS:
            # Passed fds (FDSTORE=1) are installed in our table on receipt: close them, or
            # every message would leak descriptors into the supervisor.
            for (fd,) in struct.iter_unpack("i", payload[: len(payload) - len(payload) % 4]):
                os.close(fd)
    fields = []
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields.append((key, value))
    return NotifyMessage(pid, uid, tuple(fields))


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
