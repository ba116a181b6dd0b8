"""The supervisor's decisions as a pure state machine (in the style of h11): no I/O, no clock.

``step(state, event) -> (state, actions)``. The caller (``supervisor/run.py``) owns selectors,
signals, fork and /proc; it turns what happens into :class:`Event` values, feeds them here, and
executes the returned :class:`Action` values in order. Every transition is one row of
:data:`TRANSITIONS`, keyed by (what happened, the role of the generation it concerns, the
supervisor's phase); a missing row is a bug, and the unit tests walk the whole product.

Issue 13: the stop signal for a replaced generation (``Config.stop_signal``), a drain phase
(``Config.drain``, :attr:`Role.DRAINING`: stop signal, up to DRAIN seconds to finish, then SIGTERM to
every process of it, then SIGKILL after grace), the outer systemd's protocol (:class:`NotifyOuter`:
READY=1 once the first generation serves, RELOADING=1 + MONOTONIC_USEC at a reload, READY=1 again
with its outcome, STOPPING=1) and :class:`ReloadDone` for metrics.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeAlias

from rebind.errors import ExitCode

STABLE_AFTER = 10.0  # a generation that served this long resets the crash backoff
BINDS_ITSELF_HINT = (
    "if it failed with 'Address already in use' (Errno 98), it binds the port itself instead of "
    "using the socket rebind holds for it: make it take fd 3 (LISTEN_FDS, e.g. rebind.listen(), "
    "uvicorn --fd 3)"
)

ADDR_IN_USE_SEEN = (
    "its stderr says 'Address already in use': the server ignores LISTEN_FDS and binds the port "
    "itself, which rebind already holds; run it with its recipe (docs/supervisor.md: uvicorn --fd 3, "
    "gunicorn reads LISTEN_FDS, nginx with NGINX='3;' and --stop-signal QUIT, granian via a wrapper)"
)


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


# -- events: what happened --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot:
    now: float


@dataclass(frozen=True, slots=True)
class Spawned:
    number: int
    now: float


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
class Exited:
    """The generation's leader was reaped; ``remaining``: other processes of it still run."""

    number: int
    code: int
    remaining: bool
    now: float
    addr_in_use: bool = False  # its stderr said "Address already in use" (run.py explained it)


@dataclass(frozen=True, slots=True)
class Emptied:
    """No process of a lingering generation is left."""

    number: int
    now: float


@dataclass(frozen=True, slots=True)
class ReadyTimeout:
    number: int
    now: float


@dataclass(frozen=True, slots=True)
class GraceOver:
    number: int
    now: float


@dataclass(frozen=True, slots=True)
class RestartDue:
    now: float


@dataclass(frozen=True, slots=True)
class Reload:
    waiter: int | None  # None: SIGHUP (nobody waits for the answer)
    now: float


@dataclass(frozen=True, slots=True)
class Stop:
    sig: int
    now: float


@dataclass(frozen=True, slots=True)
class Forward:
    sig: int
    now: float


Event: TypeAlias = (
    Boot
    | Spawned
    | SpawnFailed
    | Ready
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


# -- actions: what the caller must do, in order ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    number: int
    why: str


@dataclass(frozen=True, slots=True)
class SignalLeader:
    number: int
    sig: int


@dataclass(frozen=True, slots=True)
class SignalRest:
    """Send SIG to every process of the generation (its group, its tree, orphans re-parented to us)."""

    number: int
    sig: int


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
    Spawn | SignalLeader | SignalRest | Forget | Reply | Log | NotifyOuter | ReloadDone | Finish
)


def timer_events(state: State, now: float) -> list[Event]:
    """The timer events that are due at NOW (the caller feeds them to :func:`step`)."""
    out: list[Event] = []
    for g in state.gens:
        if g.deadline is None or now < g.deadline:
            continue
        if g.role is Role.STARTING:
            out.append(ReadyTimeout(g.number, now))
        elif g.role in (Role.STOPPING, Role.LINGERING, Role.DRAINING):
            out.append(GraceOver(g.number, now))
    if state.restart_at is not None and now >= state.restart_at:
        out.append(RestartDue(now))
    return out


# -- transitions --------------------------------------------------------------------------------------

