"""`rebind free` planning is pure: facts (a diagnosis, who asks, what the kernel allows) in, a plan
out. Every refusal and every obstacle is decided here, without root and without a kernel."""

from __future__ import annotations

import errno
import signal
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from rebind.diagnosis import BlockerInfo, Diagnosis
from rebind.errors import UsageError
from rebind.kernel.trial import TrialResult
from rebind.model.advice import Provenance, WhyVerdict
from rebind.model.conflict import (
    BindRequest,
    Blocker,
    Holder,
    KernelSettings,
    Outcome,
    Rule,
    SockOpts,
    Stage,
    Verdict,
)
from rebind.model.diagnosis import HolderKind
from rebind.model.free import (
    EXIT_REFUSED,
    FreePlan,
    HostFacts,
    ObstacleKind,
    Refusal,
    Target,
    make_plan,
)
from rebind.model.free_collateral import group_sockets
from rebind.model.free_result import Fate, FreeResult, ProcessOutcome, explain_remaining
from rebind.model.records import (
    Endpoint,
    Family,
    Owner,
    OwnerScanReport,
    Proto,
    SocketEntry,
    SocketRecord,
    SocketTable,
    State,
    Timer,
)
from rebind.model.validate import MAX_SECONDS

ME = 1000
ROOT_FACTS = HostFacts(
    euid=0,
    protected={1: Refusal.INIT, 50: Refusal.SELF, 40: Refusal.ANCESTOR},
    cap_net_admin=True,
    kernel_version=(6, 8),
)
USER_FACTS = replace(ROOT_FACTS, euid=ME, cap_net_admin=False)
REQ = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), 8080)
ANY = Endpoint(IPv4Address("0.0.0.0"), 0)


def sock(state: State = State.LISTEN, inode: int | None = 77, port: int = 8080) -> SocketRecord:
    remote = ANY if state is State.LISTEN else Endpoint(IPv4Address("127.0.0.1"), 40000)
    return SocketRecord(
        Proto.TCP,
        Family.INET,
        state,
        Endpoint(IPv4Address("127.0.0.1"), port),
        remote,
        ME,
        inode,
        timer=Timer.TIME_WAIT if state is State.TIME_WAIT else Timer.NONE,
        expires_ms=30_000 if inode is None else None,
    )


def owner(pid: int = 100, uid: int | None = ME, name: str = "server", start: int | None = 5) -> Owner:
    return Owner(pid=pid, fd=3, name=name, uid=uid, start_ticks=start)


def blocker(
    rec: SocketRecord,
    owners: tuple[Owner, ...] = (),
    kind: HolderKind = HolderKind.LISTENER,
    rule: Rule = Rule.LISTENER_NEVER_YIELDS,
) -> BlockerInfo:
    b = Blocker(Holder(rec), Stage.BIND, rule, True, "blocks")
    return BlockerInfo(SocketEntry(rec, owners), b, kind, SockOpts(), Provenance.READ)


IN_USE = TrialResult(False, errno.EADDRINUSE)
SCANNED = OwnerScanReport(scanned=10)


def diag(
    *blockers: BlockerInfo,
    trial: TrialResult = IN_USE,
    scan: OwnerScanReport = SCANNED,
) -> Diagnosis:
    outcome = Outcome(
        Verdict.OK if trial.ok and not blockers else Verdict.FAIL,
        None if trial.ok else trial.errno,
        Stage.BIND,
        tuple(b.blocker for b in blockers),
    )
    table = SocketTable(tuple(b.entry for b in blockers), scan=scan)
    verdict = WhyVerdict.FREE if outcome.verdict is Verdict.OK else WhyVerdict.BUSY
    return Diagnosis(
        REQ, outcome, trial, tuple(blockers), (), (), None, verdict, "verdict", table, KernelSettings()
    )


def plan_for(d: Diagnosis, facts: HostFacts = USER_FACTS, **kw: object) -> FreePlan:
    return make_plan(d, facts=facts, **kw)  # type: ignore[arg-type]


# --- who may be signalled -------------------------------------------------------------------

