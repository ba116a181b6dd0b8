"""The supervisor's state machine, without root, processes or a clock."""

from __future__ import annotations

import itertools
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebind.supervisor import machine as m
from rebind.supervisor.machine import Phase, Role

CFG = m.Config(ready_timeout=5.0, grace=2.0, backoff_initial=0.1, backoff_max=1.0)
_NUMBERED = m.NUMBERED


class Run:
    """Feeds events, keeps every action, and executes Spawn the way run.py does (Spawned at once)."""

    def __init__(self, cfg: m.Config = CFG) -> None:
        self.cfg = cfg
        self.state = m.State()
        self.actions: list[m.Action] = []
        self.now = 0.0

    def feed(self, event: m.Event) -> list[m.Action]:
        self.state, acts = m.step(self.cfg, self.state, event)
        out = list(acts)
        for a in acts:
            if isinstance(a, m.Spawn):
                self.state, more = m.step(self.cfg, self.state, m.Spawned(a.number, self.now))
                out += more
        self.actions += out
        return out

    def at(self, t: float) -> Run:
        self.now = t
        return self

    def boot(self) -> list[m.Action]:
        return self.feed(m.Boot(self.now))

    def ready(self, n: int) -> list[m.Action]:
        return self.feed(m.Ready(n, "test", self.now))

    def exited(self, n: int, code: int = 0, remaining: bool = False) -> list[m.Action]:
        return self.feed(m.Exited(n, code, remaining, self.now))

    def reload(self, waiter: int | None = None) -> list[m.Action]:
        return self.feed(m.Reload(waiter, self.now))

    def timers(self) -> list[m.Action]:
        out: list[m.Action] = []
        for ev in m.timer_events(self.state, self.now):
            out += self.feed(ev)
        return out

    def role(self, n: int) -> Role | None:
        g = self.state.gen(n)
        return g.role if g else None

    def serving_one(self) -> Run:
        self.boot()
        self.ready(1)
        return self


def _of(acts: list[m.Action], kind: type) -> list[m.Action]:
    return [a for a in acts if isinstance(a, kind)]


def _replies(acts: list[m.Action]) -> list[tuple[tuple[int, ...], str]]:
    return [(a.waiters, a.line) for a in acts if isinstance(a, m.Reply)]


# -- the table is complete ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.STOPPING])
@pytest.mark.parametrize("event", m.EVENTS, ids=lambda e: e.__name__)
def test_every_event_role_phase_has_exactly_one_row(event: type, phase: Phase) -> None:
    roles = list(Role) if event in _NUMBERED else [Role.NONE]
    for role in roles:
        assert (event, role, phase) in m.TRANSITIONS, (event.__name__, role, phase)


def test_no_row_for_impossible_keys() -> None:
    for event, role, phase in m.TRANSITIONS:
        assert phase is not Phase.DONE
        assert event in _NUMBERED or role is Role.NONE


def test_done_ignores_everything() -> None:
    r = Run().serving_one()
    r.feed(m.Stop(signal.SIGTERM, 0))
    r.exited(1, 0)
    assert r.state.phase is Phase.DONE
    for ev in (m.Boot(1), m.Reload(1, 1), m.Stop(signal.SIGTERM, 1), m.Exited(1, 0, False, 1)):
        assert m.step(CFG, r.state, ev) == (r.state, [])


# -- start and the first generation -----------------------------------------------------------------


def test_boot_spawns_generation_one_with_a_ready_deadline() -> None:
    r = Run()
    acts = r.boot()
    assert _of(acts, m.Spawn) == [m.Spawn(1, "start")]
    g = r.state.gen(1)
    assert g is not None and g.role is Role.STARTING and g.deadline == CFG.ready_timeout


def test_ready_none_is_ready_on_spawn() -> None:
    r = Run(m.Config(ready_on_spawn=True))
    r.boot()
    assert r.role(1) is Role.SERVING and r.state.ever_ready


