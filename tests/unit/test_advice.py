"""`rebind why`'s pure advice, without root: every sentence it prints, table-driven.

Facts are built by hand (what kernel/facts.py would gather); model/advice.py turns them into
the verdict, the headline, the blockers, what works and the fixes; cli/why.py prints them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from ipaddress import IPv6Address, ip_address

import pytest

from rebind.errors import UsageError
from rebind.model.advice import (
    Attempt,
    Diagnosis,
    Facts,
    HolderFacts,
    OwnerView,
    Provenance,
    WhyVerdict,
    advise,
    group_holders,
    infer_from_trials,
)
from rebind.model.conflict import (
    AddrFlag,
    AddrState,
    BucketState,
    KernelSettings,
    Outcome,
    PortState,
    SockOpts,
    Stage,
    Verdict,
    probe_is_harmless,
)
from rebind.model.containers import ProxyKind
from rebind.model.diagnosis import HolderKind, ProcessHint, classify, fixes_for, kind_phrase
from rebind.model.records import (
    Endpoint,
    Family,
    Owner,
    Proto,
    SocketEntry,
    SocketRecord,
    SocketTable,
    State,
    Timer,
)
from rebind.model.request import BindRequest, TrialResult
from rebind.render.why import attempt_detail, diagnosis_lines, why_json

P = 8080
S = KernelSettings(local_addresses=frozenset({ip_address("127.0.0.1"), ip_address("::1")}))
OK, INUSE = TrialResult(True), TrialResult(False, 98)


def rec(
    addr: str = "127.0.0.1",
    state: State = State.LISTEN,
    *,
    proto: Proto = Proto.TCP,
    remote_port: int = 0,
    uid: int | None = 0,
    expires_ms: int | None = None,
    local_port: int = P,
) -> SocketRecord:
    a = ip_address(addr)
    mini = state is State.TIME_WAIT or (state is State.FIN_WAIT2 and expires_ms is not None)
    peer = ip_address("127.0.0.1" if a.version == 4 else "::1")
    return SocketRecord(
        proto,
        Family.INET if a.version == 4 else Family.INET6,
        state,
        Endpoint(a, local_port),
        Endpoint(peer if remote_port else ip_address("0.0.0.0" if a.version == 4 else "::"), remote_port),
        None if mini else uid,
        None if mini else 1000 + remote_port,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
        expires_ms=expires_ms,
        v6only=(not a.is_unspecified) if a.version == 6 else None,
    )


def owner(pid: int = 42, name: str = "redis-server", ppid: int = 1) -> Owner:
    return Owner(pid=pid, fd=3, name=name, user="redis", uid=0, ppid=ppid)


def tw(remote_port: int = 50000, expires_ms: int = 41_000, state: State = State.TIME_WAIT) -> SocketRecord:
    return rec("127.0.0.1", state, remote_port=remote_port, expires_ms=expires_ms)


def request(addr: str = "0.0.0.0", **kw: object) -> BindRequest:
    return BindRequest(Proto(kw.pop("proto", Proto.TCP)), ip_address(addr), P, **kw)  # type: ignore[arg-type]


def facts(
    req: BindRequest,
    *holders: HolderFacts,
    trials: dict[BindRequest, TrialResult] | None = None,
    settings: KernelSettings = S,
    source: str = "netlink",
    owners_complete: bool = False,
    hints: dict[int, ProcessHint] | None = None,
) -> Facts:
    table = SocketTable(tuple(h.entry for h in holders), source=source)
    return Facts(
        req,
        tuple(holders),
        settings,
        table,
        hints=hints or {},
        trials={replace(r, listen=False): t for r, t in (trials or {}).items()},
        owners_complete=owners_complete,
    )


def held(r: SocketRecord, *owners: Owner, ra: bool | None = None, rp: bool | None = None) -> HolderFacts:
    known = ra is not None or rp is not None
    return HolderFacts(
        SocketEntry(r, owners), SockOpts(ra, rp), Provenance.READ if known else Provenance.UNKNOWN
    )


def text(d: Diagnosis) -> str:
    return "\n".join(diagnosis_lines(d))


def consistent(d: Diagnosis) -> None:
    """Verdict line, exit code (bindable) and JSON always agree."""
    doc = why_json(d)
    assert doc["bindable"] is d.bindable is (doc["status"] == "free")
    assert (" is free" in d.headline) is d.bindable
    if d.verdict is WhyVerdict.BUSY:
        assert " is busy" in d.headline
    if d.bindable:
        assert "busy" not in d.headline


# --- classify: what holds the port ----------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "owners", "listener", "kind"),
    [
        (rec(), (owner(),), False, HolderKind.LISTENER),
        (rec(proto=Proto.UDP, state=State.CLOSE), (owner(),), False, HolderKind.UDP),
        (rec(state=State.BOUND_INACTIVE), (owner(),), False, HolderKind.BOUND_INACTIVE),
        (tw(), (), True, HolderKind.TIME_WAIT),
        (tw(state=State.FIN_WAIT2), (), True, HolderKind.ORPHAN_FIN_WAIT2),
        # An ESTABLISHED socket in the ephemeral range with no listener: connect() took the port.
        (
            rec(state=State.ESTABLISHED, remote_port=443, local_port=40000),
            (owner(),),
            False,
            HolderKind.OUTGOING,
        ),
        (rec(state=State.SYN_SENT, remote_port=443), (owner(),), False, HolderKind.OUTGOING),
        (rec(state=State.ESTABLISHED, remote_port=50000), (owner(),), True, HolderKind.CONNECTION),
        (rec(state=State.ESTABLISHED, remote_port=50000), (owner(),), False, HolderKind.CONNECTION),
        (rec(state=State.CLOSE_WAIT, remote_port=50000), (owner(),), True, HolderKind.CLOSING_LEFTOVER),
        # A proxy is what the owner annotation proved (kernel/containers/proxies.py), not a name.
        (
            rec(),
            (replace(owner(name="docker-proxy"), proxy=ProxyKind.DOCKER_PROXY),),
            False,
            HolderKind.CONTAINER_PROXY,
        ),
        (rec(), (owner(name="docker-proxy"),), False, HolderKind.LISTENER),
        (rec(), (owner(name="rootlessport"),), False, HolderKind.LISTENER),
        (rec(), (owner(name="vpnkit"),), False, HolderKind.CONTAINER_PROXY),
    ],
)
def test_classify(record: SocketRecord, owners: tuple[Owner, ...], listener: bool, kind: HolderKind) -> None:
    entry = SocketEntry(record, owners)
    assert classify(entry, hints={}, listener_on_port=listener, ephemeral=(32768, 60999)) is kind


def test_classify_listener_families() -> None:
    parent, child = owner(10, "gunicorn", 1), owner(11, "gunicorn", 10)
    hints = {10: ProcessHint(10, True, False, "systemd"), 11: ProcessHint(11, True, True, "gunicorn")}
    e = SocketEntry(rec(), (parent, child))
    assert classify(e, hints=hints, listener_on_port=True, ephemeral=(1, 2)) is HolderKind.SHARED_LISTENER
    orphan = {12: ProcessHint(12, False, False, None, lost_group_leader=9)}
    e = SocketEntry(rec(), (owner(12, "worker"),))
    assert classify(e, hints=orphan, listener_on_port=True, ephemeral=(1, 2)) is HolderKind.INHERITED_LISTENER


@pytest.mark.parametrize(
    ("kind", "reuseaddr", "phrase"),
    [
        (HolderKind.LISTENER, None, "a live listener"),
        (HolderKind.SHARED_LISTENER, None, "a listener shared by a parent and its forked children"),
        (HolderKind.INHERITED_LISTENER, None, "a listener inherited by a child whose parent has exited"),
        (HolderKind.CONTAINER_PROXY, None, "a container runtime's port proxy"),
        (HolderKind.BOUND_INACTIVE, None, "a socket that is bound but not listening"),
        (HolderKind.TIME_WAIT, False, "TIME_WAIT left by a server without SO_REUSEADDR"),
        (HolderKind.TIME_WAIT, True, "TIME_WAIT left by a server with SO_REUSEADDR"),
        (HolderKind.TIME_WAIT, None, "TIME_WAIT left by a server"),
        (HolderKind.ORPHAN_FIN_WAIT2, True, "an orphaned FIN_WAIT2 left by a server with SO_REUSEADDR"),
        (HolderKind.CLOSING_LEFTOVER, None, "a CLOSE_WAIT connection"),
        (HolderKind.CONNECTION, False, "an open connection without SO_REUSEADDR"),
        (HolderKind.OUTGOING, None, "an outgoing connection whose ephemeral local port is this port"),
        (HolderKind.UDP, None, "a bound UDP socket"),
        (HolderKind.PRIVILEGED_PORT, None, "a privileged port and no CAP_NET_BIND_SERVICE"),
        (HolderKind.ADDRESS_NOT_LOCAL, None, "the address is not on this host"),
        (
            HolderKind.ADDRESS_TENTATIVE,
            None,
            "the IPv6 address is not usable yet (duplicate address detection)",
        ),
        (HolderKind.INVALID_ADDRESS, None, "the address cannot be bound as given"),
    ],
)
def test_kind_phrase(kind: HolderKind, reuseaddr: bool | None, phrase: str) -> None:
    assert kind_phrase(kind, rec(state=State.CLOSE_WAIT, remote_port=1), reuseaddr) == phrase


def test_every_kind_has_a_phrase() -> None:
    for kind in HolderKind:
        assert kind_phrase(kind, rec(), None)


# --- fixes: what helps now first, prevention after ------------------------------------------


def titles(kinds: list[HolderKind], **kw: object) -> list[str]:
    args: dict[str, object] = {
        "port": P,
        "proto": Proto.TCP,
        "frees_in_ms": None,
        "old_reuseaddr": None,
        "pids": [42],
        "can_destroy": True,
    }
    args.update(kw)
    return [f.title for f in fixes_for(kinds, **args)]  # type: ignore[arg-type]


def test_time_wait_fixes_start_with_waiting() -> None:
    fixes = fixes_for(
        [HolderKind.TIME_WAIT],
        port=P,
        proto=Proto.TCP,
        frees_in_ms=41_000,
        old_reuseaddr=False,
        pids=[],
        can_destroy=True,
    )
    assert [f.title for f in fixes][:4] == [
        "Wait 41 s",
        "Destroy the leftover sockets now",
        "Set SO_REUSEADDR on the server's listening socket, before bind()",
        "Use another port",
    ]
    assert fixes[0].command == f"rebind wait {P}"
    assert all("fixed 60 s" not in f.why for f in fixes)
    udp = fixes_for(
        [HolderKind.TIME_WAIT],
        port=P,
        proto=Proto.UDP,
        frees_in_ms=900,
        old_reuseaddr=False,
        pids=[],
        can_destroy=False,
    )
    assert udp[0].title == "Wait 0.9 s" and udp[0].command == f"rebind wait {P} --udp"
    assert "not permitted for you here" in udp[1].why


def test_leftover_with_reuseaddr_says_set_it_on_your_socket_first() -> None:
    got = titles([HolderKind.ORPHAN_FIN_WAIT2], frees_in_ms=30_000, old_reuseaddr=True)
    assert got[0] == "Set SO_REUSEADDR on your socket, before bind()" and got[1] == "Wait 30 s"
    assert "Set SO_REUSEADDR on the server's listening socket, before bind()" not in got
    # Your socket has it already: the leftover does not block, nothing to say about it.
    assert "Set SO_REUSEADDR on your socket, before bind()" not in titles(
        [HolderKind.ORPHAN_FIN_WAIT2], frees_in_ms=30_000, old_reuseaddr=True, new_reuseaddr=True
    )


def test_listener_fixes_rank_what_helps_before_what_needs_the_holder() -> None:
    got = titles([HolderKind.LISTENER])
    assert got == [
        "Stop the process holding the port",
        "Use another port",
        "Share the port on purpose with SO_REUSEPORT (same user, both sockets)",
        "Never close the listening socket on restart",
    ]
    stop = fixes_for(
        [HolderKind.LISTENER],
        port=P,
        proto=Proto.TCP,
        frees_in_ms=None,
        old_reuseaddr=None,
        pids=[7, 8],
        can_destroy=True,
    )[0]
    assert stop.command == f"rebind free {P}   # or: kill 7 8"


def test_holder_outside_the_pid_namespace_is_not_offered_rebind_free() -> None:
    fixes = fixes_for(
        [HolderKind.LISTENER],
        port=P,
        proto=Proto.TCP,
        frees_in_ms=None,
        old_reuseaddr=None,
        pids=[],
        can_destroy=True,
        holder_hidden=True,
    )
    assert fixes[0].title == "Stop the holder from the PID namespace it lives in"
    assert all("rebind free" not in (f.command or "") for f in fixes)


@pytest.mark.parametrize(
    ("kind", "first"),
    [
        (HolderKind.PRIVILEGED_PORT, "Give the server CAP_NET_BIND_SERVICE, or lower the privileged range"),
        (HolderKind.ADDRESS_NOT_LOCAL, "Bind an address this host has, or the wildcard"),
        (HolderKind.ADDRESS_TENTATIVE, "Wait for duplicate address detection to finish"),
        (HolderKind.INVALID_ADDRESS, "Give the address as the kernel accepts it"),
        (HolderKind.OUTGOING, "Reserve the port so outgoing connections never take it"),
        (HolderKind.CONTAINER_PROXY, "Stop or re-map the container that publishes this port"),
        (
            HolderKind.INHERITED_LISTENER,
            "Stop the orphaned child, then mark the listener close-on-exec in the parent",
        ),
        (HolderKind.BOUND_INACTIVE, "Stop the process holding the port"),
        (HolderKind.UDP, "Stop the process holding the port"),
    ],
)
def test_first_fix_per_kind(kind: HolderKind, first: str) -> None:
    assert titles([kind])[0] == first


def test_no_socket_kinds_get_no_socket_fixes() -> None:
    got = titles([HolderKind.PRIVILEGED_PORT])
    assert "Use another port" not in got and "Never close the listening socket on restart" not in got
    assert got[1] == "Let a privileged supervisor bind it and hand the socket over"


# --- the whole answer: verdict, headline, blockers, attempts, fixes ------------------------


def test_free_port() -> None:
    req = request()
    d = advise(facts(req, trials={req: OK}))
    assert (
        d.verdict is WhyVerdict.FREE
        and d.headline == f"{P}/tcp is free: bind() works now and so will listen()"
    )
    assert d.fixes == () and d.blockers == () and d.disagreement is None
    udp = request(proto=Proto.UDP, listen=False)
    assert advise(facts(udp, trials={udp: OK})).headline == f"{P}/udp is free: bind() works now"
    consistent(d)


def test_origin_story_time_wait_flags_inferred_from_trials() -> None:
    """The trials (as asked, +SO_REUSEADDR, +SO_REUSEPORT, both) all fail: the TIME_WAIT has neither."""
    req = request()
    trials = {
        req: INUSE,
        replace(req, reuseaddr=True): INUSE,
        replace(req, reuseport=True): INUSE,
        replace(req, reuseaddr=True, reuseport=True): INUSE,
    }
    d = advise(facts(req, held(tw()), trials=trials))
    assert d.verdict is WhyVerdict.BUSY
    assert d.headline == f"{P}/tcp is busy: TIME_WAIT left by a server without SO_REUSEADDR — free in 41 s"
    [b] = d.blockers
    assert b.provenance is Provenance.INFERRED_TRIAL and b.opts == SockOpts(False, False)
    assert b.owners is OwnerView.NONE_NEEDED and d.frees_in_ms == 41_000
    assert d.fixes[0].title == "Wait 41 s"
    assert any(a.label == "on 127.0.0.2" and a.works for a in d.attempts)
    consistent(d)
    lines = text(d)
    assert "tcp TIME_WAIT 127.0.0.1:8080 → 127.0.0.1:50000, 41.0s left" in lines or "41" in lines
    assert "SO_REUSEADDR off, SO_REUSEPORT off (inferred-trial)" in lines


def test_reuseport_time_wait_the_trial_proves_it_works() -> None:
    """Wrong answers #3/#4: the trial's success pins the TIME_WAIT's SO_REUSEPORT; never "busy"."""
    req = request("127.0.0.1", reuseport=True)
    d = advise(facts(req, held(tw()), trials={req: OK}))
    assert d.verdict is WhyVerdict.FREE and d.bindable and " is free" in d.headline
    assert d.disagreement is None
    consistent(d)