Result: TypeAlias = tuple[State, list[Action]]
Handler: TypeAlias = Callable[[Config, State, Event], Result]


def _name(n: int) -> str:
    return f"generation {n}"


def _set(state: State, gen: Gen) -> State:
    return replace(state, gens=tuple(gen if g.number == gen.number else g for g in state.gens))


def _drop(state: State, number: int) -> State:
    return replace(state, gens=tuple(g for g in state.gens if g.number != number))


def _spawn(state: State, why: str, waiters: tuple[int, ...], now: float, reload: bool = False) -> Result:
    n = state.next_number
    gen = Gen(n, Role.STARTING, now, waiters=waiters, reload=reload)
    state = replace(state, gens=(*state.gens, gen), next_number=n + 1, restart_at=None)
    return state, [Spawn(n, why)]


def _stop_gen(cfg: Config, state: State, gen: Gen, why: str, sig: int, now: float) -> Result:
    """Leader gets SIG, SIGKILL after grace; waiters learn it never became ready."""
    acts: list[Action] = [
        Log(f"{_name(gen.number)} stopping ({why}): {_signame(sig)}, SIGKILL after {cfg.grace:g}s")
    ]
    if gen.waiters:
        acts.append(
            Reply(gen.waiters, f"failed: {_name(gen.number)} was stopped before it was ready ({why})")
        )
    state = _set(state, replace(gen, role=Role.STOPPING, deadline=now + cfg.grace, waiters=()))
    return state, [*acts, SignalLeader(gen.number, sig)]


def _drain_gen(cfg: Config, state: State, gen: Gen, why: str, now: float) -> Result:
    """--drain: the stop signal (a graceful server stops accepting and finishes what it has), up
    to DRAIN seconds for that, then SIGTERM to every process of it and SIGKILL after grace."""
    sig = _signame(cfg.stop_signal)
    line = f"{_name(gen.number)} draining ({why}): {sig}, SIGTERM to all of it after {cfg.drain:g}s"
    state = _set(state, replace(gen, role=Role.DRAINING, deadline=now + cfg.drain, waiters=()))
    return state, [Log(line), SignalLeader(gen.number, cfg.stop_signal)]


def _outer_settled(state: State, acts: list[Action], status: str) -> Result:
    """systemd's notify-reload: RELOADING=1 is answered by one READY=1 once nothing is pending
    (a queued reload keeps it open), with STATUS= telling how it went."""
    if not state.reloading or state.starting is not None or state.queued is not None:
        return state, acts
    return replace(state, reloading=False), [*acts, NotifyOuter(f"READY=1\nSTATUS={status}")]


def _finish(state: State, code: int) -> State:
    return replace(state, phase=Phase.STOPPING, final=code, restart_at=None)


def _stop_all(cfg: Config, state: State, sig: int, why: str, now: float) -> Result:
    acts: list[Action] = []
    if state.queued:
        acts.append(Reply(state.queued, "failed: shutting down"))
    state = replace(state, queued=None, restart_at=None, phase=Phase.STOPPING)
    for g in state.gens:
        if g.role in (Role.STARTING, Role.SERVING, Role.DRAINING):
            state, more = _stop_gen(cfg, state, g, why, sig, now)
            acts += more
    return state, acts


def _settle(state: State, acts: list[Action]) -> Result:
    """Once stopping and every generation is gone, we are done."""
    if state.phase is Phase.STOPPING and not state.gens:
        code = state.final if state.final is not None else 0
        return replace(state, phase=Phase.DONE), [*acts, Finish(code)]
    return state, acts


def _never_ready(state: State, acts: list[Action], reason: str, code: int | None) -> Result:
    """The one decision for "the first generation never became ready": stop, with the app's own
    failure status if it exited non-zero, else 1 (a timeout, or an exit 0 that never served)."""
    status = code if code else int(ExitCode.NO_MATCH)
    acts.append(Log(f"the first generation never became ready ({reason}): exiting with status {status}"))
    return _finish(state, status), acts


