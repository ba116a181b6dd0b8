"""`rebind trace --record FILE`: the same safe appender as `rebind top --record`.

FILE is opened as top's records are (rebind.top.record.Recorder: O_NOFOLLOW, O_APPEND|O_CREAT
0600 when missing, never truncated, O_NONBLOCK against a planted FIFO; then a regular file with
one link, owned by us) and rotated to FILE.1 past ``max_bytes``. Each event is one write() of
one line, so a top and a trace recording into one FILE never interleave inside a line, and
`rebind history FILE` reads both kinds. A line is bounded (comm is 16 bytes, texts are capped in
rebind.render.trace), and so is the file: a user who makes binds fail in a loop costs disk up to
twice ``max_bytes``, no more.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from rebind.render.trace import BadTraceRecord, is_trace_doc
from rebind.render.trace import from_json as trace_from_json
from rebind.top.events import BadRecord, describe, record_docs
from rebind.top.events import from_json as top_from_json
from rebind.top.record import DEFAULT_MAX_BYTES, Recorder


def history(lines: Iterable[str], port: int | None = None) -> Iterator[str]:
    """`rebind history`'s lines for a file of top events and trace events, in file order.

    Raises BadRecord naming the first line that is neither (as top.events.parse_lines does)."""
    for n, doc in record_docs(lines):
        try:
            if is_trace_doc(doc):
                rec = trace_from_json(doc)
                if port is None or rec.port == port:
                    yield rec.describe()
                continue
            e = top_from_json(doc)
        except (BadRecord, BadTraceRecord) as exc:
            raise BadRecord(f"line {n}: {exc}") from None
        if port is None or e.key.port == port:
            yield describe(e)


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