REFUSALS = [
    # (owner, kind, facts, options, expected refusal or None)
    pytest.param(owner(pid=1), HolderKind.LISTENER, ROOT_FACTS, {"force": True}, Refusal.INIT, id="pid1"),
    pytest.param(owner(pid=50), HolderKind.LISTENER, ROOT_FACTS, {"force": True}, Refusal.SELF, id="self"),
    pytest.param(
        owner(pid=40), HolderKind.LISTENER, ROOT_FACTS, {"force": True}, Refusal.ANCESTOR, id="ancestor"
    ),
    pytest.param(
        owner(uid=0),
        HolderKind.LISTENER,
        USER_FACTS,
        {"force": True},
        Refusal.OTHER_USER,
        id="user-cannot-force",
    ),
    pytest.param(
        owner(uid=65534), HolderKind.LISTENER, ROOT_FACTS, {}, Refusal.OTHER_USER, id="root-without-force"
    ),
    pytest.param(owner(uid=None), HolderKind.LISTENER, USER_FACTS, {}, Refusal.OTHER_USER, id="unknown-uid"),
    pytest.param(owner(uid=65534), HolderKind.LISTENER, ROOT_FACTS, {"force": True}, None, id="root-force"),
    pytest.param(
        owner(name="docker-proxy", uid=0),
        HolderKind.CONTAINER_PROXY,
        ROOT_FACTS,
        {},
        Refusal.CONTAINER,
        id="proxy",
    ),
    pytest.param(
        owner(name="docker-proxy", uid=0),
        HolderKind.CONTAINER_PROXY,
        ROOT_FACTS,
        {"force": True},
        None,
        id="proxy-forced",
    ),
    pytest.param(owner(), HolderKind.OUTGOING, USER_FACTS, {}, Refusal.OUTGOING, id="outgoing"),
    pytest.param(owner(), HolderKind.OUTGOING, USER_FACTS, {"outgoing": True}, None, id="outgoing-allowed"),
    pytest.param(
        owner(start=None), HolderKind.LISTENER, USER_FACTS, {}, Refusal.NO_IDENTITY, id="no-identity"
    ),
    pytest.param(owner(), HolderKind.LISTENER, USER_FACTS, {}, None, id="own-process"),
]


@pytest.mark.parametrize(("o", "kind", "facts", "opts", "expected"), REFUSALS)
def test_who_may_be_signalled(
    o: Owner, kind: HolderKind, facts: HostFacts, opts: dict[str, bool], expected: Refusal | None
) -> None:
    p = plan_for(diag(blocker(sock(), (o,), kind)), facts, **opts)
    if expected is None:
        assert [t.pid for t in p.targets] == [o.pid] and not p.refused and not p.obstacles
        assert p.worth_acting and p.exit_code == 0
    else:
        assert not p.targets and [(r.pid, r.reason) for r in p.refused] == [(o.pid, expected)]
        assert [x.kind for x in p.obstacles] == [ObstacleKind.REFUSED]
        assert not p.worth_acting and p.exit_code == EXIT_REFUSED


def test_a_refused_co_holder_means_nothing_is_signalled() -> None:
    """Stopping our process is pointless while PID 1 keeps the same socket open."""
    d = diag(blocker(sock(), (owner(pid=1, uid=ME), owner(pid=100))))
    p = plan_for(d)
    assert [t.pid for t in p.targets] == [100]
    assert not p.worth_acting and p.exit_code == EXIT_REFUSED


# --- leftovers without a process ------------------------------------------------------------


def test_time_wait_is_destroyed_with_cap_net_admin() -> None:
    p = plan_for(diag(blocker(sock(State.TIME_WAIT, inode=None), kind=HolderKind.TIME_WAIT)), ROOT_FACTS)
    assert len(p.destroy) == 1 and not p.obstacles and p.worth_acting and p.exit_code == 0


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        (USER_FACTS, "CAP_NET_ADMIN"),
        (replace(ROOT_FACTS, kernel_version=(5, 15)), "Linux 6.0"),
    ],
    ids=["no-cap", "old-kernel"],
)
def test_time_wait_that_cannot_be_destroyed_is_exit_3(facts: HostFacts, why: str) -> None:
    p = plan_for(diag(blocker(sock(State.TIME_WAIT, inode=None), kind=HolderKind.TIME_WAIT)), facts)
    assert not p.destroy and len(p.expiring) == 1 and why in p.destroy_blocked
    assert [o.kind for o in p.obstacles] == [ObstacleKind.CANNOT_DESTROY]
    assert p.exit_code == 3 and not p.worth_acting and "frees by itself in 30" in p.obstacles[0].text


def test_a_listener_and_an_expiring_time_wait_is_still_worth_stopping() -> None:
    d = diag(
        blocker(sock(), (owner(),)), blocker(sock(State.TIME_WAIT, inode=None), kind=HolderKind.TIME_WAIT)
    )
    p = plan_for(d)
    assert p.worth_acting and p.exit_code == 3


# --- things that are not sockets ------------------------------------------------------------

