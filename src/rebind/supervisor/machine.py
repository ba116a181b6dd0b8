"""The supervisor's decisions as a pure state machine (in the style of h11): no I/O, no clock.

``step(cfg, state, event) -> (state, actions)``. The caller (``supervisor/run.py``) owns
selectors, signals, fork and /proc; it turns what happens into events (``vocab.py``), feeds them
here, and executes the returned actions in order. Every transition is one row of
:data:`TRANSITIONS`, keyed by (what happened, the role of the generation it concerns, the
supervisor's phase); a missing row is a bug, and the unit tests walk the whole product. A row's
handler gets the generation the event concerns already looked up (``_gen_rows``), or none for
the events about the supervisor as a whole (``_rows``).

Issue 13: the stop signal for a replaced generation (``Config.stop_signal``), a drain phase
(``Config.drain``, :attr:`Role.DRAINING`: stop signal, up to DRAIN seconds to finish, then SIGTERM to
every process of it, then SIGKILL after grace), the outer systemd's protocol (:class:`NotifyOuter`:
READY=1 once the first generation serves, RELOADING=1 + MONOTONIC_USEC at a reload, READY=1 again
with its outcome, STOPPING=1) and :class:`ReloadDone` for metrics.
"""

from __future__ import annotations

import signal
from dataclasses import replace

from rebind.errors import ExitCode
from rebind.supervisor import table
from rebind.supervisor.hints import ADDR_IN_USE_SEEN as ADDR_IN_USE_SEEN
from rebind.supervisor.hints import BINDS_ITSELF_HINT as BINDS_ITSELF_HINT
from rebind.supervisor.hints import STABLE_AFTER as STABLE_AFTER
from rebind.supervisor.hints import timer_events as timer_events
from rebind.supervisor.table import Rows
from rebind.supervisor.vocab import EVENTS as EVENTS
from rebind.supervisor.vocab import NUMBERED as NUMBERED
from rebind.supervisor.vocab import Action as Action
from rebind.supervisor.vocab import Boot as Boot
from rebind.supervisor.vocab import Config as Config
from rebind.supervisor.vocab import Emptied as Emptied
from rebind.supervisor.vocab import Event as Event
from rebind.supervisor.vocab import Exited as Exited
from rebind.supervisor.vocab import Finish as Finish
from rebind.supervisor.vocab import Forget as Forget
from rebind.supervisor.vocab import Forward as Forward
from rebind.supervisor.vocab import Gen as Gen
from rebind.supervisor.vocab import GraceOver as GraceOver
from rebind.supervisor.vocab import Log as Log
from rebind.supervisor.vocab import Notified as Notified
from rebind.supervisor.vocab import NotifyOuter as NotifyOuter
from rebind.supervisor.vocab import Phase as Phase
from rebind.supervisor.vocab import Ready as Ready
from rebind.supervisor.vocab import ReadyTimeout as ReadyTimeout
from rebind.supervisor.vocab import Reload as Reload
from rebind.supervisor.vocab import ReloadDone as ReloadDone
from rebind.supervisor.vocab import Reply as Reply
from rebind.supervisor.vocab import RestartDue as RestartDue
from rebind.supervisor.vocab import RestartPolicy as RestartPolicy
from rebind.supervisor.vocab import Role as Role
from rebind.supervisor.vocab import ScanNow as ScanNow
from rebind.supervisor.vocab import SignalLeader as SignalLeader
from rebind.supervisor.vocab import SignalRest as SignalRest
from rebind.supervisor.vocab import Spawn as Spawn
from rebind.supervisor.vocab import Spawned as Spawned
from rebind.supervisor.vocab import SpawnFailed as SpawnFailed
from rebind.supervisor.vocab import State as State
from rebind.supervisor.vocab import Stop as Stop

# -- building blocks ----------------------------------------------------------------------------------

Result = table.Result
Handler = table.Handler


def _name(n: int) -> str:
    return f"generation {n}"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _set(state: State, gen: Gen) -> State:
    return replace(state, gens=tuple(gen if g.number == gen.number else g for g in state.gens))


def _drop(state: State, number: int) -> State:
    return replace(state, gens=tuple(g for g in state.gens if g.number != number))


def _spawn(state: State, why: str, waiters: tuple[int, ...], now: float, reload: bool = False) -> Result:
    n = state.next_number
    gen = Gen(n, Role.STARTING, now, waiters=waiters, reload=reload)
    state = replace(state, gens=(*state.gens, gen), next_number=n + 1, restart_at=None)
    return state, [Spawn(n, why)]


