"""The ``--record FILE`` of `rebind top`: events appended as JSON lines (docs/top.md).

rebind runs as root and FILE may sit in a shared directory: it is opened with O_NOFOLLOW (a
symlink planted at FILE is not followed), O_APPEND|O_CREAT (created 0600 if missing, never
truncated) and O_NONBLOCK (a FIFO planted there cannot hang us), then must be a regular file
with one link, owned by us. Each event is one write() of one line, so concurrent appenders never
interleave inside a line (O_APPEND writes to regular files are atomic with respect to offset).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from rebind.errors import UsageError
from rebind.top.events import Event, to_line


class Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise UsageError(f"--record {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"--record {path}: not a regular file")
            if st.st_nlink != 1:
                raise UsageError(f"--record {path}: has {st.st_nlink} hard links; refusing to write to it")
            if st.st_uid != os.geteuid():
                raise UsageError(f"--record {path}: owned by uid {st.st_uid}, not by us; refusing to append")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def write(self, events: Iterable[Event]) -> None:
        for e in events:
            data = to_line(e).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