NO_SOCKET = SocketRecord(Proto.TCP, Family.INET, State.CLOSE, ANY, ANY, None, None)


@pytest.mark.parametrize(
    ("rule", "kind", "code"),
    [
        (Rule.ADDRESS_NOT_LOCAL, HolderKind.ADDRESS_NOT_LOCAL, 2),
        (Rule.INVALID_ADDRESS, HolderKind.ADDRESS_NOT_LOCAL, 2),
        (Rule.PRIVILEGED_PORT, HolderKind.PRIVILEGED_PORT, 3),
    ],
)
def test_a_blocker_that_is_not_a_socket_is_never_destroyed(rule: Rule, kind: HolderKind, code: int) -> None:
    p = plan_for(diag(blocker(NO_SOCKET, kind=kind, rule=rule)), ROOT_FACTS)
    assert not p.destroy and not p.expiring and not p.targets and not p.has_actions
    assert [o.kind for o in p.obstacles] == [ObstacleKind.NOT_A_SOCKET]
    assert p.exit_code == code and "nothing to free" in p.obstacles[0].text


def test_trial_error_without_any_blocker_is_reported_as_is() -> None:
    p = plan_for(diag(trial=TrialResult(False, errno.EACCES)), ROOT_FACTS)
    assert [o.kind for o in p.obstacles] == [ObstacleKind.NOT_A_SOCKET] and p.exit_code == 3
    p = plan_for(diag(trial=TrialResult(False, errno.EADDRINUSE)), ROOT_FACTS)
    assert [o.kind for o in p.obstacles] == [ObstacleKind.NO_OWNER] and p.exit_code == 1


# --- sockets nobody visible holds -----------------------------------------------------------


def test_owner_outside_this_pid_namespace_is_exit_1_and_says_so() -> None:
    p = plan_for(diag(blocker(sock(), ())), ROOT_FACTS)
    assert [o.kind for o in p.obstacles] == [ObstacleKind.NO_OWNER]
    assert p.exit_code == 1 and not p.worth_acting
    assert "outside this PID namespace" in p.obstacles[0].text
    assert "without root" not in p.obstacles[0].text


@pytest.mark.parametrize(("facts", "says"), [(ROOT_FACTS, "even as root"), (USER_FACTS, "run as root")])
def test_unreadable_fd_tables_are_missing_permission(facts: HostFacts, says: str) -> None:
    p = plan_for(diag(blocker(sock(), ()), scan=OwnerScanReport(scanned=7, inaccessible=3)), facts)
    assert p.exit_code == 3 and "3 process(es) could not be inspected" in p.obstacles[0].text
    assert says in p.obstacles[0].text


# --- validation, the bindable case, the result's status ---------------------------------------


@pytest.mark.parametrize("grace", [float("inf"), float("nan"), -1, MAX_SECONDS * 2, "²"])
def test_grace_must_be_finite_seconds(grace: object) -> None:
    with pytest.raises(UsageError):
        plan_for(diag(blocker(sock(), (owner(),))), grace=grace)


def test_bindable_means_nothing_to_do() -> None:
    p = plan_for(diag(trial=TrialResult(True)))
    assert p.bindable and not p.has_actions and not p.obstacles and p.exit_code == 0


def test_plan_keeps_identity_and_blocking_inodes() -> None:
    d = diag(
        blocker(sock(inode=77), (owner(pid=100, start=123),)), blocker(sock(inode=78), (owner(pid=100),))
    )
    p = plan_for(d, signal=signal.SIGINT)
    [t] = p.targets
    assert (t.pid, t.start_ticks, t.fds) == (100, 123, (3, 3)) and p.signal == signal.SIGINT
    assert p.blocking_inodes == {77, 78}


def _result(plan: FreePlan, fate: Fate, bindable: bool) -> FreeResult:
    after = diag(trial=TrialResult(True)) if bindable else plan.diagnosis
    t = Target(100, 5, "server", ME, (), (3,))
    return FreeResult(plan, (ProcessOutcome(t, fate),), (), after)


def test_result_exit_codes() -> None:
    p = plan_for(diag(blocker(sock(), (owner(),))))
    assert _result(p, Fate.EXITED, True).exit_code == 0
    assert _result(p, Fate.DENIED, False).exit_code == 3
    assert _result(p, Fate.RELEASED, False).exit_code == 1