def _spawn_queued(state: State, acts: list[Action], now: float) -> Result:
    """A reload asked for while another generation was starting: its turn has come."""
    if state.queued is None:
        return state, acts
    state, more = _spawn(replace(state, queued=None), "queued reload", state.queued, now, reload=True)
    return state, acts + more


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


def _reloading(state: State, acts: list[Action], now: float) -> Result:
    """Type=notify-reload: systemd waits for RELOADING=1 stamped with CLOCK_MONOTONIC (our clock:
    time.monotonic()) after its SIGHUP, then for READY=1 (_outer_settled). One per reload, even
    one queued behind a crash restart."""
    if state.reloading:
        return state, acts
    note = NotifyOuter(f"RELOADING=1\nMONOTONIC_USEC={int(now * 1_000_000)}")
    return replace(state, reloading=True), [note, *acts]


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
    failed: Gen,
    reason: str,
    now: float,
    code: int | None = None,
) -> Result:
    """A new generation failed (did not start, exited or timed out before ready)."""
    serving = state.serving
    full = reason + (f"; still serving: {_name(serving.number)}" if serving else "")
    # ReloadDone before Reply: whoever asked for the reload may read the metrics at once.
    if failed.reload:
        acts.append(ReloadDone(failed.number, False, now - failed.started, full))
    if failed.waiters:
        acts.append(Reply(failed.waiters, f"failed: {full}"))
    if state.phase is not Phase.RUNNING:
        return state, acts
    if not state.ever_ready:
        return _never_ready(state, acts, reason, code)
    if state.queued is not None:
        return _spawn_queued(state, acts, now)
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


def _leader_gone(cfg: Config, state: State, gen: Gen, ev: Exited) -> Result:
    """The old generation is everything it started: what outlives its leader gets SIGTERM now
    and SIGKILL after grace (a `sh -c` wrapper or a pre-fork parent exits at once on SIGTERM,
    and its orphans re-parent to us and would keep serving old code)."""
    if not ev.remaining:
        return _drop(state, gen.number), [Forget(gen.number)]
    state = _set(state, replace(gen, role=Role.LINGERING, deadline=ev.now + cfg.grace, waiters=()))
    line = f"{_name(gen.number)}: processes outlived its leader: SIGTERM, SIGKILL after {cfg.grace:g}s"
    return state, [Log(line), SignalRest(gen.number, cfg.stop_signal)]


# -- handlers: one per kind of row; those about a generation get it looked up -------------------------


def _ignore(cfg: Config, state: State, ev: Event) -> Result:
    return state, []


def _boot(cfg: Config, state: State, ev: Boot) -> Result:
    return _spawn(state, "start", (), ev.now)


def _spawned(cfg: Config, state: State, ev: Spawned, gen: Gen) -> Result:
    gen = replace(gen, started=ev.now, deadline=ev.now + cfg.ready_timeout)
    state = _set(state, gen)
    if cfg.ready_on_spawn:
        return _ready(cfg, state, Ready(gen.number, "exec succeeded (--ready none)", ev.now), gen)
    return state, []


def _spawned_while_stopping(cfg: Config, state: State, ev: Spawned, gen: Gen) -> Result:
    # Cannot happen (spawn is synchronous and only RUNNING spawns); stop it if it ever does.
    return _stop_gen(cfg, state, gen, "shutting down", cfg.stop_signal, ev.now)


def _spawn_failed(cfg: Config, state: State, ev: SpawnFailed, gen: Gen) -> Result:
    state = _drop(state, ev.number)
    reason = f"{_name(ev.number)} did not start: {ev.reason}"
    state, acts = _after_failure(cfg, state, [Log(reason)], gen, reason, ev.now, ev.code)
    return _settle(state, acts)


def _ready(cfg: Config, state: State, ev: Ready, gen: Gen) -> Result:
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
    state, acts = _spawn_queued(state, acts, ev.now)
    return _outer_settled(state, acts, f"serving: {_name(gen.number)}")


def _notified(cfg: Config, state: State, ev: Notified, gen: Gen) -> Result:
    if cfg.ready_on_notify:
        return _ready(cfg, state, Ready(gen.number, f"READY=1 from pid {ev.pid}", ev.now), gen)
    # auto: READY=1 from a pre-fork parent comes before its workers serve (gunicorn's arbiter,
    # issue 13); look now, and keep looking until a process of the tree really serves every socket.
    line = f"READY=1 from pid {ev.pid} ({_name(gen.number)}); waiting until it serves"
    return state, [Log(line), ScanNow(gen.number)]


