"""A few fds held in reserve, so a full fd table cannot stop the supervisor's own work.

Whatever fills our table (idle clients of a metrics endpoint in the same process, a burst of
passed fds, a low RLIMIT_NOFILE), the supervisor must still be able to start a generation (a pipe
for its stderr, spawn()'s exec-report pipe) and answer its control socket (issue 18, item 2).
We hold RESERVE descriptors of /dev/null from the start; when pipe2(), accept() or a /proc scan
fails with EMFILE or ENFILE, they are closed, the work is retried in the freed slots (nothing else
runs on the event loop's thread in between), and the reserve is taken back as soon as slots are
free again.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE})
#: Two pipes for a generation (the stderr tee, spawn()'s exec report), plus one for an accept().
SPAWN_NEEDS = 4
RESERVE = SPAWN_NEEDS + 1


class FdReserve:
    def __init__(self, size: int = RESERVE) -> None:
        self.size = size
        self.fds: list[int] = []
        self.used = 0  # times the reserve was released
        self._logged: set[str] = set()  # kinds of work logged in the current shortage
        self.refill()

    def refill(self) -> bool:
        """Take back what is missing; True when the reserve is full."""
        while len(self.fds) < self.size:
            try:
                self.fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return False
        return True

    @property
    def short(self) -> bool:
        return len(self.fds) < self.size

    def release(self, count: int | None = None) -> int:
        """Close COUNT (default: all) reserved fds; how many were closed."""
        n = len(self.fds) if count is None else min(count, len(self.fds))
        for _ in range(n):
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())
        if n:
            self.used += 1
        return n

    def retry(
        self,
        work: Callable[[], T],
        log: Callable[[str], None],
        what: str,
        count: int | None = None,
        keep: int = 0,
    ) -> T:
        """WORK(); if it fails for want of fds, release COUNT (default all) of the reserve, but
        never below KEEP, and try once more. Logged once per shortage and kind of work (the first
        word of WHAT): a scan retried every 100 ms must not flood the log."""
        kind = what.split()[0]
        try:
            result = work()
        except OSError as exc:
            if exc.errno not in SHORTAGE or len(self.fds) <= keep:
                raise
            freed = self.release(min(count or len(self.fds), len(self.fds) - keep))
            if kind not in self._logged:
                self._logged.add(kind)
                log(f"out of file descriptors ({exc.strerror}) to {what}: using {freed} reserved")
        else:
            self._logged.discard(kind)
            return result
        try:
            return work()
        finally:
            self.refill()

    @contextlib.contextmanager
    def lent(self, count: int) -> Iterator[None]:
        """COUNT reserved fds closed for the duration, taken back after: for work that treats
        EMFILE as "nothing found" instead of failing (procscan skips what it cannot open)."""
        n = min(count, len(self.fds))
        for _ in range(n):
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())
        try:
            yield
        finally:
            self.refill()

    def close(self) -> None:
        self.release()