def test_many_identical_time_waits_are_judged_once_and_counted() -> None:
    req = request()
    hs = [held(tw(remote_port=30000 + i, expires_ms=1000 + i)) for i in range(2000)]
    assert len(group_holders(hs)) == 1
    d = advise(facts(req, *hs, trials={req: INUSE, replace(req, reuseaddr=True): OK}))
    assert len(d.blockers) == 2000 and len({id(b.blocker) for b in d.blockers}) == 1
    assert d.headline.startswith(f"{P}/tcp is busy: 2000 TIME_WAIT left by a server")
    assert d.frees_in_ms == 2999
    blocking = [line for line in text(d).splitlines() if line.startswith("  • ")]
    assert len(blocking) == 1 and "2000 peers" in blocking[0]


def test_listener_with_owner_and_escaped_name() -> None:
    req = request()
    evil = owner(42, "\x1b[2J[/x]")
    d = advise(facts(req, held(rec("0.0.0.0"), evil, ra=True, rp=False), trials={req: INUSE}))
    assert d.verdict is WhyVerdict.BUSY
    assert d.headline.startswith(f"{P}/tcp is busy: a live listener (")
    out = text(d)
    assert "\x1b" not in out and "\\x1b[2J" in out
    rich = "\n".join(diagnosis_lines(d, lambda t: t.replace("[", "\\[")))
    assert "\\[/x]" in rich
    assert d.fixes[0].title == "Stop the process holding the port"