def _exited_starting(cfg: Config, state: State, ev: Exited, gen: Gen) -> Result:
    state, acts = _leader_gone(cfg, state, gen, ev)
    reason = f"{_name(gen.number)} exited with status {ev.code} before it was ready"
    acts.append(Log(reason))
    if ev.addr_in_use:
        acts.append(Log(ADDR_IN_USE_SEEN))
        reason += " (Address already in use: it ignores LISTEN_FDS)"
    elif ev.code != 0 and not state.ever_ready:
        # The usual first failure under rebind run: the app binds the port itself, and the
        # kernel refuses because our socket holds it. Said for sure (ev.addr_in_use) when the
        # tee saw the error in the app's stderr; here only as a possibility.
        acts.append(Log(BINDS_ITSELF_HINT))
    state, acts = _after_failure(cfg, state, acts, gen, reason, ev.now, ev.code)
    return _settle(state, acts)


def _exited_serving(cfg: Config, state: State, ev: Exited, gen: Gen) -> Result:
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


def _exited_stopping(cfg: Config, state: State, ev: Exited, gen: Gen) -> Result:
    if state.phase is Phase.STOPPING and state.final_from == gen.number:
        # Dying of the very signal we forwarded is a clean stop, as systemd counts SIGTERM for a
        # main process (SuccessExitStatus): `rebind run` exits 0, not 143.
        clean = state.stopped_by is not None and ev.code == 128 + state.stopped_by
        state = replace(state, final=0 if clean else ev.code)
    state, acts = _leader_gone(cfg, state, gen, ev)
    acts.insert(0, Log(f"{_name(gen.number)} exited with status {ev.code} ({gen.role.value})"))
    return _settle(state, acts)


def _emptied(cfg: Config, state: State, ev: Emptied, gen: Gen) -> Result:
    return _settle(_drop(state, ev.number), [Forget(ev.number)])


def _grace_over_stopping(cfg: Config, state: State, ev: GraceOver, gen: Gen) -> Result:
    line = f"{_name(gen.number)} still running after {cfg.grace:g}s: SIGKILL to all its processes"
    return _set(state, replace(gen, deadline=None)), [Log(line), SignalRest(gen.number, signal.SIGKILL)]


def _drain_over(cfg: Config, state: State, ev: GraceOver, gen: Gen) -> Result:
    state = _set(state, replace(gen, role=Role.STOPPING, deadline=ev.now + cfg.grace))
    line = f"{_name(gen.number)} still running after draining {cfg.drain:g}s: SIGTERM to all of it, "
    line += f"SIGKILL after {cfg.grace:g}s"
    return state, [Log(line), SignalRest(gen.number, signal.SIGTERM)]


def _grace_over_lingering(cfg: Config, state: State, ev: GraceOver, gen: Gen) -> Result:
    state = _drop(state, ev.number)
    line = f"{_name(ev.number)}: SIGKILL to what is left of it"
    return _settle(state, [Log(line), SignalRest(ev.number, signal.SIGKILL), Forget(ev.number)])


def _ready_timeout(cfg: Config, state: State, ev: ReadyTimeout, gen: Gen) -> Result:
    reason = f"{_name(gen.number)} did not become ready within {cfg.ready_timeout:g}s"
    quiet = replace(gen, waiters=())  # _after_failure answers them, with the reason
    state, acts = _stop_gen(cfg, state, quiet, "not ready in time", cfg.stop_signal, ev.now)
    acts.insert(0, Log(reason))
    return _after_failure(cfg, state, acts, gen, reason, ev.now, None)


def _restart_due(cfg: Config, state: State, ev: RestartDue) -> Result:
    if state.phase is not Phase.RUNNING or state.restart_at is None:
        return replace(state, restart_at=None), []
    queued = state.queued or ()
    return _spawn(replace(state, queued=None), "restart after crash", queued, ev.now)


def _reload(cfg: Config, state: State, ev: Reload) -> Result:
    waiters = (ev.waiter,) if ev.waiter is not None else ()
    if state.phase is not Phase.RUNNING:
        return state, [Reply(waiters, "failed: shutting down")] if waiters else []
    starting = state.starting
    if starting is not None:
        # Code may have changed after the starting generation loaded it: run one more after it.
        state = replace(state, queued=(*(state.queued or ()), *waiters))
        return _reloading(state, [Log(f"reload queued behind {_name(starting.number)}")], ev.now)
    state, acts = _spawn(state, "reload", waiters, ev.now, reload=True)
    return _reloading(state, acts, ev.now)


