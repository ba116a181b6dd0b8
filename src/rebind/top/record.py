"""The ``--record FILE`` of `rebind top` and the reading side of `rebind history` (docs/top.md).

rebind runs as root and FILE may sit in a shared directory: it is opened with O_NOFOLLOW (a
symlink planted at FILE is not followed), O_APPEND|O_CREAT (created 0600 if missing, never
truncated) and O_NONBLOCK (a FIFO planted there cannot hang us), then must be a regular file
with one link, owned by us. Each event is one write() of one line, so concurrent appenders never
interleave inside a line (O_APPEND writes to regular files are atomic with respect to offset).

What any user can make us write is bounded (audit 2026-12-05 M3): each owner's text is capped
(rebind.top.events.cap_cmdline), owner events are rate-limited per port
(:class:`~rebind.top.events.OwnerEventRate`), and FILE is rotated once it would pass
``max_bytes``: FILE becomes FILE.1 (replacing an older FILE.1) and a new FILE is created with
O_CREAT|O_EXCL|O_NOFOLLOW, so at most twice ``max_bytes`` is ever on disk. If the rotation
cannot be done safely (FILE was replaced meanwhile, something else sits at FILE once it is
renamed), recording stops with one message instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator

from rebind.errors import UsageError
from rebind.top.events import MAX_LINE_BYTES, BadRecord, Event, OwnerEventRate, to_line

#: Default size after which FILE rotates to FILE.1 (`rebind top --record-max`).
DEFAULT_MAX_BYTES = 32 << 20
#: Smallest accepted cap: a few capped lines must always fit into a fresh file.
MIN_MAX_BYTES = 64 << 10
MAX_MAX_BYTES = 1 << 40
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class RecordStopped(Exception):
    """Recording cannot go on safely; the message says why (shown once in the status line)."""


def parse_size(text: str | int, what: str = "--record-max") -> int:
    """``64K``, ``32M``, ``1G``, ``1048576`` (bytes) -> bytes, in [64 KiB, 1 TiB]."""
    raw = str(text).strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (raw[:-1], raw[-1]) if raw[-1:] in _UNITS and raw[-1:] else (raw, "")
    if not (num.isascii() and num.isdigit()):
        raise UsageError(f"{what} {text!r} is not a size (e.g. 64K, 32M, 1G)")
    size = int(num) * _UNITS[unit]
    if not MIN_MAX_BYTES <= size <= MAX_MAX_BYTES:
        raise UsageError(f"{what} {text!r} is out of range (64K-1T)")
    return size


def _check_ours(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--record {path}: not a regular file")
    if st.st_nlink != 1:
        raise UsageError(f"--record {path}: has {st.st_nlink} hard links; refusing to write to it")
    if st.st_uid != os.geteuid():
        raise UsageError(f"--record {path}: owned by uid {st.st_uid}, not by us; refusing to append")
    os.set_blocking(fd, True)
    return st


class Recorder:
    def __init__(
        self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, rate: OwnerEventRate | None = None
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.rate = OwnerEventRate() if rate is None else rate
        self.rotations = 0
        try:
            fd = os.open(path, _APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsageError(f"--record {path}: {exc.strerror}") from None
        try:
            st = _check_ours(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino)
        self.size = st.st_size

    def write(self, events: Iterable[Event]) -> None:
        """Append the events the rate limit admits; rotate first when one would pass the cap.

        Raises OSError (a failed write) or RecordStopped (no safe rotation): stop recording."""
        admitted = self.rate.admit(events)
        if admitted:
            self.size = os.fstat(self.fd).st_size  # another appender may share FILE
        for e in admitted:
            data = to_line(e).encode()
            if self.size + len(data) > self.max_bytes:
                self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            self.size += len(data)

    def _rotate(self) -> None:
        old = f"{self.path}.1"
        try:
            st = os.lstat(self.path)
        except OSError as exc:
            raise RecordStopped(f"{self.path} is gone ({exc.strerror}); not rotating") from None
        if (st.st_dev, st.st_ino) != self.ident:
            raise RecordStopped(f"{self.path} was replaced by another file; not rotating")
        try:
            # rename() replaces whatever entry sits at FILE.1 (a symlink or hard link planted
            # there is replaced, never written through) and fails on a directory.
            os.rename(self.path, old)
        except OSError as exc:
            raise RecordStopped(f"cannot rotate to {old}: {exc.strerror}") from None
        os.close(self.fd)
        self.fd = -1
        try:
            fd = os.open(self.path, _APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            why = "something else was created there" if exc.errno == errno.EEXIST else exc.strerror
            raise RecordStopped(f"cannot create a new {self.path} after rotating ({why})") from None
        try:
            st = _check_ours(fd, self.path)
        except UsageError as exc:
            os.close(fd)
            raise RecordStopped(str(exc)) from None
        self.fd, self.ident, self.size = fd, (st.st_dev, st.st_ino), 0
        self.rotations += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------
# Reading (`rebind history`): hostile files must not hang, crash or exhaust memory (audit L1)

_CHUNK = 64 << 10


def open_record(path: str) -> int:
    """A read-only fd of a regular file. O_NONBLOCK: a FIFO cannot hang the open; O_NOFOLLOW: a
    symlink is refused rather than followed. UsageError (one line) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"{path}: is a symbolic link; refusing to follow it (give the file itself)"
            ) from None
        raise UsageError(f"{path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket"
                if stat.S_ISSOCK(mode)
                else "not a regular file"
            )
            raise UsageError(f"{path}: is {kind}, not a regular file (not a rebind top record)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_lines(fd: int, max_line: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Lines of the file (newline stripped), read in bounded chunks: a line longer than
    ``max_line`` bytes, or one that is not UTF-8, raises BadRecord naming its number. Memory
    stays within one chunk plus one line whatever the file holds."""
    buf = b""
    n = 0
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            n += 1
            yield _decode(raw, n, max_line)
        if len(buf) > max_line:
            raise BadRecord(f"line {n + 1}: longer than {max_line} bytes")
    if buf:
        yield _decode(buf, n + 1, max_line)


def _decode(raw: bytes, n: int, max_line: int) -> str:
    if len(raw) > max_line:
        raise BadRecord(f"line {n}: longer than {max_line} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord(f"line {n}: not UTF-8 text") from None