def test_listener_outside_the_pid_namespace() -> None:
    req = request()
    d = advise(
        facts(req, held(rec("0.0.0.0"), ra=False, rp=False), trials={req: INUSE}, owners_complete=True)
    )
    assert d.blockers[0].owners is OwnerView.OUTSIDE
    assert "held by a process outside this PID namespace" in d.headline
    assert all("rebind free" not in (f.command or "") for f in d.fixes)
    d = advise(facts(req, held(rec("0.0.0.0"), ra=False, rp=False), trials={req: INUSE}))
    assert "owner not visible" in d.headline


def test_kernel_wins_over_the_model_and_names_the_cache() -> None:
    """A's SO_REUSEPORT was cleared after bind; the bucket cache still lets B (same uid) in. With
    the bucket unread the model says it depends on that cache; the trial decides."""
    req = request("127.0.0.1", reuseport=True)
    d = advise(
        facts(
            req, held(rec("127.0.0.1", State.BOUND_INACTIVE), owner(), ra=False, rp=False), trials={req: OK}
        )
    )
    assert (
        d.verdict is WhyVerdict.FREE and d.headline == f"{P}/tcp is free: the kernel's trial bind works now"
    )
    assert d.disagreement is None
    out = text(d)
    assert "please report" not in out and "fastreuseport" in out and "cleared the flag or closed" in out
    consistent(d)