@pytest.mark.parametrize(
    ("how", "code"),
    [("timeout", 1), ("exit 3", 3), ("exit 0", 1), ("spawn failed", 2)],
)
def test_first_generation_never_ready_is_one_decision(how: str, code: int) -> None:
    r = Run()
    r.boot()
    if how == "timeout":
        r.at(CFG.ready_timeout).timers()
        assert r.role(1) is Role.STOPPING  # stopped, then we wait for it to exit
        r.exited(1, 128 + signal.SIGTERM)
    elif how == "spawn failed":
        r.state = m.State()
        r.state, _ = m.step(CFG, r.state, m.Boot(0))
        r.feed(m.SpawnFailed(1, "cannot run x: Exec format error", 2, 0))
    else:
        r.exited(1, int(how.split()[1]))
    assert r.state.phase is Phase.DONE
    finishes = _of(r.actions, m.Finish)
    assert finishes == [m.Finish(code)]
    decisions = [a for a in r.actions if isinstance(a, m.Log) and "never became ready" in a.line]
    assert len(decisions) == 1
    assert not _of(r.actions, m.Spawn)[1:]  # never restarted


# -- reloads --------------------------------------------------------------------------------------------


def test_reload_replaces_only_once_the_new_one_is_ready() -> None:
    r = Run().serving_one()
    acts = r.reload(7)
    assert _of(acts, m.Spawn) == [m.Spawn(2, "reload")]
    assert r.role(1) is Role.SERVING and r.role(2) is Role.STARTING
    acts = r.ready(2)
    assert r.role(2) is Role.SERVING and r.role(1) is Role.STOPPING
    assert m.SignalLeader(1, signal.SIGTERM) in acts
    assert _replies(acts) == [((7,), "ok: generation 2 ready after 0.000s (test)")]


def test_reload_while_reloading_is_queued_and_runs_after() -> None:
    r = Run().serving_one()
    r.reload(1)
    acts = r.reload(2) + r.reload(3)
    assert not _of(acts, m.Spawn)
    assert r.state.queued == (2, 3)
    acts = r.ready(2)
    assert _of(acts, m.Spawn) == [m.Spawn(3, "queued reload")]
    assert r.state.gen(3) is not None and r.state.gen(3).waiters == (2, 3)  # type: ignore[union-attr]
    acts = r.ready(3)
    assert _replies(acts) == [((2, 3), "ok: generation 3 ready after 0.000s (test)")]


def test_queued_reload_runs_after_the_pending_one_fails() -> None:
    r = Run().serving_one()
    r.reload(1)
    r.reload(2)
    acts = r.exited(2, 3)
    assert _replies(acts)[0][0] == (1,) and "still serving: generation 1" in _replies(acts)[0][1]
    assert _of(acts, m.Spawn) == [m.Spawn(3, "queued reload")]


@pytest.mark.parametrize("failure", ["exit", "timeout", "spawn"])
def test_new_generation_failing_before_ready_keeps_the_old_one(failure: str) -> None:
    r = Run().serving_one()
    r.reload(9)
    if failure == "exit":
        acts = r.exited(2, 3)
        needle = "exited with status 3 before it was ready"
    elif failure == "timeout":
        acts = r.at(CFG.ready_timeout + 1).timers()
        needle = "did not become ready within 5s"
        assert m.SignalLeader(2, signal.SIGTERM) in acts
    else:
        r.state, _ = m.step(CFG, r.state, m.Exited(2, 0, False, 0))  # forget the spawned one
        r.state, acts0 = m.step(CFG, r.state, m.Reload(9, 0))
        acts = acts0 + m.step(CFG, r.state, m.SpawnFailed(3, "cannot run", 2, 0))[1]
        needle = "did not start"
    assert r.state.serving is not None and r.state.serving.number == 1
    replies = _replies(acts)
    assert replies and replies[-1][1].startswith("failed:") and needle in replies[-1][1]
    assert "still serving: generation 1" in replies[-1][1]
    assert not any(isinstance(a, m.SignalLeader) and a.number == 1 for a in acts)
    assert r.state.phase is Phase.RUNNING


