"""The one client of `rebind run --control`: who is at the other end, and asking it something.

Also the one place that says whether a process is a `rebind run` at all (:func:`looks_like_run`,
:func:`supervisor_pid`): top ranks a port's holders by it, `rebind reload --pid-file` checks a pid
file's pid with it before signalling.

`rebind reload --control PATH` and top's `r` key both talk to a supervisor through its control
socket. Before a command is sent or an answer believed, the server end must be a process we would
trust to run our app (issue 18, item 10): the kernel's SO_PEERCRED of the listening socket (its
owner when it called listen(), unix_listen -> init_peercred) must be root or the invoking user,
and, when the caller knows which supervisor it expects (top finds it by the port), that very pid.
The socket file and its directory must belong to root or the invoking user too, and the directory
must not let others replace the file (writable by others without the sticky bit): that refuses a
planted socket before we connect to it, with a clearer word than the credentials alone. The
credentials are what make it safe: a check of the path can race, SO_PEERCRED of the connection
cannot.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rebind.errors import EnvironmentProblem, ExitCode, Fault, RebindError, UsageError
from rebind.textsafe import visible

_UCRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
MAX_ANSWER = 4096  # a supervisor answers one short line


class NotTrusted(RebindError):
    """The control socket is not (or may not be) served by a supervisor we trust: refused."""

    fault = Fault.ENVIRONMENT

    @property
    def exit_code(self) -> int:
        return int(ExitCode.REFUSED)


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def looks_like_run(argv: Sequence[str]) -> bool:
    """Is this command line a `rebind run` (``rebind run ...``, ``python -m rebind run ...``)?
    A name only: it orders candidates and refuses stale pid files, it never makes a peer trusted."""
    return "run" in argv and any("rebind" in a for a in argv)


def supervisor_pid(pid_file: str, proc: str = "/proc") -> int:
    """The pid a `rebind run --pid-file` wrote, if that process is a `rebind run` now (a stale
    pid file may name a recycled pid: only a `rebind run` may be signalled); else UsageError."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")]
    except (OSError, ValueError) as exc:
        raise UsageError(f"--pid-file {pid_file}: no running supervisor ({exc})") from None
    if not looks_like_run(argv):
        raise UsageError(f"--pid-file {pid_file}: pid {pid} is not a `rebind run` process")
    return pid


def trusted_uids() -> frozenset[int]:
    """Root and whoever runs this client: the users who may have started the supervisor."""
    return frozenset({0, os.geteuid()})


def check_path(path: str) -> None:
    """Refuse a control socket file that another user owns or can replace."""
    shown = visible(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"no `rebind run` listens on control socket {shown}") from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot look at control socket {shown}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{shown} is not a socket (give rebind run's --control path)")
    trusted = trusted_uids()
    if st.st_uid not in trusted:
        raise NotTrusted(f"refused: control socket {shown} belongs to uid {st.st_uid}, not to root or you")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dst = os.stat(directory)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot look at {visible(directory)}: {exc.strerror}") from None
    others_write = dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if dst.st_uid not in trusted or (others_write and not dst.st_mode & stat.S_ISVTX):
        raise NotTrusted(
            f"refused: control socket {shown} is in {visible(directory)}, which other users can change"
            f" (owner uid {dst.st_uid}, mode {stat.S_IMODE(dst.st_mode):o})"
        )


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid)


def check_peer(path: str, peer: Peer, expect_pid: int | None = None) -> None:
    shown = visible(path)
    if peer.uid not in trusted_uids():
        raise NotTrusted(
            f"refused: control socket {shown} is served by pid {peer.pid} of uid {peer.uid},"
            " not by root or you: not a `rebind run` to trust"
        )
    if expect_pid is not None and peer.pid != expect_pid:
        raise NotTrusted(
            f"refused: {shown} is served by pid {peer.pid}, not by the supervisor (pid {expect_pid})"
        )


def ask(path: str, command: str, timeout: float, expect_pid: int | None = None) -> str:
    """Send COMMAND (``reload``, ``status``) to the supervisor at PATH; its one-line answer.

    Refused (NotTrusted, exit 5) before anything is sent when the peer is not trusted; a silent
    or slow-dripping peer costs at most TIMEOUT in all.
    """
    check_path(path)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise UsageError(f"no `rebind run` listens on control socket {visible(path)}") from None
        except TimeoutError:
            raise EnvironmentProblem(f"no answer from {visible(path)} within {timeout:g}s") from None
        except OSError as exc:
            raise EnvironmentProblem(f"cannot connect to {visible(path)}: {exc.strerror}") from None
        check_peer(path, peer_of(s), expect_pid)
        data = b""
        try:
            s.sendall(command.encode() + b"\n")
            while not data.endswith(b"\n") and len(data) < MAX_ANSWER:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                s.settimeout(left)
                chunk = s.recv(MAX_ANSWER - len(data))
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise EnvironmentProblem(f"no answer from {visible(path)} within {timeout:g}s") from None
        except OSError as exc:
            if not data:
                raise EnvironmentProblem(f"{visible(path)}: {exc.strerror}") from None
    return visible(data.decode("utf-8", "replace").strip())