def test_disagreement_wording_names_the_reuseport_cache_only_where_it_can_apply() -> None:
    """Issue 17: no "an option changed after bind()" where none did. SO_REUSEPORT asked: the
    cache of an earlier SO_REUSEPORT bind (its socket may have cleared the flag or closed);
    without SO_REUSEPORT no cache applies since 6.8: a model bug, reported as such."""
    from rebind.model.advice import cross_check
    from rebind.model.conflict import Outcome, Verdict

    fail = Outcome(Verdict.FAIL, 98, Stage.BIND)
    rp = cross_check(request(reuseport=True), fail, OK, SocketTable(()))
    assert (
        rp is not None
        and "earlier SO_REUSEPORT bind" in rp.explanation
        and "changed after" not in rp.explanation
    )
    plain = cross_check(request(reuseaddr=True), fail, OK, SocketTable(()))
    assert plain is not None and plain.is_bug


def test_unexplained_disagreement_asks_for_a_report() -> None:
    req = request()
    d = advise(
        facts(req, held(rec("0.0.0.0"), owner(), ra=False, rp=False), trials={req: TrialResult(False, 13)})
    )
    assert d.disagreement is not None and d.disagreement.is_bug and "please report" in text(d)


def test_procfs_blind_spot() -> None:
    req = request()
    d = advise(facts(req, trials={req: INUSE}, source="procfs"))
    assert d.verdict is WhyVerdict.BUSY
    assert d.headline == (
        f"{P}/tcp is busy: the kernel refuses bind() with EADDRINUSE, but no socket that blocks it is visible"
    )
    out = text(d)
    assert "please report" not in out and "/proc/net/tcp" in out
    consistent(d)