# -- crashes ----------------------------------------------------------------------------------------------


def test_crash_of_the_serving_generation_restarts_with_backoff() -> None:
    r = Run().serving_one()
    delays = []
    for _ in range(6):
        t = r.now
        acts = r.exited(r.state.serving.number, 3)  # type: ignore[union-attr]
        assert not _of(acts, m.Spawn)
        assert r.state.restart_at is not None
        delays.append(round(r.state.restart_at - t, 3))
        acts = r.at(r.state.restart_at).timers()
        assert [a.why for a in _of(acts, m.Spawn)] == ["restart after crash"]  # type: ignore[attr-defined]
        r.ready(r.state.starting.number)  # type: ignore[union-attr]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    # Stable long enough: the backoff starts over.
    r.at(r.now + m.STABLE_AFTER)
    r.exited(r.state.serving.number, 3)  # type: ignore[union-attr]
    assert r.state.restart_at == pytest.approx(r.now + 0.1)


def test_crash_during_a_reload_lets_the_new_generation_take_over() -> None:
    r = Run().serving_one()
    r.reload()
    acts = r.exited(1, 3)
    assert not _of(acts, m.Spawn) and r.state.restart_at is None
    r.ready(2)
    assert r.state.serving is not None and r.state.serving.number == 2


@pytest.mark.parametrize(("policy", "code", "restarts"), [("on-failure", 0, False), ("on-failure", 1, True),
                                                          ("always", 0, True), ("no", 1, False)])  # fmt: skip
def test_restart_policy(policy: str, code: int, restarts: bool) -> None:
    r = Run(m.Config(restart=m.RestartPolicy(policy))).serving_one()
    r.exited(1, code)
    if restarts:
        assert r.state.restart_at is not None and r.state.phase is Phase.RUNNING
    else:
        assert r.state.phase is Phase.DONE and _of(r.actions, m.Finish) == [m.Finish(code)]


# -- stopping ----------------------------------------------------------------------------------------------


def test_stop_while_reloading_stops_both_and_exits_with_the_serving_status() -> None:
    r = Run().serving_one()
    r.reload(4)
    acts = r.feed(m.Stop(signal.SIGINT, 0))
    assert m.SignalLeader(1, signal.SIGINT) in acts and m.SignalLeader(2, signal.SIGINT) in acts
    assert any("stopped before it was ready" in line for _, line in _replies(acts))
    r.exited(2, 130)
    assert r.state.phase is Phase.STOPPING
    r.exited(1, 7)
    assert _of(r.actions, m.Finish) == [m.Finish(7)]
    assert not _of(acts, m.Spawn)
    assert r.reload(5) == []  # done: nothing more happens


def test_reload_while_stopping_is_refused() -> None:
    r = Run().serving_one()
    r.feed(m.Stop(signal.SIGTERM, 0))
    assert _replies(r.reload(3)) == [((3,), "failed: shutting down")]


def test_queued_reload_is_answered_on_stop() -> None:
    r = Run().serving_one()
    r.reload(1)
    r.reload(2)
    acts = r.feed(m.Stop(signal.SIGTERM, 0))
    assert ((2,), "failed: shutting down") in _replies(acts)


def test_stop_without_a_generation_exits_128_plus_signal() -> None:
    r = Run().serving_one()
    r.exited(1, 3)  # crashed, restart pending
    r.feed(m.Stop(signal.SIGTERM, 0))
    assert _of(r.actions, m.Finish) == [m.Finish(128 + signal.SIGTERM)]