def _after_failure(
    cfg: Config,
    state: State,
    acts: list[Action],
    waiters: tuple[int, ...],
    reason: str,
    now: float,
    code: int | None = None,
    failed: Gen | None = None,
) -> Result:
    """A new generation failed (did not start, exited or timed out before ready)."""
    serving = state.serving
    full = reason + (f"; still serving: {_name(serving.number)}" if serving else "")
    # ReloadDone before Reply: whoever asked for the reload may read the metrics at once.
    if failed is not None and failed.reload:
        acts.append(ReloadDone(failed.number, False, now - failed.started, full))
    if waiters:
        acts.append(Reply(waiters, f"failed: {full}"))
    if state.phase is not Phase.RUNNING:
        return state, acts
    if not state.ever_ready:
        return _never_ready(state, acts, reason, code)
    if state.queued is not None:
        queued = state.queued
        state = replace(state, queued=None)
        state, more = _spawn(state, "queued reload", queued, now, reload=True)
        return state, acts + more
    state, acts = _outer_settled(state, acts, f"reload failed: {full}")
    if serving is None and state.starting is None:
        return _schedule_restart(cfg, state, acts, None, now)
    return state, acts


def _schedule_restart(
    cfg: Config, state: State, acts: list[Action], crashed: Gen | None, now: float
) -> Result:
    crashes = state.crashes
    if crashed is not None and crashed.ready_at is not None and now - crashed.ready_at >= STABLE_AFTER:
        crashes = 0
    delay = min(cfg.backoff_max, cfg.backoff_initial * 2**crashes)
    crashes += 1
    acts.append(Log(f"restarting in {delay:.2f}s (failure {crashes} in a row)"))
    return replace(state, crashes=crashes, restart_at=now + delay), acts


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# Boot / Spawned / SpawnFailed


def _boot(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Boot)
    return _spawn(state, "start", (), ev.now)


def _spawned(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Spawned)
    gen = state.gen(ev.number)
    assert gen is not None
    gen = replace(gen, started=ev.now, deadline=ev.now + cfg.ready_timeout)
    state = _set(state, gen)
    acts: list[Action] = []
    if cfg.ready_on_spawn:
        state, more = _ready(cfg, state, Ready(gen.number, "exec succeeded (--ready none)", ev.now))
        acts += more
    return state, acts


def _spawned_while_stopping(cfg: Config, state: State, ev: Event) -> Result:
    # Cannot happen (spawn is synchronous and only RUNNING spawns); stop it if it ever does.
    assert isinstance(ev, Spawned)
    gen = state.gen(ev.number)
    assert gen is not None
    return _stop_gen(cfg, state, gen, "shutting down", cfg.stop_signal, ev.now)


def _spawn_failed(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, SpawnFailed)
    gen = state.gen(ev.number)
    assert gen is not None
    state = _drop(state, ev.number)
    reason = f"{_name(ev.number)} did not start: {ev.reason}"
    state, acts = _after_failure(cfg, state, [Log(reason)], gen.waiters, reason, ev.now, ev.code, gen)
    return _settle(state, acts)


# Ready


def _ready(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Ready)
    gen = state.gen(ev.number)
    assert gen is not None
    took = f"{ev.now - gen.started:.3f}s"
    acts: list[Action] = [Log(f"{_name(gen.number)} ready after {took}: {ev.how}")]
    old = state.serving
    first = not state.ever_ready
    state = _set(state, replace(gen, role=Role.SERVING, ready_at=ev.now, deadline=None, waiters=()))
    state = replace(state, ever_ready=True)
    if first:
        # Type=notify: the service is up once the first generation serves (MAINPID added by run.py).
        acts.append(NotifyOuter(f"READY=1\nSTATUS=serving: {_name(gen.number)}"))
    if old is not None:
        why = f"replaced by {_name(gen.number)}"
        if cfg.drain > 0:
            state, more = _drain_gen(cfg, state, old, why, ev.now)
        else:
            state, more = _stop_gen(cfg, state, old, why, cfg.stop_signal, ev.now)
        acts += more
    if gen.reload:  # before Reply, as in _after_failure
        acts.append(ReloadDone(gen.number, True, ev.now - gen.started, ev.how))
    if gen.waiters:
        acts.append(Reply(gen.waiters, f"ok: {_name(gen.number)} ready after {took} ({ev.how})"))
    if state.queued is not None:
        queued = state.queued
        state = replace(state, queued=None)
        state, more = _spawn(state, "queued reload", queued, ev.now, reload=True)
        acts += more
    return _outer_settled(state, acts, f"serving: {_name(gen.number)}")