def test_listen_stage_failure() -> None:
    req = request("127.0.0.1", reuseaddr=True)
    bound = held(rec("0.0.0.0", State.BOUND_INACTIVE), owner(), ra=True, rp=False)
    listener_later = held(rec("127.0.0.1", State.LISTEN), owner(43), ra=True, rp=False)
    d = advise(facts(req, bound, trials={req: OK}))
    assert d.verdict is WhyVerdict.FREE
    # A listener on another address: bind() through SO_REUSEADDR... but listen() re-checks.
    d = advise(facts(request("0.0.0.0", reuseaddr=True), listener_later))
    assert d.verdict is WhyVerdict.BUSY


def test_uncertain_without_a_trial() -> None:
    req = request(reuseaddr=True)
    d = advise(facts(req, held(tw())))
    assert d.verdict is WhyVerdict.UNCERTAIN and not d.bindable
    assert d.headline.startswith(
        f"{P}/tcp may be busy: it depends on the SO_REUSEADDR of sockets nobody could read"
    )
    consistent(d)


def test_privileged_port() -> None:
    req = replace(request(), port=80)
    settings = replace(S, cap_net_bind_service=False)
    d = advise(facts(req, trials={req: TrialResult(False, 13)}, settings=settings))
    assert d.verdict is WhyVerdict.CANNOT_BIND
    assert d.headline == (
        "80/tcp cannot be bound: ports below 1024 (net.ipv4.ip_unprivileged_port_start) need "
        "CAP_NET_BIND_SERVICE (EACCES)"
    )
    assert d.blockers[0].kind is HolderKind.PRIVILEGED_PORT and "Blocking" in text(d)