def test_second_stop_kills_everything() -> None:
    r = Run().serving_one()
    r.reload()
    r.feed(m.Stop(signal.SIGTERM, 0))
    acts = r.feed(m.Stop(signal.SIGTERM, 0))
    assert set(_of(acts, m.SignalRest)) == {m.SignalRest(1, signal.SIGKILL), m.SignalRest(2, signal.SIGKILL)}


def test_forward_goes_to_the_serving_generation_only() -> None:
    r = Run().serving_one()
    r.reload()
    assert r.feed(m.Forward(signal.SIGUSR1, 0)) == [m.SignalLeader(1, signal.SIGUSR1)]


# -- the old generation is everything it started --------------------------------------------------------


def test_what_outlives_the_leader_gets_sigterm_then_sigkill() -> None:
    r = Run().serving_one()
    r.reload()
    r.ready(2)  # generation 1: SIGTERM to its leader
    acts = r.at(0.5).exited(1, 0, remaining=True)  # `sh -c` exits at once, its child does not
    assert acts[-1] == m.SignalRest(1, signal.SIGTERM) and r.role(1) is Role.LINGERING
    assert r.at(2.4).timers() == []
    acts = r.at(2.5).timers()
    assert m.SignalRest(1, signal.SIGKILL) in acts and m.Forget(1) in acts and r.state.gen(1) is None


def test_lingering_generation_that_empties_is_forgotten() -> None:
    r = Run().serving_one()
    r.reload()
    r.ready(2)
    r.exited(1, 0, remaining=True)
    assert r.feed(m.Emptied(1, 0.1)) == [m.Forget(1)]
    assert r.state.gen(1) is None and r.state.next_deadline() is None


def test_grace_over_kills_the_whole_generation() -> None:
    r = Run().serving_one()
    r.reload()
    r.ready(2)
    acts = r.at(CFG.grace).timers()
    assert m.SignalRest(1, signal.SIGKILL) in acts


def test_shutdown_waits_for_lingering_processes() -> None:
    r = Run().serving_one()
    r.feed(m.Stop(signal.SIGTERM, 0))
    r.exited(1, 0, remaining=True)
    assert r.state.phase is Phase.STOPPING
    r.feed(m.Emptied(1, 0.2))
    assert r.state.phase is Phase.DONE and _of(r.actions, m.Finish) == [m.Finish(0)]


def test_status_line() -> None:
    r = Run().serving_one()
    r.reload()
    assert r.state.describe() == "serving: generation 1; starting: generation 2"
    r.ready(2)
    assert r.state.describe() == "serving: generation 2; stopping: generation 1"


# -- any sequence: no crash, invariants hold ------------------------------------------------------------

_event = st.one_of(
    st.builds(m.Reload, st.one_of(st.none(), st.integers(1, 5)), st.just(0.0)),
    st.builds(m.Stop, st.sampled_from([signal.SIGTERM, signal.SIGINT]), st.just(0.0)),
    st.builds(m.Forward, st.just(signal.SIGUSR1), st.just(0.0)),
    st.builds(m.Ready, st.integers(1, 6), st.just("x"), st.just(0.0)),
    st.builds(m.Exited, st.integers(1, 6), st.integers(0, 3), st.booleans(), st.just(0.0)),
    st.builds(m.Emptied, st.integers(1, 6), st.just(0.0)),
    st.just("tick"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, max_size=40))
def test_random_event_sequences_keep_the_invariants(events: list[object]) -> None:
    r = Run()
    r.boot()
    for ev in events:
        r.now += 1.0
        if ev == "tick":
            r.timers()
        elif isinstance(ev, m.Exited | m.Ready | m.Emptied) and r.state.gen(ev.number) is None:
            continue  # run.py only reports events about generations it spawned
        else:
            r.feed(ev)  # type: ignore[arg-type]
        s = r.state
        assert sum(g.role is Role.SERVING for g in s.gens) <= 1
        assert sum(g.role is Role.STARTING for g in s.gens) <= 1
        assert (s.phase is Phase.DONE) == bool(_of(r.actions, m.Finish))
        assert len(_of(r.actions, m.Finish)) <= 1
        if s.phase is Phase.DONE:
            assert not s.gens
        if s.phase is Phase.RUNNING:
            # Always something serving, starting, or a restart scheduled: never idle forever.
            assert s.serving or s.starting or s.restart_at is not None
    # Every waiter is answered at most once.
    answered = [w for a in r.actions if isinstance(a, m.Reply) for w in a.waiters]
    assert len(answered) == len(set(answered)) or len(set(answered)) <= 5


