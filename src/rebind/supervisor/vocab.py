"""The supervisor machine's vocabulary: its state, the events it is fed, the actions it returns.

Values only (frozen dataclasses and enums): ``machine.py`` holds the decisions, ``run.py`` and
its rooms turn selectors, signals, /proc and fork into these events and carry out these actions.
Events about one generation share one shape (:class:`GenEvent`: its number and the time), as do
the two signal events (:class:`SigEvent`) and the two signalling actions (:class:`ToGen`).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias


class Phase(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop (or the app chose to): waiting for every generation to go
    DONE = "done"


class Role(enum.Enum):
    STARTING = "starting"  # spawned, not ready yet
    SERVING = "serving"
    DRAINING = "draining"  # replaced with --drain: stop signal sent, finishing in-flight work
    STOPPING = "stopping"  # stop signal sent to the leader, SIGKILL after grace
    LINGERING = "lingering"  # leader gone, the rest of its processes got SIGTERM, SIGKILL after grace
    NONE = "none"  # an event about no (or an unknown) generation


class RestartPolicy(enum.Enum):
    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    NO = "no"


@dataclass(frozen=True, slots=True)
class Config:
    ready_timeout: float = 30.0
    grace: float = 10.0
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    ready_on_spawn: bool = False  # --ready none
    ready_on_notify: bool = False  # --ready notify: READY=1 from the tree is the proof (else a hint)
    stop_signal: int = signal.SIGTERM  # what a replaced generation gets (issue 13: --stop-signal)
    drain: float = 0.0  # --drain: after the stop signal, this long before SIGTERM to all of it


@dataclass(frozen=True, slots=True)
class Gen:
    number: int
    role: Role
    started: float
    ready_at: float | None = None
    deadline: float | None = None  # ready deadline (STARTING) or SIGKILL time (STOPPING, LINGERING)
    waiters: tuple[int, ...] = ()  # reload requests answered when this generation is ready or fails
    reload: bool = False  # started by a reload (its outcome is a ReloadDone), not a start or restart


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase = Phase.RUNNING
    gens: tuple[Gen, ...] = ()
    next_number: int = 1
    ever_ready: bool = False
    crashes: int = 0
    restart_at: float | None = None
    queued: tuple[int, ...] | None = None  # a reload asked for while one is starting (waiters)
    final: int | None = None  # our exit status, once decided
    final_from: int | None = None  # the generation whose exit status becomes ours on shutdown
    stopped_by: int | None = None  # the signal we were stopped with (and forwarded)
    reloading: bool = False  # RELOADING=1 sent to the outer systemd, its READY=1 not yet

    def gen(self, number: int | None) -> Gen | None:
        return next((g for g in self.gens if g.number == number), None)

    def with_role(self, role: Role) -> Gen | None:
        return next((g for g in self.gens if g.role is role), None)

    @property
    def serving(self) -> Gen | None:
        return self.with_role(Role.SERVING)

    @property
    def starting(self) -> Gen | None:
        return self.with_role(Role.STARTING)

    def next_deadline(self) -> float | None:
        times = [g.deadline for g in self.gens if g.deadline is not None]
        if self.restart_at is not None:
            times.append(self.restart_at)
        return min(times) if times else None

    def describe(self, name: Callable[[int], str] = lambda n: f"generation {n}") -> str:
        """`rebind reload --status`: which generations run, in which role."""
        serving, starting = self.serving, self.starting
        parts = [f"serving: {name(serving.number) if serving else 'none'}"]
        if starting:
            parts.append(f"starting: {name(starting.number)}")
        leaving = (Role.STOPPING, Role.LINGERING, Role.DRAINING)
        stopping = [name(g.number) for g in self.gens if g.role in leaving]
        if stopping:
            parts.append("stopping: " + ", ".join(stopping))
        return "; ".join(parts)


# -- events: what happened --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot:
    now: float


@dataclass(frozen=True, slots=True)
class GenEvent:
    """Something happened to generation NUMBER at NOW (the machine looks up its role)."""

    number: int
    now: float


@dataclass(frozen=True, slots=True)
class Spawned(GenEvent):
    """Its leader was forked and exec'd."""