def test_address_not_local_and_tentative() -> None:
    req = request("2001:db8::5")
    d = advise(facts(req, trials={req: TrialResult(False, 99)}))
    assert d.headline == (
        f"{P}/tcp cannot be bound on 2001:db8::5: 2001:db8::5 is not an address of this host "
        "(network namespace) (EADDRNOTAVAIL)"
    )
    assert "connection" not in d.headline
    states = (AddrState(IPv6Address("2001:db8::5"), 3, AddrFlag.TENTATIVE | AddrFlag.PERMANENT, "v0"),)
    tentative = replace(S, ipv6_addresses=states)
    d = advise(facts(req, settings=tentative))  # no trial: the model alone says it
    assert d.verdict is WhyVerdict.CANNOT_BIND and d.blockers[0].kind is HolderKind.ADDRESS_TENTATIVE
    assert "2001:db8::5 on v0 is tentative: duplicate address detection is still running" in d.headline
    failed = replace(S, ipv6_addresses=(replace(states[0], flags=AddrFlag.TENTATIVE | AddrFlag.DADFAILED),))
    assert "failed duplicate address detection" in advise(facts(req, settings=failed)).headline
    optimistic = replace(
        S, ipv6_addresses=(replace(states[0], flags=AddrFlag.TENTATIVE | AddrFlag.OPTIMISTIC),)
    )
    assert advise(facts(req, settings=optimistic)).verdict is WhyVerdict.FREE
    deprecated = replace(S, ipv6_addresses=(replace(states[0], flags=AddrFlag.DEPRECATED),))
    assert advise(facts(req, settings=deprecated)).verdict is WhyVerdict.FREE


def test_link_local_needs_its_device() -> None:
    ll = (AddrState(IPv6Address("fe80::1"), 2, AddrFlag.PERMANENT, "eth0"),)
    settings = replace(S, ipv6_addresses=ll)
    d = advise(facts(request("fe80::1"), settings=settings))
    assert d.blockers[0].kind is HolderKind.INVALID_ADDRESS and "needs a scope id" in d.headline
    assert advise(facts(request("fe80::1", ifindex=2), settings=settings)).verdict is WhyVerdict.FREE
    d = advise(facts(request("fe80::1", ifindex=1), settings=settings))
    assert d.blockers[0].kind is HolderKind.ADDRESS_NOT_LOCAL and "on that interface" in d.headline


def test_attempt_details() -> None:
    req = request()
    ok = Outcome(Verdict.OK)
    fail = Outcome(Verdict.FAIL, 98, Stage.BIND)
    cases = [
        (Attempt("x", req, ok, OK), "works", True),
        (Attempt("x", req, ok, None), "works (predicted)", True),
        (Attempt("x", req, fail, INUSE), "bind() fails: EADDRINUSE", False),
        (Attempt("x", req, fail, None), "bind() would fail (predicted)", False),
        (Attempt("x", req, fail, OK), "works", True),  # the kernel overrules the model
        (
            Attempt("x", req, Outcome(Verdict.FAIL, 98, Stage.LISTEN), OK),
            "bind() works, listen() would fail",
            False,
        ),
        (
            Attempt("x", req, Outcome(Verdict.DEPENDS, 98, Stage.BIND), None),
            "depends on a flag nobody can read",
            False,
        ),
    ]
    for a, detail, works in cases:
        assert (attempt_detail(a), a.works) == (detail, works)


# --- inference from trials ------------------------------------------------------------------


def test_inference_needs_single_sockets_for_a_failed_trial() -> None:
    req = request()
    groups = group_holders([held(tw(remote_port=1)), held(tw(remote_port=2))])
    assert len(groups) == 1 and len(groups[0]) == 2
    # "At least one of the two blocks a SO_REUSEADDR bind" does not say that both lack it.
    out = infer_from_trials(groups, S, {replace(req, reuseaddr=True, listen=False): INUSE})
    assert out[0][0].opts == SockOpts()
    # A success says every one of them lets it through.
    out = infer_from_trials(groups, S, {replace(req, reuseaddr=True, listen=False): OK})
    assert out[0][0].opts.reuseaddr is True and all(h.provenance is Provenance.INFERRED_TRIAL for h in out[0])


