"""`rebind free`'s escalation (SIGTERM, grace, SIGKILL, wait) as a pure machine: no root, no
processes, no clock. The pidfd side (actions/free_signal.py) is covered by the kernel tests."""

from __future__ import annotations

import itertools
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebind.model import free_escalation as m
from rebind.model.free_escalation import Delivery, Stage
from rebind.model.free_result import Fate

CFG = m.Config(signal.SIGTERM, grace=5.0, kill_wait=2.0)
D = Delivery


class World:
    """Carries out the machine's actions as actions/free_signal.py does, from a script: how each
    signal lands (per pid, in order) and which pids exit during each wait."""

    def __init__(
        self,
        pids: tuple[int, ...],
        cfg: m.Config = CFG,
        deliveries: dict[int, list[Delivery]] | None = None,
        exits: list[set[int]] | None = None,
        pin_fails: dict[int, Fate] | None = None,
    ) -> None:
        self.cfg = cfg
        self.state = m.start((p, f"p[{p}]") for p in pids)
        self.deliveries = {p: list(v) for p, v in (deliveries or {}).items()}
        self.exits = list(exits or [])
        self.pin_fails = pin_fails or {}
        self.actions: list[m.Action] = []
        self.now = 100.0

    def run(self) -> World:
        events: list[m.Event] = [
            m.PinFailed(p.pid, self.pin_fails[p.pid], "gone") if p.pid in self.pin_fails else m.Pinned(p.pid)
            for p in self.state.procs
        ]
        events.append(m.Begin(self.now))
        while events:
            self.state, acts = m.step(self.cfg, self.state, events.pop(0))
            self.actions += acts
            for a in acts:
                events += self._carry_out(a)
        return self

    def _carry_out(self, a: m.Action) -> list[m.Event]:
        if isinstance(a, m.Signal):
            todo = self.deliveries.get(a.pid) or [D.DELIVERED]
            return [m.Sent(a.pid, todo.pop(0) if len(todo) > 1 else todo[0])]
        if isinstance(a, m.Wait):
            self.now += 1.0
            gone = self.exits.pop(0) if self.exits else set()
            out: list[m.Event] = [m.Exited(p, self.now) for p in a.pids if p in gone]
            if set(a.pids) - gone:
                out.append(m.WaitOver(self.now + a.seconds))
            return out
        return []

    def proc(self, pid: int) -> m.Proc:
        return next(p for p in self.state.procs if p.pid == pid)

    def said(self) -> list[str]:
        return [a.line for a in self.actions if isinstance(a, m.Say)]

    def of(self, kind: type) -> list[m.Action]:
        return [a for a in self.actions if isinstance(a, kind)]


# -- the table ------------------------------------------------------------------------------------------

POSSIBLE = {
    (m.Pinned, Stage.NEW),
    (m.PinFailed, Stage.NEW),
    (m.Begin, Stage.PINNED),
    (m.Begin, Stage.DONE),
    (m.Sent, Stage.SIGNALLING),
    (m.Sent, Stage.KILLING),
    (m.Exited, Stage.GRACE),
    (m.Exited, Stage.KILL_WAIT),
    (m.WaitOver, Stage.GRACE),
    (m.WaitOver, Stage.KILL_WAIT),
    (m.WaitOver, Stage.DONE),
}


def test_the_table_has_one_row_for_each_possible_key_and_no_other() -> None:
    assert set(m.TRANSITIONS) == POSSIBLE


_SAMPLE: dict[type, m.Event] = {
    m.Pinned: m.Pinned(1),
    m.PinFailed: m.PinFailed(1, Fate.GONE, "x"),
    m.Begin: m.Begin(0),
    m.Sent: m.Sent(1, D.DELIVERED),
    m.Exited: m.Exited(1, 0),
    m.WaitOver: m.WaitOver(0),
}


@pytest.mark.parametrize(
    ("event", "stage"),
    [k for k in itertools.product(m.EVENTS, Stage) if k not in POSSIBLE],
    ids=lambda x: getattr(x, "__name__", getattr(x, "value", x)),
)
def test_an_impossible_event_is_a_bug_not_a_signal(event: type, stage: Stage) -> None:
    state = m.State((m.Proc(1, "p[1]", stage),))
    with pytest.raises(ValueError, match="no transition"):
        m.step(CFG, state, _SAMPLE[event])


def test_an_event_about_a_pid_outside_the_plan_is_a_bug() -> None:
    with pytest.raises(ValueError, match="not in the plan"):
        m.step(CFG, m.start([(1, "p[1]")]), m.Pinned(2))


# -- the escalation -------------------------------------------------------------------------------------


def test_sigterm_then_exit_within_grace() -> None:
    w = World((10,), exits=[{10}]).run()
    assert w.of(m.Signal) == [m.Signal(10, signal.SIGTERM)]
    assert w.of(m.Wait) == [m.Wait((10,), 5.0)]
    p = w.proc(10)
    assert (p.fate, p.signals, p.seconds) == (Fate.EXITED, ("SIGTERM",), 1.0)
    assert w.said() == ["sent SIGTERM to p[10]", "p[10]: exited after 1.0s"]
    assert w.state.done


def test_still_running_after_grace_gets_sigkill_in_one_line_then_waits_kill_wait() -> None:
    w = World((11, 10), exits=[set(), {10, 11}]).run()
    assert w.of(m.Signal) == [
        m.Signal(11, signal.SIGTERM),
        m.Signal(10, signal.SIGTERM),
        m.Signal(11, signal.SIGKILL),
        m.Signal(10, signal.SIGKILL),
    ]
    assert w.of(m.Wait) == [m.Wait((11, 10), 5.0), m.Wait((11, 10), 2.0)]
    assert "still running after 5s: p[10], p[11]; sending SIGKILL" in w.said()
    assert w.said().index("still running after 5s: p[10], p[11]; sending SIGKILL") == 2  # before SIGKILL
    assert {(p.fate, p.signals) for p in w.state.procs} == {(Fate.KILLED, ("SIGTERM", "SIGKILL"))}


