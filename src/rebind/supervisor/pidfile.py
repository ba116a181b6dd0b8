"""`rebind run --pid-file`: written before anything is bound, removed at exit if still ours."""

from __future__ import annotations

import contextlib
import os
import secrets

from rebind.errors import UsageError


def write_pid_file(path: str) -> None:
    """Write our pid to PATH atomically, without following anything another user planted.

    The temporary file is created in PATH's directory with O_CREAT|O_EXCL|O_NOFOLLOW under an
    unguessable name (a planted symlink or file makes the open fail, never redirects it) and
    renamed over PATH (rename replaces a symlink at PATH, it does not follow it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not base:
        raise UsageError(f"--pid-file {path!r}: not a file name")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, flags, 0o644)
    except OSError as exc:
        raise UsageError(f"--pid-file {path}: cannot create a file in {directory}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # whatever the umask: `rebind reload --pid-file` may run as another user
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(tmp, path)  # atomic: `rebind reload --pid-file` never reads half a pid
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsageError(f"--pid-file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def remove_pid_file(path: str) -> None:
    """Remove PATH if it still names us (another supervisor may have taken it over)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        content = os.read(fd, 32)
    except OSError:
        content = b""
    finally:
        os.close(fd)
    if content.strip() == str(os.getpid()).encode():
        with contextlib.suppress(OSError):
            os.unlink(path)