def test_inference_ignores_errors_that_say_nothing_about_sockets() -> None:
    groups = group_holders([held(tw())])
    assert infer_from_trials(groups, S, {request(listen=False): TrialResult(False, 13)}) == groups


# --- the one request constructor and the harmless-probe rule --------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"port": 70000}, "out of range"),
        ({"port": "²"}, "not a port number"),
        ({"port": 80, "proto": "sctp"}, "unknown protocol"),
        ({"port": 80, "addr": "localhost"}, "not an IP address"),
        ({"port": 80, "addr": "127.0.0.1%lo"}, "scope id"),
        ({"port": 80, "addr": "2001:db8::1%lo"}, "only meaningful on a link-local"),
        ({"port": 80, "addr": "fe80::1%nosuchif"}, "no network interface 'nosuchif'"),
        ({"port": 80, "addr": "127.0.0.1", "v6only": True}, "v6only needs an IPv6 address"),
        ({"port": 80, "device": "nosuchif"}, "no network interface"),
    ],
)
def test_bad_requests_are_usage_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        BindRequest.create(**kw, ifindex_of=lambda name: {"lo": 1}.get(name))  # type: ignore[arg-type]


def test_good_requests() -> None:
    r = BindRequest.create("8080", addr="[fe80::1%lo]", ifindex_of=lambda name: {"lo": 1}.get(name))
    assert (r.addr, r.ifindex, r.listen, r.port) == (IPv6Address("fe80::1"), 1, True, 8080)
    r = BindRequest.create(53, proto="UDP", v6only=True)
    assert (r.proto, str(r.addr), r.listen, r.v6only) == (Proto.UDP, "::", False, True)
    assert BindRequest.create(80, addr="*").where == "0.0.0.0:80/tcp"
    with pytest.raises(UsageError):
        replace(r, port=-1)


def test_probe_is_harmless() -> None:
    """Harmless = every later bind gets the answer it would have had (issue 17)."""
    plain, ra, rp = request(), request(reuseaddr=True), request(reuseport=True)
    both = request(reuseaddr=True, reuseport=True)
    assert probe_is_harmless(both, bucket_exists=False, prober_uid=1000)  # fresh bucket, gone on close
    assert probe_is_harmless(request(proto=Proto.UDP, reuseport=True), bucket_exists=True, prober_uid=0)
    # An unread bucket: any probe that works may clear or reset the SO_REUSEPORT cache.
    for p in (plain, ra, rp, both):
        assert not probe_is_harmless(p, bucket_exists=True, prober_uid=0)
    empty = BucketState(0, 0)
    assert probe_is_harmless(plain, bucket_exists=True, prober_uid=0, bucket=empty)
    assert not probe_is_harmless(rp, bucket_exists=True, prober_uid=0, bucket=empty)  # would set it
    connect_only = BucketState(-1, -1)  # only connect()-bound sockets: connect() reads the -1
    assert not probe_is_harmless(plain, bucket_exists=True, prober_uid=0, bucket=connect_only)
    cached = BucketState(0, 2, 0, ip_address("0.0.0.0"), False)
    assert not probe_is_harmless(plain, bucket_exists=True, prober_uid=0, bucket=cached)  # would clear it
    assert probe_is_harmless(rp, bucket_exists=True, prober_uid=0, bucket=cached)  # matches: unchanged
    assert not probe_is_harmless(rp, bucket_exists=True, prober_uid=1000, bucket=cached)  # our uid resets it
    narrow = BucketState(0, 2, 0, ip_address("127.0.0.1"), False)
    assert not probe_is_harmless(rp, bucket_exists=True, prober_uid=0, bucket=narrow)


def test_api_default_request_validates() -> None:
    import rebind

    with pytest.raises(rebind.errors.UsageError, match="out of range"):
        rebind.default_request(70000)
    r = rebind.default_request(8080, addr="::1", reuseport=True, freebind=True)
    assert (r.reuseport, r.freebind, r.port) == (True, True, 8080)


