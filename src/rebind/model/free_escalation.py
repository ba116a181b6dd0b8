"""`rebind free`'s escalation as a pure state machine (like ``supervisor/machine.py``): no I/O,
no clock.

``step(config, state, event) -> (state, actions)``. The caller (``actions/free_signal.py``)
owns the pidfds: it turns what happens into :data:`Event` values, feeds them here, and carries
out the returned :data:`Action` values in order. Every transition is one row of
:data:`TRANSITIONS`, keyed by (what happened, the stage of the process it concerns); a missing
row is a bug, and the unit tests walk the whole product.

The escalation: pin every target (a pidfd opened against the planned pid + start time), send the
first signal to each one that still holds a blocking socket, wait up to ``grace`` seconds, send
SIGKILL to those still running (holding checked again), wait up to :data:`KILL_WAIT`. Every
process ends with one :class:`~rebind.model.free_result.Fate`.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TypeAlias

from rebind.model.free_result import Fate
from rebind.model.validate import signal_name

#: After SIGKILL a process normally dies at once; one in uninterruptible sleep (D) may not.
KILL_WAIT = 5.0


class Stage(enum.Enum):
    NEW = "new"  # planned; no pidfd yet
    PINNED = "pinned"  # a pidfd holds the planned identity
    SIGNALLING = "signalling"  # the first signal is being sent (holding checked right before)
    GRACE = "grace"  # the first signal was delivered: up to grace seconds to exit
    KILLING = "killing"  # SIGKILL is being sent (holding checked again right before)
    KILL_WAIT = "kill-wait"  # SIGKILL delivered: up to KILL_WAIT seconds to go
    DONE = "done"  # its fate is decided


class Delivery(enum.Enum):
    """What happened when the caller tried to send a signal (:class:`Signal`)."""

    DELIVERED = "delivered"
    VANISHED = "vanished"  # it had exited already (ESRCH)
    DENIED = "denied"  # EPERM
    RELEASED = "released"  # it no longer holds a blocking socket: not sent
    UNVERIFIED = "unverified"  # its fds could not be read to confirm it does: not sent


@dataclass(frozen=True, slots=True)
class Config:
    signal: int
    grace: float
    kill_wait: float = KILL_WAIT


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    label: str
    stage: Stage = Stage.NEW
    fate: Fate | None = None
    #: The signals it was sent, in order (names).
    signals: tuple[str, ...] = ()
    #: Seconds from the first signal until it was seen gone.
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class State:
    procs: tuple[Proc, ...]
    #: When the first signal went out (Begin): what ``Proc.seconds`` count from.
    started: float = 0.0
    #: A Wait is outstanding (its Exited / WaitOver events are still to come).
    waiting: bool = False

    @property
    def done(self) -> bool:
        return all(p.stage is Stage.DONE for p in self.procs)


def start(targets: Iterable[tuple[int, str]]) -> State:
    """The state before anything is done: one NEW process per (pid, label) of the plan."""
    return State(tuple(Proc(pid, label) for pid, label in targets))


# -- events: what happened --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pinned:
    pid: int


@dataclass(frozen=True, slots=True)
class PinFailed:
    """No pidfd for the planned identity: ``fate`` GONE, REUSED or UNVERIFIED, ``why`` says it."""

    pid: int
    fate: Fate
    why: str


@dataclass(frozen=True, slots=True)
class Begin:
    """Every target was pinned or given up: send the first signal."""

    now: float


@dataclass(frozen=True, slots=True)
class Sent:
    pid: int
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class Exited:
    pid: int
    now: float


@dataclass(frozen=True, slots=True)
class WaitOver:
    """The outstanding Wait's seconds passed with these processes still running."""

    now: float


Event: TypeAlias = Pinned | PinFailed | Begin | Sent | Exited | WaitOver
EVENTS: tuple[type, ...] = Event.__args__