def test_table_keys_cover_the_product_for_numbered_events() -> None:
    keys = {(e, r, p) for e, r, p in itertools.product(_NUMBERED, Role, (Phase.RUNNING, Phase.STOPPING))}
    assert keys <= set(m.TRANSITIONS)


@pytest.mark.parametrize(("sig", "code", "status"), [(signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 0),
                                                     (signal.SIGTERM, 7, 7), (signal.SIGTERM, 130, 130)])  # fmt: skip
def test_dying_of_the_forwarded_signal_is_a_clean_stop(sig: int, code: int, status: int) -> None:
    r = Run().serving_one()
    r.feed(m.Stop(sig, 0))
    r.exited(1, code)
    assert _of(r.actions, m.Finish) == [m.Finish(status)]


def test_stop_signal_goes_to_replaced_and_timed_out_generations() -> None:
    r = Run(m.Config(stop_signal=signal.SIGQUIT, ready_timeout=5.0)).serving_one()
    r.reload()
    assert m.SignalLeader(1, signal.SIGQUIT) in r.ready(2)
    r.reload()
    assert m.SignalLeader(3, signal.SIGQUIT) in r.at(10).timers()
    # Our own SIGTERM is forwarded as it came.
    assert m.SignalLeader(2, signal.SIGTERM) in r.feed(m.Stop(signal.SIGTERM, 11))


def test_first_failure_hints_at_an_app_that_binds_the_port_itself() -> None:
    r = Run()
    r.boot()
    acts = r.exited(1, 1)
    assert m.Log(m.BINDS_ITSELF_HINT) in acts
    r = Run().serving_one()
    r.reload()
    assert m.Log(m.BINDS_ITSELF_HINT) not in r.exited(2, 1)  # served before: not the likely cause


# -- issue 13: the outer systemd, drain, reload outcomes ------------------------------------------


def _outer(acts: list[m.Action]) -> list[str]:
    return [a.state for a in acts if isinstance(a, m.NotifyOuter)]


def test_outer_ready_once_the_first_generation_serves() -> None:
    r = Run()
    assert _outer(r.boot()) == []
    assert _outer(r.ready(1)) == ["READY=1\nSTATUS=serving: generation 1"]


def test_outer_reload_sends_reloading_then_ready_with_the_outcome() -> None:
    r = Run().serving_one()
    acts = r.at(1.5).reload()
    assert _outer(acts) == ["RELOADING=1\nMONOTONIC_USEC=1500000"]
    acts = r.at(2.0).ready(2)
    assert _outer(acts) == ["READY=1\nSTATUS=serving: generation 2"]
    assert _of(acts, m.ReloadDone) == [m.ReloadDone(2, True, 0.5, "test")]


def test_outer_failed_reload_is_ready_with_a_status_and_no_restart() -> None:
    r = Run().serving_one()
    r.at(1.0).reload()
    acts = r.at(1.25).exited(2, code=3)
    (line,) = _outer(acts)
    assert line.startswith("READY=1\nSTATUS=reload failed: generation 2 exited with status 3")
    assert line.endswith("still serving: generation 1")
    (done,) = _of(acts, m.ReloadDone)
    assert isinstance(done, m.ReloadDone) and not done.ok and done.seconds == 0.25
    assert r.state.restart_at is None and r.role(1) is Role.SERVING  # no restart loop