@dataclass(frozen=True, slots=True)
class Emptied(GenEvent):
    """No process of a lingering generation is left."""


@dataclass(frozen=True, slots=True)
class ReadyTimeout(GenEvent):
    """Not ready by its deadline."""


@dataclass(frozen=True, slots=True)
class GraceOver(GenEvent):
    """Its grace (or drain) time is over."""


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    number: int
    reason: str
    code: int  # the exit status to use if this was the first generation
    now: float


@dataclass(frozen=True, slots=True)
class Ready:
    number: int
    how: str
    now: float


@dataclass(frozen=True, slots=True)
class Notified:
    """READY=1 on the notify socket from PID, a process of generation NUMBER's tree (the sender the
    kernel attests, checked against the tree by readiness.py)."""

    number: int
    pid: int
    now: float


@dataclass(frozen=True, slots=True)
class Exited:
    """The generation's leader was reaped; ``remaining``: other processes of it still run."""

    number: int
    code: int
    remaining: bool
    now: float
    addr_in_use: bool = False  # its stderr said "Address already in use" (the tee saw it)


@dataclass(frozen=True, slots=True)
class RestartDue:
    now: float


@dataclass(frozen=True, slots=True)
class Reload:
    waiter: int | None  # None: SIGHUP (nobody waits for the answer)
    now: float


@dataclass(frozen=True, slots=True)
class SigEvent:
    sig: int
    now: float


@dataclass(frozen=True, slots=True)
class Stop(SigEvent):
    """SIGTERM or SIGINT: stop every generation and exit."""


@dataclass(frozen=True, slots=True)
class Forward(SigEvent):
    """SIGQUIT, SIGUSR1 or SIGUSR2: for the serving (else the starting) generation's leader."""


Event: TypeAlias = (
    Boot
    | Spawned
    | SpawnFailed
    | Ready
    | Notified
    | Exited
    | Emptied
    | ReadyTimeout
    | GraceOver
    | RestartDue
    | Reload
    | Stop
    | Forward
)
EVENTS: tuple[type, ...] = Event.__args__
NUMBERED: tuple[type, ...] = (Spawned, SpawnFailed, Ready, Notified, Exited, Emptied, ReadyTimeout, GraceOver)


# -- actions: what the caller must do, in order ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    number: int
    why: str


@dataclass(frozen=True, slots=True)
class ToGen:
    number: int
    sig: int


@dataclass(frozen=True, slots=True)
class SignalLeader(ToGen):
    """Send SIG to the generation's leader (our unreaped child)."""


@dataclass(frozen=True, slots=True)
class SignalRest(ToGen):
    """Send SIG to every process of the generation (its group, its tree, orphans re-parented to us)."""


@dataclass(frozen=True, slots=True)
class ScanNow:
    """Look at /proc now: is a process of generation NUMBER serving every socket?"""

    number: int


@dataclass(frozen=True, slots=True)
class Forget:
    """The generation is gone for good: drop what the caller tracks for it."""

    number: int


@dataclass(frozen=True, slots=True)
class Reply:
    waiters: tuple[int, ...]
    line: str


@dataclass(frozen=True, slots=True)
class Log:
    line: str


@dataclass(frozen=True, slots=True)
class NotifyOuter:
    """sd_notify to the outer $NOTIFY_SOCKET (systemd): newline-separated ``KEY=VALUE`` lines.
    The caller adds ``MAINPID=`` (its own pid) to every READY=1."""

    state: str


@dataclass(frozen=True, slots=True)
class ReloadDone:
    """The outcome of a reload (for metrics): generation NUMBER took over (ok) or failed."""

    number: int
    ok: bool
    seconds: float  # from its spawn to ready (ok) or to the failure
    detail: str


@dataclass(frozen=True, slots=True)
class Finish:
    code: int


Action: TypeAlias = (
    Spawn | SignalLeader | SignalRest | ScanNow | Forget | Reply | Log | NotifyOuter | ReloadDone | Finish
)