def _ignore(cfg: Config, state: State, ev: Event) -> Result:
    return state, []


# Exited


def _exited_starting(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Exited)
    gen = state.gen(ev.number)
    assert gen is not None
    state, acts = _leader_gone(cfg, state, gen, ev)
    reason = f"{_name(gen.number)} exited with status {ev.code} before it was ready"
    acts.append(Log(reason))
    if ev.addr_in_use:
        acts.append(Log(ADDR_IN_USE_SEEN))
        reason += " (Address already in use: it ignores LISTEN_FDS)"
    elif ev.code != 0 and not state.ever_ready:
        # The usual first failure under rebind run: the app binds the port itself, and the
        # kernel refuses because our socket holds it. Said for sure (ev.addr_in_use) by run.py
        # when it saw the error in the app's stderr; here only as a possibility.
        acts.append(Log(BINDS_ITSELF_HINT))
    state, acts = _after_failure(cfg, state, acts, gen.waiters, reason, ev.now, ev.code, gen)
    return _settle(state, acts)


def _exited_serving(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Exited)
    gen = state.gen(ev.number)
    assert gen is not None
    state, acts = _leader_gone(cfg, state, gen, ev)
    acts.append(Log(f"{_name(gen.number)} exited with status {ev.code} while serving"))
    if cfg.restart is RestartPolicy.NO or (cfg.restart is RestartPolicy.ON_FAILURE and ev.code == 0):
        state = _finish(state, ev.code)
        acts.append(NotifyOuter("STOPPING=1"))
        starting = state.starting
        if starting is not None:
            state, more = _stop_gen(cfg, state, starting, "supervisor exiting", cfg.stop_signal, ev.now)
            acts += more
        if state.queued:
            acts.append(Reply(state.queued, "failed: shutting down"))
            state = replace(state, queued=None)
        return _settle(state, acts)
    if state.starting is None:
        state, acts = _schedule_restart(cfg, state, acts, gen, ev.now)
    return state, acts


def _exited_stopping(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Exited)
    gen = state.gen(ev.number)
    assert gen is not None
    if state.phase is Phase.STOPPING and state.final_from == gen.number:
        # Dying of the very signal we forwarded is a clean stop, as systemd counts SIGTERM for a
        # main process (SuccessExitStatus): `rebind run` exits 0, not 143.
        clean = state.stopped_by is not None and ev.code == 128 + state.stopped_by
        state = replace(state, final=0 if clean else ev.code)
    state, acts = _leader_gone(cfg, state, gen, ev)
    acts.insert(0, Log(f"{_name(gen.number)} exited with status {ev.code} ({gen.role.value})"))
    return _settle(state, acts)


def _leader_gone(cfg: Config, state: State, gen: Gen, ev: Exited) -> Result:
    """The old generation is everything it started: what outlives its leader gets SIGTERM now
    and SIGKILL after grace (a `sh -c` wrapper or a pre-fork parent exits at once on SIGTERM,
    and its orphans re-parent to us and would keep serving old code)."""
    if not ev.remaining:
        return _drop(state, gen.number), [Forget(gen.number)]
    state = _set(state, replace(gen, role=Role.LINGERING, deadline=ev.now + cfg.grace, waiters=()))
    line = f"{_name(gen.number)}: processes outlived its leader: SIGTERM, SIGKILL after {cfg.grace:g}s"
    return state, [Log(line), SignalRest(gen.number, cfg.stop_signal)]


# Emptied / GraceOver / ReadyTimeout / RestartDue


def _emptied(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Emptied)
    return _settle(_drop(state, ev.number), [Forget(ev.number)])


def _grace_over_stopping(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, GraceOver)
    gen = state.gen(ev.number)
    assert gen is not None
    state = _set(state, replace(gen, deadline=None))
    line = f"{_name(gen.number)} still running after {cfg.grace:g}s: SIGKILL to all its processes"
    return state, [Log(line), SignalRest(gen.number, signal.SIGKILL)]