def _stop(cfg: Config, state: State, ev: Stop) -> Result:
    name = _signame(ev.sig)
    target = state.serving or state.starting
    acts: list[Action] = [Log(f"{name}: stopping"), NotifyOuter("STOPPING=1")]
    final, final_from = (None, target.number) if target else (128 + ev.sig, None)
    state = replace(state, final=final, final_from=final_from, stopped_by=ev.sig)
    state, more = _stop_all(cfg, state, ev.sig, f"{name} forwarded", ev.now)
    return _settle(state, acts + more)


def _stop_again(cfg: Config, state: State, ev: Stop) -> Result:
    acts: list[Action] = [Log(f"{_signame(ev.sig)} again: SIGKILL to every generation")]
    acts += [SignalRest(g.number, signal.SIGKILL) for g in state.gens]
    return state, acts


def _forward(cfg: Config, state: State, ev: Forward) -> Result:
    target = state.serving or state.starting
    return state, [SignalLeader(target.number, ev.sig)] if target else []


# -- the table ------------------------------------------------------------------------------------------

TRANSITIONS: dict[tuple[type, Role, Phase], Handler] = {}
_T = Rows(TRANSITIONS)
_add, _gen_rows, _rows = _T.add, _T.gen_rows, _T.whole

R, P = Role, Phase
_RS = (P.RUNNING, P.STOPPING)
_NOT_STARTING = (R.SERVING, R.DRAINING, R.STOPPING, R.LINGERING, R.NONE)
# fmt: off
_rows(Boot,             (P.RUNNING,),                                   _boot)
_add(Boot,              (R.NONE,),                 (P.STOPPING,),       _ignore)
_gen_rows(Spawned,      (R.STARTING,),             (P.RUNNING,),        _spawned)
_gen_rows(Spawned,      (R.STARTING,),             (P.STOPPING,),       _spawned_while_stopping)
_gen_rows(SpawnFailed,  (R.STARTING, R.STOPPING),  _RS,                 _spawn_failed)
_gen_rows(Ready,        (R.STARTING,),             (P.RUNNING,),        _ready)
_add(Ready,             (R.STARTING,),             (P.STOPPING,),       _ignore)  # already told to stop
_gen_rows(Notified,     (R.STARTING,),             (P.RUNNING,),        _notified)
_add(Notified,          (R.STARTING,),             (P.STOPPING,),       _ignore)
_gen_rows(Exited,       (R.STARTING,),             _RS,                 _exited_starting)
_gen_rows(Exited,       (R.SERVING,),              (P.RUNNING,),        _exited_serving)
_gen_rows(Exited,       (R.SERVING,),              (P.STOPPING,),       _exited_stopping)
_gen_rows(Exited,       (R.DRAINING, R.STOPPING),  _RS,                 _exited_stopping)
_add(Exited,            (R.LINGERING, R.NONE),     _RS,                 _ignore)  # leader already reaped
_gen_rows(Emptied,      (R.LINGERING,),            _RS,                 _emptied)
_gen_rows(ReadyTimeout, (R.STARTING,),             (P.RUNNING,),        _ready_timeout)
_add(ReadyTimeout,      (R.STARTING,),             (P.STOPPING,),       _ignore)
_gen_rows(GraceOver,    (R.STOPPING,),             _RS,                 _grace_over_stopping)
_gen_rows(GraceOver,    (R.DRAINING,),             _RS,                 _drain_over)
_gen_rows(GraceOver,    (R.LINGERING,),            _RS,                 _grace_over_lingering)
_rows(RestartDue,       _RS,                                            _restart_due)
_rows(Reload,           _RS,                                            _reload)
_rows(Stop,             (P.RUNNING,),                                   _stop)
_rows(Stop,             (P.STOPPING,),                                  _stop_again)
_rows(Forward,          _RS,                                            _forward)
# Events about a generation in a role they do not concern (a late Ready, a stale timer): nothing.
_add(Spawned,           _NOT_STARTING,                                 _RS, _ignore)
_add(SpawnFailed,       (R.SERVING, R.DRAINING, R.LINGERING, R.NONE),  _RS, _ignore)
_add(Ready,             _NOT_STARTING,                                 _RS, _ignore)
_add(Notified,          _NOT_STARTING,                                 _RS, _ignore)  # the serving one's
_add(Emptied,           (R.STARTING, R.SERVING, R.DRAINING, R.STOPPING, R.NONE), _RS, _ignore)
_add(ReadyTimeout,      _NOT_STARTING,                                 _RS, _ignore)
_add(GraceOver,         (R.STARTING, R.SERVING, R.NONE),               _RS, _ignore)
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
