"""Start one generation: fork, put the listening sockets at fds 3.., set LISTEN_PID, exec.

posix_spawn cannot do it: LISTEN_PID must be the child's own pid (sd_listen_fds(3) ignores the
fds otherwise), which is known only after fork. The child runs a few async-signal-safe-in-spirit
steps (no locks taken: the supervisor is single-threaded) and reports exec failure through a
close-on-exec pipe, as subprocess does.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
from collections.abc import Mapping, Sequence

from rebind.errors import UsageError
from rebind.kernel.procstat import libc

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive exec, so reset them the way
# subprocess's restore_signals does, plus every signal the supervisor handles.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class CommandNotFound(UsageError):
    pass


def resolve_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The program to exec; argv and env may carry surrogate-escaped non-UTF-8 bytes."""
    exe = argv[0]
    if "/" in exe:
        if not os.access(exe, os.X_OK) or os.path.isdir(exe):
            raise CommandNotFound(f"command not found or not executable: {exe}")
        return exe
    found = shutil.which(exe, path=env.get("PATH", os.defpath))
    if found is None:
        raise CommandNotFound(f"command not found: {exe}")
    return found


def become_subreaper() -> None:
    """Orphans of a generation (e.g. workers of a killed master) re-parent to us, not init."""
    libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def spawn(
    exe: str,
    argv: Sequence[str],
    env: Mapping[bytes, bytes],
    fds: Sequence[int],
    reset: Sequence[int],
    stderr: int | None = None,
) -> int:
    """Start EXE with FDS as 3, 4, ... (inheritable), STDERR as fd 2, LISTEN_PID set to its pid.

    Every fd in FDS must be >= 3 + len(FDS), so moving one into place never clobbers another.
    """
    assert all(fd >= 3 + len(fds) for fd in fds)
    # Bytes all the way: an argument or variable that is not UTF-8 (b"\xff") is passed as it came
    # (os.fsencode undoes the surrogateescape decoding of sys.argv).
    env_b = dict(env)
    argv_b = [os.fsencode(a) for a in argv]
    parent = os.getpid()
    lib = libc()
    r, w = os.pipe2(os.O_CLOEXEC)
    # Block signals across fork: a signal landing in the child before its handlers are reset
    # would run the supervisor's Python handler there.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:  # pragma: no cover - child, replaced by exec
            try:
                _child(exe, argv_b, env_b, fds, reset, parent, lib, stderr)
            except BaseException as exc:
                os.write(w, str(getattr(exc, "errno", 0) or 0).encode())
            finally:
                os._exit(127)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(w)
    try:
        report = b""
        while chunk := os.read(r, 64):
            report += chunk
    finally:
        os.close(r)
    if report:
        os.waitpid(pid, 0)
        err = int(report or b"0")
        raise CommandNotFound(f"cannot run {exe}: {os.strerror(err)}")
    return pid


def _child(
    exe: str,
    argv: list[bytes],
    env: dict[bytes, bytes],
    fds: Sequence[int],
    reset: Sequence[int],
    parent: int,
    lib: ctypes.CDLL,
    stderr: int | None,
) -> None:  # pragma: no cover - runs in the forked child
    # Own process group: the terminal's Ctrl-C reaches only the supervisor (which forwards it),
    # and a generation's whole tree can be killed with one killpg().
    os.setpgid(0, 0)
    # If the supervisor dies, the generation must not keep the port (that is the EADDRINUSE
    # we exist to prevent): SIGKILL, since a SIGTERM can be ignored. Descendants do not inherit
    # it (cleared on fork): the watchdog kills them. Re-check the parent to close the race.
    lib.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    if stderr is not None:
        os.dup2(stderr, 2, inheritable=True)  # first: the loop below may reuse its number
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i, inheritable=True)
    for sig in reset:
        signal.signal(sig, signal.SIG_DFL)
    env[b"LISTEN_PID"] = str(os.getpid()).encode()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.execve(os.fsencode(exe), argv, env)