def _drain_over(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, GraceOver)
    gen = state.gen(ev.number)
    assert gen is not None
    state = _set(state, replace(gen, role=Role.STOPPING, deadline=ev.now + cfg.grace))
    line = f"{_name(gen.number)} still running after draining {cfg.drain:g}s: SIGTERM to all of it, "
    line += f"SIGKILL after {cfg.grace:g}s"
    return state, [Log(line), SignalRest(gen.number, signal.SIGTERM)]


def _grace_over_lingering(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, GraceOver)
    state = _drop(state, ev.number)
    line = f"{_name(ev.number)}: SIGKILL to what is left of it"
    return _settle(state, [Log(line), SignalRest(ev.number, signal.SIGKILL), Forget(ev.number)])


def _ready_timeout(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, ReadyTimeout)
    gen = state.gen(ev.number)
    assert gen is not None
    reason = f"{_name(gen.number)} did not become ready within {cfg.ready_timeout:g}s"
    waiters = gen.waiters
    state, acts = _stop_gen(
        cfg, state, replace(gen, waiters=()), "not ready in time", cfg.stop_signal, ev.now
    )
    acts.insert(0, Log(reason))
    return _after_failure(cfg, state, acts, waiters, reason, ev.now, None, gen)


def _restart_due(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, RestartDue)
    if state.phase is not Phase.RUNNING or state.restart_at is None:
        return replace(state, restart_at=None), []
    queued = state.queued or ()
    return _spawn(replace(state, queued=None), "restart after crash", queued, ev.now)


# Reload / Stop / Forward


def _reload(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Reload)
    waiters = (ev.waiter,) if ev.waiter is not None else ()
    if state.phase is not Phase.RUNNING:
        return state, [Reply(waiters, "failed: shutting down")] if waiters else []
    starting = state.starting
    if starting is not None:
        # Code may have changed after the starting generation loaded it: run one more after it.
        state = replace(state, queued=(*(state.queued or ()), *waiters))
        acts: list[Action] = [Log(f"reload queued behind {_name(starting.number)}")]
        if not state.reloading:  # queued behind a crash restart: still one RELOADING=1 per reload
            acts.insert(0, NotifyOuter(f"RELOADING=1\nMONOTONIC_USEC={int(ev.now * 1_000_000)}"))
            state = replace(state, reloading=True)
        return state, acts
    state, acts = _spawn(state, "reload", waiters, ev.now, reload=True)
    if not state.reloading:
        # Type=notify-reload: systemd waits for RELOADING=1 stamped with CLOCK_MONOTONIC (our
        # clock: time.monotonic()) after its SIGHUP, then for READY=1 (_outer_settled).
        acts.insert(0, NotifyOuter(f"RELOADING=1\nMONOTONIC_USEC={int(ev.now * 1_000_000)}"))
        state = replace(state, reloading=True)
    return state, acts


def _stop(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Stop)
    name = _signame(ev.sig)
    target = state.serving or state.starting
    acts: list[Action] = [Log(f"{name}: stopping"), NotifyOuter("STOPPING=1")]
    final, final_from = (None, target.number) if target else (128 + ev.sig, None)
    state = replace(state, final=final, final_from=final_from, stopped_by=ev.sig)
    state, more = _stop_all(cfg, state, ev.sig, f"{name} forwarded", ev.now)
    return _settle(state, acts + more)


def _stop_again(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Stop)
    acts: list[Action] = [Log(f"{_signame(ev.sig)} again: SIGKILL to every generation")]
    acts += [SignalRest(g.number, signal.SIGKILL) for g in state.gens]
    return state, acts


def _forward(cfg: Config, state: State, ev: Event) -> Result:
    assert isinstance(ev, Forward)
    target = state.serving or state.starting
    return state, [SignalLeader(target.number, ev.sig)] if target else []


# -- the table ------------------------------------------------------------------------------------------

R, P = Role, Phase
_LIVE = (R.STARTING, R.SERVING, R.DRAINING, R.STOPPING, R.LINGERING)
_ALL = (*_LIVE, R.NONE)

TRANSITIONS: dict[tuple[type, Role, Phase], Handler] = {}


def _rows(event: type, roles: tuple[Role, ...], phases: tuple[Phase, ...], handler: Handler) -> None:
    for role in roles:
        for phase in phases:
            key = (event, role, phase)
            assert key not in TRANSITIONS, key
            TRANSITIONS[key] = handler


