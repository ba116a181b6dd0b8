"""Each generation's stderr goes through a pipe we copy to ours as it comes (issue 13), so that a
failure with "Address already in use" is *seen*: the machine then says for sure that the server
ignores LISTEN_FDS (``Exited.addr_in_use``) instead of guessing."""

from __future__ import annotations

import contextlib
import os
import selectors
from dataclasses import dataclass

# What a server that binds the port itself prints when our socket holds it (Python, nginx, Go, ...).
ADDR_IN_USE = (b"Address already in use", b"EADDRINUSE", b"[Errno 98]")
TEE_CHUNK = 65536
READS_PER_WAKE = 16  # bounded per wake-up: a chatty app cannot starve the loop


@dataclass(slots=True)
class _Pipe:
    number: int  # the generation whose stderr this pipe carries
    tail: bytes = b""  # the last bytes read: a marker may straddle two reads


class Tees:
    """The read ends of the generations' stderr pipes, registered with the event loop's selector."""

    def __init__(self, sel: selectors.BaseSelector, out: int = 2) -> None:
        self.sel = sel
        self.out = out
        self.pipes: dict[int, _Pipe] = {}
        self.addr_in_use: set[int] = set()  # generations whose stderr said so

    def add(self, fd: int, number: int) -> None:
        os.set_blocking(fd, False)
        self.pipes[fd] = _Pipe(number)
        self.sel.register(fd, selectors.EVENT_READ, lambda: self.read(fd))

    def read(self, fd: int) -> None:
        """Copy what the pipe holds to our stderr (a selector callback that makes no event)."""
        pipe = self.pipes.get(fd)
        if pipe is None:
            return
        for _ in range(READS_PER_WAKE):
            try:
                data = os.read(fd, TEE_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close(fd)
                return
            _write_all(self.out, data)
            window = pipe.tail + data
            if any(marker in window for marker in ADDR_IN_USE):
                self.addr_in_use.add(pipe.number)
            pipe.tail = window[-64:]

    def leader_exited(self, number: int) -> bool:
        """Read what generation NUMBER wrote before we decide why it failed: did it say
        "Address already in use"? (Asked once per leader: the answer is forgotten.)"""
        for fd, pipe in list(self.pipes.items()):
            if pipe.number == number:
                self.read(fd)
        seen = number in self.addr_in_use
        self.addr_in_use.discard(number)
        return seen

    def close(self, fd: int) -> None:
        if self.pipes.pop(fd, None) is not None:
            self.sel.unregister(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self.pipes):
            self.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # EPIPE/EIO/ENOSPC: drop it, as stderr_log does
        while data:
            data = data[os.write(fd, data) :]