# -- actions: what the caller must do, in order ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signal:
    """Re-identify PID through its pidfd, check it still holds a blocking socket, then send SIG;
    feed back what happened as :class:`Sent`."""

    pid: int
    sig: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait until these processes exit (one :class:`Exited` each) or ``seconds`` pass
    (:class:`WaitOver`, when any is still running)."""

    pids: tuple[int, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class Say:
    line: str


Action: TypeAlias = Signal | Wait | Say


# -- transitions --------------------------------------------------------------------------------------

Row: TypeAlias = tuple[Proc, list[Action]]
Handler: TypeAlias = Callable[[Config, State, Proc, Event], Row]


def step(cfg: Config, state: State, event: Event) -> tuple[State, list[Action]]:
    """One event in; the new state and the actions to carry out, in order, out. Begin and
    WaitOver concern every process (each one's row by its stage); the others name one pid."""
    if isinstance(event, Begin | WaitOver):
        return _group_step(cfg, state, event)
    pid = event.pid
    proc = next((p for p in state.procs if p.pid == pid), None)
    if proc is None:
        raise ValueError(f"{type(event).__name__} about pid {pid}, which is not in the plan")
    new, acts = _row(cfg, state, proc, event)
    state = replace(state, procs=tuple(new if p.pid == pid else p for p in state.procs))
    return _next_wait(cfg, state, acts)


def _group_step(cfg: Config, state: State, event: Begin | WaitOver) -> tuple[State, list[Action]]:
    # Begin starts the clock; WaitOver ends the outstanding wait.
    state = replace(state, started=event.now) if isinstance(event, Begin) else replace(state, waiting=False)
    procs, acts = [], []
    for p in state.procs:
        new, more = _row(cfg, state, p, event)
        procs.append(new)
        acts += more
    escalated = sorted(
        (p for p in procs if p.stage is Stage.KILLING and isinstance(event, WaitOver)), key=_pid
    )
    if escalated:
        labels = ", ".join(p.label for p in escalated)
        acts.insert(0, Say(f"still running after {cfg.grace:g}s: {labels}; sending SIGKILL"))
    return _next_wait(cfg, replace(state, procs=tuple(procs)), acts)


def _row(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    handler = TRANSITIONS.get((type(event), proc.stage))
    if handler is None:
        raise ValueError(f"no transition for {type(event).__name__} in stage {proc.stage.value}")
    return handler(cfg, state, proc, event)


def _next_wait(cfg: Config, state: State, acts: list[Action]) -> tuple[State, list[Action]]:
    """Once every signal of a round is sent, wait for the processes it was delivered to."""
    stages = {p.stage for p in state.procs}
    if state.waiting or stages & {Stage.NEW, Stage.SIGNALLING, Stage.KILLING}:
        return state, acts
    for stage, seconds in ((Stage.GRACE, cfg.grace), (Stage.KILL_WAIT, cfg.kill_wait)):
        pids = tuple(p.pid for p in state.procs if p.stage is stage)
        if pids:
            return replace(state, waiting=True), [*acts, Wait(pids, seconds)]
    return state, acts


def _pid(p: Proc) -> int:
    return p.pid


def _first(cfg: Config) -> tuple[str, ...]:
    return (signal_name(cfg.signal),)


def _done(proc: Proc, fate: Fate, signals: tuple[str, ...], seconds: float | None = None) -> Proc:
    return replace(proc, stage=Stage.DONE, fate=fate, signals=signals, seconds=seconds)


def _pinned(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    return replace(proc, stage=Stage.PINNED), []


def _pin_failed(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    assert isinstance(event, PinFailed)
    return _done(proc, event.fate, ()), [Say(f"{proc.label}: {event.why}; not signalled")]


def _send_first(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    return replace(proc, stage=Stage.SIGNALLING), [Signal(proc.pid, cfg.signal)]


def _unchanged(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    return proc, []


def _sent(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    """What sending the first signal (SIGNALLING) or SIGKILL (KILLING) came to."""
    assert isinstance(event, Sent)
    killing = proc.stage is Stage.KILLING
    sig = signal.SIGKILL if killing else cfg.signal
    before = _first(cfg) if killing else ()
    name = signal_name(sig)
    d = event.delivery
    if d is Delivery.DELIVERED:
        stage = Stage.KILL_WAIT if killing else Stage.GRACE
        return replace(proc, stage=stage, signals=(*before, name)), [Say(f"sent {name} to {proc.label}")]
    if d is Delivery.VANISHED:
        return _done(proc, Fate.GONE, before), []
    if d is Delivery.DENIED:
        return _done(proc, Fate.DENIED, before), [Say(f"{proc.label}: not permitted to send {name}")]
    if d is Delivery.RELEASED:
        why = "no longer holds a socket that blocks the port"
        return _done(proc, Fate.RELEASED, before), [Say(f"{proc.label}: {why}; not sent {name}")]
    why = "could not read its fds to confirm it still holds the socket"
    return _done(proc, Fate.UNVERIFIED, before), [Say(f"{proc.label}: {why}; not sent {name}")]


def _exited(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    assert isinstance(event, Exited)
    seconds = event.now - state.started
    if proc.stage is Stage.GRACE:
        return _done(proc, Fate.EXITED, proc.signals, seconds), [
            Say(f"{proc.label}: exited after {seconds:.1f}s")
        ]
    line = f"{proc.label}: killed by SIGKILL after {seconds:.1f}s"
    return _done(proc, Fate.KILLED, proc.signals, seconds), [Say(line)]


def _grace_over(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    if cfg.signal == signal.SIGKILL:
        # Nothing stronger to send: it survived SIGKILL itself.
        return _done(proc, Fate.SURVIVED, proc.signals), []
    return replace(proc, stage=Stage.KILLING), [Signal(proc.pid, signal.SIGKILL)]


def _survived(cfg: Config, state: State, proc: Proc, event: Event) -> Row:
    return _done(proc, Fate.SURVIVED, proc.signals), []


TRANSITIONS: dict[tuple[type, Stage], Handler] = {
    (Pinned, Stage.NEW): _pinned,
    (PinFailed, Stage.NEW): _pin_failed,
    (Begin, Stage.PINNED): _send_first,
    (Begin, Stage.DONE): _unchanged,  # its pin failed
    (Sent, Stage.SIGNALLING): _sent,
    (Sent, Stage.KILLING): _sent,
    (Exited, Stage.GRACE): _exited,
    (Exited, Stage.KILL_WAIT): _exited,
    (WaitOver, Stage.GRACE): _grace_over,
    (WaitOver, Stage.KILL_WAIT): _survived,
    (WaitOver, Stage.DONE): _unchanged,  # exited during the wait, or never signalled
}