def test_one_wait_per_round_once_every_signal_of_it_has_landed() -> None:
    state = m.start([(1, "a[1]"), (2, "b[2]")])
    for ev in (m.Pinned(1), m.Pinned(2)):
        state, acts = m.step(CFG, state, ev)
        assert acts == []
    state, acts = m.step(CFG, state, m.Begin(0))
    assert acts == [m.Signal(1, signal.SIGTERM), m.Signal(2, signal.SIGTERM)]
    state, acts = m.step(CFG, state, m.Sent(1, D.DELIVERED))
    assert not [a for a in acts if isinstance(a, m.Wait)]
    state, acts = m.step(CFG, state, m.Sent(2, D.DELIVERED))
    assert acts[-1] == m.Wait((1, 2), 5.0) and state.waiting


def test_survivor_of_sigkill() -> None:
    w = World((10,)).run()
    p = w.proc(10)
    assert (p.fate, p.signals) == (Fate.SURVIVED, ("SIGTERM", "SIGKILL"))


def test_sigkill_first_is_not_sent_twice() -> None:
    w = World((10,), cfg=m.Config(signal.SIGKILL, grace=1.0)).run()
    assert w.of(m.Signal) == [m.Signal(10, signal.SIGKILL)]
    p = w.proc(10)
    assert (p.fate, p.signals) == (Fate.SURVIVED, ("SIGKILL",))
    assert not any("sending SIGKILL" in line for line in w.said())


@pytest.mark.parametrize(
    ("delivery", "fate", "says"),
    [
        (D.VANISHED, Fate.GONE, None),
        (D.DENIED, Fate.DENIED, "p[10]: not permitted to send SIGTERM"),
        (D.RELEASED, Fate.RELEASED, "p[10]: no longer holds a socket that blocks the port; not sent SIGTERM"),
        (
            D.UNVERIFIED,
            Fate.UNVERIFIED,
            "p[10]: could not read its fds to confirm it still holds the socket; not sent SIGTERM",
        ),
    ],
)
def test_first_signal_not_delivered(delivery: Delivery, fate: Fate, says: str | None) -> None:
    w = World((10,), deliveries={10: [delivery]}).run()
    p = w.proc(10)
    assert (p.fate, p.signals) == (fate, ())
    assert w.said() == ([says] if says else [])
    assert w.of(m.Wait) == []


@pytest.mark.parametrize(
    ("delivery", "fate"),
    [
        (D.VANISHED, Fate.GONE),
        (D.DENIED, Fate.DENIED),
        (D.RELEASED, Fate.RELEASED),
        (D.UNVERIFIED, Fate.UNVERIFIED),
    ],
)
def test_holding_is_checked_again_before_sigkill(delivery: Delivery, fate: Fate) -> None:
    w = World((10,), deliveries={10: [D.DELIVERED, delivery]}).run()
    p = w.proc(10)
    assert (p.fate, p.signals) == (fate, ("SIGTERM",))
    assert w.of(m.Wait) == [m.Wait((10,), 5.0)]  # no wait after a SIGKILL that was not sent


@pytest.mark.parametrize("fate", [Fate.GONE, Fate.REUSED, Fate.UNVERIFIED])
def test_a_process_that_could_not_be_pinned_is_never_signalled(fate: Fate) -> None:
    w = World((10, 11), pin_fails={10: fate}, exits=[{11}]).run()
    assert [a.pid for a in w.of(m.Signal)] == [11]
    assert w.proc(10).fate is fate and w.proc(10).signals == ()
    assert w.said()[0] == "p[10]: gone; not signalled"


# -- any script: every process ends with one fate, and only pinned holders are signalled ------------


@settings(max_examples=300, deadline=None)
@given(
    pids=st.lists(st.integers(2, 9), min_size=1, max_size=4, unique=True),
    first=st.sampled_from([signal.SIGTERM, signal.SIGINT, signal.SIGKILL]),
    deliveries=st.dictionaries(
        st.integers(2, 9), st.lists(st.sampled_from(list(Delivery)), min_size=1, max_size=2)
    ),
    exits=st.lists(st.sets(st.integers(2, 9)), max_size=2),
    pin_fails=st.dictionaries(st.integers(2, 9), st.sampled_from([Fate.GONE, Fate.REUSED, Fate.UNVERIFIED])),
)
def test_any_script_ends_with_one_fate_each(
    pids: list[int],
    first: int,
    deliveries: dict[int, list[Delivery]],
    exits: list[set[int]],
    pin_fails: dict[int, Fate],
) -> None:
    w = World(tuple(pids), m.Config(first, 1.0), deliveries, exits, pin_fails).run()
    assert w.state.done and all(p.fate is not None for p in w.state.procs)
    for p in w.state.procs:
        sent = [a.sig for a in w.of(m.Signal) if a.pid == p.pid]
        assert len(sent) <= 2 and len(set(sent)) == len(sent)  # each signal at most once
        if p.pid in pin_fails:
            assert sent == []
        if sent[1:]:
            assert sent == [first, signal.SIGKILL] and first != signal.SIGKILL
        if p.fate in (Fate.EXITED, Fate.KILLED):
            assert p.seconds is not None and p.seconds > 0