def test_gatherer_runs_only_harmless_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel/facts.py: which probes run (trial_bind faked: no socket is opened here)."""
    import os

    from rebind.kernel import facts as gatherer

    tried: list[BindRequest] = []
    monkeypatch.setattr(gatherer, "trial_bind", lambda r: tried.append(r) or INUSE)
    me = os.geteuid()
    empty = SocketTable(())
    occupied = SocketTable((SocketEntry(tw()),))
    # A fresh bucket: as asked, every variant with more flags, the other addresses (TCP only).
    results, skipped = gatherer._trials(request(uid=me), empty, S, PortState())
    assert skipped == "" and set(results) == {replace(r, listen=False) for r in tried}
    flags = {(r.reuseaddr, r.reuseport) for r in tried if r.addr == ip_address("0.0.0.0")}
    assert flags == {(False, False), (True, False), (False, True), (True, True)}
    assert {str(r.addr) for r in tried} == {"0.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"}
    tried.clear()
    gatherer._trials(request(proto=Proto.UDP, uid=me), empty, S, PortState())
    assert {str(r.addr) for r in tried} == {"0.0.0.0"}  # a UDP probe elsewhere could take datagrams
    # An occupied TCP bucket whose fast-reuse fields nobody read: no probe at all, and why says so.
    tried.clear()
    results, skipped = gatherer._trials(request(reuseport=True, uid=me), occupied, S, PortState())
    assert tried == [] and results == {} and "fast-reuse cache is unknown" in skipped
    # Read, and empty: the probes that leave it empty (no SO_REUSEPORT) run.
    tried.clear()
    gatherer._trials(request(reuseaddr=True, uid=me), occupied, S, PortState(BucketState(0, 0)))
    assert tried and not any(r.reuseport for r in tried)
    # Another uid's SO_REUSEPORT bind cannot be tried by us at all: the model answers, and says so.
    tried.clear()
    results, skipped = gatherer._trials(request(reuseport=True, uid=me + 1), occupied, S, PortState())
    assert tried == [] and results == {} and "cannot answer for uid" in skipped
    d = advise(replace(facts(request(reuseport=True, uid=me + 1), held(tw())), trial_skipped=skipped))
    assert d.trial is None and any("cannot answer for uid" in n for n in d.notes)
    assert "note: no trial bind" in text(d)


def test_parse_if_inet6() -> None:
    from rebind.kernel.addrs import parse_if_inet6

    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "20010db8000100000000000000000005 03 40 00 c0       v0\n"
        "fe8000000000000000fc00fffe000001 04 40 20 88     eth0\n"
        "garbage line\n"
        "zz010db8000100000000000000000005 03 40 00 c0       v1\n"
    )
    lo, v0, eth0 = parse_if_inet6(text)
    assert (lo.addr, lo.ifindex, lo.usable) == (IPv6Address("::1"), 1, True)
    assert (str(v0.addr), v0.ifname, v0.usable) == ("2001:db8:1::5", "v0", False)
    assert eth0.flags & AddrFlag.DADFAILED and eth0.ifindex == 4


def test_grouping_by_shared_objects_is_grouping_by_value() -> None:
    """group_holders finds a group once per identical (local end, flags) objects: holders with
    equal but distinct objects still share a group, and the same objects with another state,
    timer or flags value do not."""
    from rebind.model.advice.inference import _group_key

    local = Endpoint(ip_address("127.0.0.1"), P)
    shared = SockOpts(False, False)

    def mine(r: SocketRecord, opts: SockOpts = shared) -> HolderFacts:
        return HolderFacts(SocketEntry(replace(r, local=local)), opts, Provenance.KERNEL)

    hs = [
        mine(tw(remote_port=1)),
        held(tw(remote_port=2), ra=False, rp=False),  # equal objects, not the same: READ, not KERNEL
        mine(tw(remote_port=3), SockOpts(False, False)),  # equal flags, another object
        HolderFacts(SocketEntry(tw(remote_port=4)), SockOpts(False, False), Provenance.KERNEL),
        mine(tw(remote_port=5, state=State.FIN_WAIT2)),
        mine(replace(tw(remote_port=6), timer=Timer.NONE)),  # not a mini socket
        mine(tw(remote_port=7), SockOpts(True, False)),
        mine(tw(remote_port=8)),
        mine(replace(tw(remote_port=9), timer=Timer.NONE)),
    ]
    by_value: dict[object, list[HolderFacts]] = {}
    for h in hs:
        by_value.setdefault(_group_key(h), []).append(h)
    assert group_holders(hs) == tuple(tuple(g) for g in by_value.values())
    assert [len(g) for g in group_holders(hs)] == [4, 1, 1, 2, 1]