def test_outer_queued_reload_answers_one_reloading_with_one_ready() -> None:
    r = Run().serving_one()
    r.reload()
    assert _outer(r.reload()) == []  # queued behind generation 2: systemd already knows
    assert _outer(r.ready(2)) == []  # generation 3 is still pending
    assert _outer(r.ready(3)) == ["READY=1\nSTATUS=serving: generation 3"]


def test_outer_crash_restart_is_not_a_reload_and_stop_says_stopping() -> None:
    r = Run().serving_one()
    r.exited(1, code=1)
    r.at(1.0).timers()
    assert _outer(r.ready(2)) == []  # a restart after a crash: no RELOADING=1 was sent
    assert "STOPPING=1" in _outer(r.feed(m.Stop(signal.SIGTERM, r.now)))


def test_drain_then_sigterm_to_all_then_sigkill() -> None:
    r = Run(m.Config(ready_timeout=5.0, grace=2.0, drain=3.0, stop_signal=signal.SIGQUIT)).serving_one()
    r.at(1.0).reload()
    acts = r.ready(2)
    assert r.role(1) is Role.DRAINING
    assert _of(acts, m.SignalLeader) == [m.SignalLeader(1, signal.SIGQUIT)]
    assert r.at(3.9).timers() == []
    acts = r.at(4.0).timers()
    assert r.role(1) is Role.STOPPING
    assert _of(acts, m.SignalRest) == [m.SignalRest(1, signal.SIGTERM)]
    acts = r.at(6.0).timers()
    assert _of(acts, m.SignalRest) == [m.SignalRest(1, signal.SIGKILL)]


def test_drained_generation_that_exits_is_gone() -> None:
    r = Run(m.Config(drain=3.0)).serving_one()
    r.reload()
    r.ready(2)
    acts = r.exited(1, code=0)
    assert _of(acts, m.Forget) == [m.Forget(1)] and r.state.gen(1) is None


def test_addr_in_use_seen_replaces_the_guess() -> None:
    r = Run()
    r.boot()
    acts = r.feed(m.Exited(1, 1, False, 0.0, addr_in_use=True))
    assert m.BINDS_ITSELF_HINT not in [a.line for a in _of(acts, m.Log)]  # type: ignore[attr-defined]


# -- READY=1 from a generation's tree (readiness.py checked the sender) ------------------------------


def test_ready_1_in_auto_mode_only_makes_it_look_now() -> None:
    """gunicorn's arbiter sends READY=1 before its workers have imported the app (issue 13):
    in auto mode it is a reason to scan /proc at once, never readiness by itself."""
    r = Run()
    r.boot()
    acts = r.feed(m.Notified(1, 4242, 0.5))
    assert r.role(1) is Role.STARTING
    assert _of(acts, m.ScanNow) == [m.ScanNow(1)]
    assert any(
        "READY=1 from pid 4242 (generation 1); waiting until it serves" in a.line for a in _of(acts, m.Log)
    )


def test_ready_1_in_notify_mode_is_ready() -> None:
    r = Run(m.Config(ready_timeout=5.0, grace=2.0, ready_on_notify=True))
    r.serving_one()
    r.reload(7)
    acts = r.feed(m.Notified(2, 4242, 1.0))
    assert r.role(2) is Role.SERVING and r.role(1) is Role.STOPPING
    assert _replies(acts) == [((7,), "ok: generation 2 ready after 1.000s (READY=1 from pid 4242)")]
    assert not _of(acts, m.ScanNow)


@pytest.mark.parametrize("on_notify", [False, True])
def test_ready_1_from_the_serving_generation_changes_nothing(on_notify: bool) -> None:
    r = Run(m.Config(ready_timeout=5.0, grace=2.0, ready_on_notify=on_notify))
    r.serving_one()
    before = r.state
    assert r.feed(m.Notified(1, 4242, 1.0)) == [] and r.state == before