_RS = (P.RUNNING, P.STOPPING)
# fmt: off
_rows(Boot,         (R.NONE,),                 (P.RUNNING,),  _boot)
_rows(Boot,         (R.NONE,),                 (P.STOPPING,), _ignore)
_rows(Spawned,      (R.STARTING,),             (P.RUNNING,),  _spawned)
_rows(Spawned,      (R.STARTING,),             (P.STOPPING,), _spawned_while_stopping)
_rows(Spawned,      (R.SERVING, R.DRAINING, R.STOPPING, R.LINGERING, R.NONE), _RS, _ignore)
_rows(SpawnFailed,  (R.STARTING, R.STOPPING),  _RS,           _spawn_failed)
_rows(SpawnFailed,  (R.SERVING, R.DRAINING, R.LINGERING, R.NONE), _RS, _ignore)
_rows(Ready,        (R.STARTING,),             (P.RUNNING,),  _ready)
_rows(Ready,        (R.SERVING, R.DRAINING, R.STOPPING, R.LINGERING, R.NONE), _RS, _ignore)
_rows(Ready,        (R.STARTING,),             (P.STOPPING,), _ignore)  # already told to stop
_rows(Exited,       (R.STARTING,),             _RS,           _exited_starting)
_rows(Exited,       (R.SERVING,),              (P.RUNNING,),  _exited_serving)
_rows(Exited,       (R.SERVING,),              (P.STOPPING,), _exited_stopping)
_rows(Exited,       (R.DRAINING, R.STOPPING),  _RS,           _exited_stopping)
_rows(Exited,       (R.LINGERING, R.NONE),     _RS,           _ignore)  # leader already reaped
_rows(Emptied,      (R.LINGERING,),            _RS,           _emptied)
_rows(Emptied,      (R.STARTING, R.SERVING, R.DRAINING, R.STOPPING, R.NONE), _RS, _ignore)
_rows(ReadyTimeout, (R.STARTING,),             (P.RUNNING,),  _ready_timeout)
_rows(ReadyTimeout, (R.SERVING, R.DRAINING, R.STOPPING, R.LINGERING, R.NONE), _RS, _ignore)
_rows(ReadyTimeout, (R.STARTING,),             (P.STOPPING,), _ignore)
_rows(GraceOver,    (R.STOPPING,),             _RS,           _grace_over_stopping)
_rows(GraceOver,    (R.DRAINING,),             _RS,           _drain_over)
_rows(GraceOver,    (R.LINGERING,),            _RS,           _grace_over_lingering)
_rows(GraceOver,    (R.STARTING, R.SERVING, R.NONE), _RS,     _ignore)
_rows(RestartDue,   (R.NONE,),                 _RS,           _restart_due)
_rows(Reload,       (R.NONE,),                 _RS,           _reload)
_rows(Stop,         (R.NONE,),                 (P.RUNNING,),  _stop)
_rows(Stop,         (R.NONE,),                 (P.STOPPING,), _stop_again)
_rows(Forward,      (R.NONE,),                 _RS,           _forward)
# fmt: on


def role_of(state: State, event: Event) -> Role:
    number = getattr(event, "number", None)
    gen = state.gen(number) if number is not None else None
    return gen.role if gen is not None else Role.NONE


def step(cfg: Config, state: State, event: Event) -> Result:
    """One transition. Events after DONE change nothing."""
    if state.phase is Phase.DONE:
        return state, []
    key = (type(event), role_of(state, event), state.phase)
    handler = TRANSITIONS.get(key)
    if handler is None:
        raise AssertionError(f"no transition for {key}")  # a bug: the table must be complete
    return handler(cfg, state, event)


def describe(state: State, name: Callable[[int], str] = _name) -> str:
    """`rebind reload --status`: which generations run, in which role."""
    serving, starting = state.serving, state.starting
    parts = [f"serving: {name(serving.number) if serving else 'none'}"]
    if starting:
        parts.append(f"starting: {name(starting.number)}")
    leaving = (Role.STOPPING, Role.LINGERING, Role.DRAINING)
    stopping = [name(g.number) for g in state.gens if g.role in leaving]
    if stopping:
        parts.append("stopping: " + ", ".join(stopping))
    return "; ".join(parts)
