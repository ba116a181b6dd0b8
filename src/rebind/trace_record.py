"""`rebind trace --record FILE`: the same safe appender as `rebind top --record`.

FILE is opened as top's records are (rebind.top.record.Recorder: O_NOFOLLOW, O_APPEND|O_CREAT
0600 when missing, never truncated, O_NONBLOCK against a planted FIFO; then a regular file with
one link, owned by us) and rotated to FILE.1 past ``max_bytes``. Each event is one write() of
one line, so a top and a trace recording into one FILE never interleave inside a line, and
`rebind history FILE` reads both kinds. A line is bounded (comm is 16 bytes, texts are capped in
rebind.model.trace), and so is the file: a user who makes binds fail in a loop costs disk up to
twice ``max_bytes``, no more.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from rebind.top.record import DEFAULT_MAX_BYTES, Recorder


class TraceRecorder(Recorder):
    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(path, max_bytes)

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append the lines (each ending in a newline); rotate first when one would pass the cap.

        Raises OSError (a failed write) or RecordStopped (no safe rotation): stop recording."""
        data = [line.encode() for line in lines]
        if not data:
            return
        self.size = os.fstat(self.fd).st_size  # another appender may share FILE
        for raw in data:
            if self.size + len(raw) > self.max_bytes:
                self._rotate()
            view = memoryview(raw)
            while view:
                view = view[os.write(self.fd, view) :]
            self.size += len(raw)
