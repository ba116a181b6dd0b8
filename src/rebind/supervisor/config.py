"""`rebind run`'s configuration: validated once, where it is built (the CLI and the API)."""

from __future__ import annotations

import enum
import os
import signal
from dataclasses import dataclass

from rebind.errors import UsageError
from rebind.model.validate import parse_seconds
from rebind.supervisor import machine as m
from rebind.supervisor.spec import ListenSpec

MAX_BACKLOG = 2**31 - 1  # listen() takes an int; the kernel clamps it to net.core.somaxconn


class ReadyMode(enum.Enum):
    # A process of the new tree is seen serving every socket (waiting on it, or holding a
    # connection it accepted from it). READY=1 only makes us look at once: gunicorn's arbiter
    # sends it before its workers have imported the app (issue 13), so it proves nothing alone.
    AUTO = "auto"
    NOTIFY = "notify"  # only READY=1 on NOTIFY_SOCKET (trust the app: it must mean "serving")
    ACCEPT = "accept"  # only /proc, as AUTO but without listening to READY=1
    NONE = "none"  # ready as soon as exec succeeded

    @property
    def listens(self) -> bool:
        """READY=1 on the notify socket counts (alone, or as a hint to look now)."""
        return self in (ReadyMode.AUTO, ReadyMode.NOTIFY)

    @property
    def scans(self) -> bool:
        """/proc is scanned for a process of the new generation serving every socket."""
        return self in (ReadyMode.AUTO, ReadyMode.ACCEPT)


Restart = m.RestartPolicy


@dataclass(frozen=True, slots=True)
class RunConfig:
    argv: tuple[str, ...]
    listen: tuple[ListenSpec, ...]
    ready: ReadyMode = ReadyMode.AUTO
    ready_timeout: float = 30.0
    grace: float = 10.0
    restart: m.RestartPolicy = m.RestartPolicy.ON_FAILURE
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    control: str | None = None
    pid_file: str | None = None
    reuseport: bool = False
    backlog: int | None = None
    stop_signal: int = signal.SIGTERM  # what a replaced (or timed-out) generation gets
    drain: float = 0.0  # after the stop signal: this long to finish, then SIGTERM to all of it

    def __post_init__(self) -> None:
        # Validated here, not only in the CLI: inf/nan/huge durations crash select() with
        # OverflowError at the first reload (issue 8), and the API builds RunConfig directly.
        parse_seconds(self.ready_timeout, what="--ready-timeout", minimum=0.1)
        parse_seconds(self.grace, what="--grace")
        parse_seconds(self.backoff_initial, what="backoff")
        parse_seconds(self.backoff_max, what="--backoff-max")
        parse_seconds(self.drain, what="--drain")
        if self.backlog is not None and not (
            isinstance(self.backlog, int) and 1 <= self.backlog <= MAX_BACKLOG
        ):
            raise UsageError(f"--backlog {self.backlog!r} is out of range (1-{MAX_BACKLOG})")
        if self.stop_signal not in set(signal.valid_signals()):
            raise UsageError(f"--stop-signal {self.stop_signal!r} is not a signal")
        if not self.argv:
            raise UsageError("no command to run")
        if not self.listen:
            raise UsageError("give at least one --listen [HOST:]PORT")

    def machine_config(self) -> m.Config:
        return m.Config(
            ready_timeout=self.ready_timeout,
            grace=self.grace,
            restart=self.restart,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            ready_on_spawn=self.ready is ReadyMode.NONE,
            ready_on_notify=self.ready is ReadyMode.NOTIFY,
            stop_signal=self.stop_signal,
            drain=self.drain,
        )


def parse_signal(value: str) -> int:
    """`TERM`, `SIGTERM`, `sigquit` or `15` -> the signal number; UsageError otherwise."""
    text = value.strip().upper()
    if text.isascii() and text.isdigit():
        number = int(text)
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        number = getattr(signal.Signals, name, 0) if name.isidentifier() else 0
    if number not in set(signal.valid_signals()) or number == 0:
        raise UsageError(f"--stop-signal {value!r} is not a signal name or number (e.g. TERM, QUIT, 3)")
    return int(number)


def exit_code(status: int) -> int:
    """Shell convention: a child killed by signal N is reported as 128+N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