@pytest.mark.parametrize(("facts", "code"), [(USER_FACTS, 3), (ROOT_FACTS, 0)], ids=["user", "root"])
def test_connections_left_behind_need_sock_destroy(facts: HostFacts, code: int) -> None:
    d = diag(blocker(sock(State.ESTABLISHED, inode=88), (owner(uid=facts.euid),), HolderKind.CONNECTION))
    p = plan_for(d, facts)
    assert p.leaves_orphans and p.worth_acting and p.exit_code == code
    assert bool(p.destroy_blocked) == (code == 3)


def test_process_names_are_escaped_in_every_message() -> None:
    hostile = owner(pid=1, name="\x1b[2J\x1b]0;PWN\x07[/x]")
    p = plan_for(diag(blocker(sock(), (hostile,))))
    res = FreeResult(p, (), (), p.diagnosis)
    res = replace(res, remaining=explain_remaining(res, USER_FACTS))
    for text in (p.obstacles[0].text, *res.remaining):
        assert "\x1b" not in text and "\x07" not in text and "\\x1b[2J" in text, text


# --- what else the signal takes down (issue 18 item 12) -------------------------------------


def _udp(port: int, inode: int) -> SocketRecord:
    return SocketRecord(
        Proto.UDP, Family.INET, State.CLOSE, Endpoint(IPv4Address("0.0.0.0"), port), ANY, ME, inode
    )


def _plan_with_collateral() -> FreePlan:
    p = plan_for(diag(blocker(sock(State.BOUND_INACTIVE, inode=77, port=9001), (owner(),))))
    records = {
        80: sock(State.LISTEN, inode=80, port=8080),
        81: sock(State.ESTABLISHED, inode=81, port=8080),
        82: sock(State.ESTABLISHED, inode=82, port=8080),
        83: _udp(5353, 83),
        84: sock(State.ESTABLISHED, inode=84, port=41234),  # outgoing: no listener on 41234
    }
    others = group_sockets({80, 81, 82, 83, 84, 85, 86}, records, {85: "/run/app.sock"})
    (t,) = p.targets
    return replace(p, targets=(replace(t, also_holds=others),), collateral=others)


def test_other_ports_of_a_target_are_grouped_and_summarised() -> None:
    p = _plan_with_collateral()
    shown = [str(o) for o in p.targets[0].also_holds]
    assert shown == [
        "udp UNCONN 0.0.0.0:5353",
        "tcp LISTEN 127.0.0.1:8080",
        "tcp ESTABLISHED 127.0.0.1:8080 ×2",
        "tcp ESTABLISHED (outgoing)",
        "unix /run/app.sock",
        "socket not identified here (another network namespace, netlink, ...)",
    ]
    assert p.collateral_summary() == (
        "5353/udp, 8080/tcp (LISTEN, 2 connections), 1 outgoing connection, 1 unix socket, 1 other socket"
    )


def test_free_plan_and_top_confirmation_name_every_other_port_before_proceed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rebind.render.free import plan_json, print_plan
    from rebind.top.keys import free_confirmation

    p = _plan_with_collateral()
    print_plan(p)
    out = capsys.readouterr().out
    assert (
        "server[100] also holds" in out
        and "tcp LISTEN 127.0.0.1:8080" in out
        and "udp UNCONN 0.0.0.0:5353" in out
    )
    assert "WARNING: stopping server[100] also takes down 5353/udp, 8080/tcp" in out
    lines, question = free_confirmation(p)
    assert question is not None and "also takes down 5353/udp, 8080/tcp (LISTEN, 2 connections)" in question
    assert question.startswith("Proceed?")
    assert any("tcp LISTEN 127.0.0.1:8080" in line for line in lines)
    doc = plan_json(p)
    assert doc["schema"] == "rebind.free.plan/1"
    assert [(o["proto"], o["port"]) for o in doc["stop"][0]["also_holds"][:3]] == [
        ("udp", 5353),
        ("tcp", 8080),
        ("tcp", 8080),
    ]
    assert doc["also_takes_down"].startswith("5353/udp, 8080/tcp")


def test_a_target_holding_nothing_else_asks_the_plain_question() -> None:
    from rebind.top.keys import free_confirmation

    p = plan_for(diag(blocker(sock(), (owner(),))))
    _, question = free_confirmation(p)
    assert question == "Proceed (signal / destroy as above)? y/n"
    _, question = free_confirmation(plan_for(diag(trial=TrialResult(True, None))))
    assert question is None


def test_hostile_unix_path_in_collateral_is_escaped() -> None:
    (o,) = group_sockets({1}, {}, {1: "/tmp/\x1b[2J\u202e"})
    assert "\x1b" not in str(o) and "\u202e" not in str(o)
