"""The conflict model: the full §1.2 matrix, the §6 rows, the kernel quirks the oracle found,
and Hypothesis properties. Kernel ground truth for all of it: tests/kernel/test_oracle.py."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebind.model.conflict import (
    BindRequest,
    BucketState,
    Flag,
    Holder,
    KernelSettings,
    Outcome,
    PortState,
    ReuseportCache,
    Rule,
    SockOpts,
    Stage,
    Verdict,
    alternatives,
    check_listen,
    overlap,
    reuseport_cache_after,
    udp_chain_order,
)
from rebind.model.conflict import evaluate as _evaluate
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State, Timer

P = 8080
#: Upstream's UDP rule (the early stop); the other build's rule has its own tests.
S = KernelSettings(udp_first_match=True)


def evaluate(r: BindRequest, hs: Any, s: KernelSettings, **kw: Any) -> Outcome:
    """The model with the port's state known (bucket empty unless ``cache``; UDP chain order
    given): these rows test the rules, not what happens when the state is unknown."""
    if "port" not in kw:
        kw["port"] = PortState(BucketState.of_cache(kw.pop("cache", None)), udp_chain_order=True)
    return _evaluate(r, hs, s, **kw)


def rec(
    addr: str,
    state: State = State.LISTEN,
    *,
    proto: Proto = Proto.TCP,
    uid: int | None = 0,
    v6only: bool | None = None,
    ifindex: int = 0,
    mini: bool = False,
) -> SocketRecord:
    a = ip_address(addr)
    if a.version == 6 and v6only is None and state in (State.LISTEN, State.BOUND_INACTIVE, State.CLOSE):
        v6only = not a.is_unspecified and a.ipv4_mapped is None  # what inet_diag reports
    connected = state not in (State.LISTEN, State.BOUND_INACTIVE, State.CLOSE)
    peer = ip_address("127.0.0.1" if a.version == 4 else "::1")
    return SocketRecord(
        proto,
        Family.INET if a.version == 4 else Family.INET6,
        state,
        Endpoint(a, P),
        Endpoint(
            peer if connected else ip_address("0.0.0.0" if a.version == 4 else "::"),
            50000 if connected else 0,
        ),
        None if mini else uid,
        None if mini else 7,
        ifindex=ifindex,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
        v6only=v6only if a.version == 6 else None,
    )


def tw(addr: str = "127.0.0.1", state: State = State.TIME_WAIT) -> SocketRecord:
    return rec(addr, state, mini=True)


def req(addr: str = "0.0.0.0", **kw: object) -> BindRequest:
    return BindRequest(Proto(kw.pop("proto", Proto.TCP)), ip_address(addr), P, **kw)  # type: ignore[arg-type]


def h(r: SocketRecord, ra: bool | None = False, rp: bool | None = False, v6: bool | None = None) -> Holder:
    return Holder(r, SockOpts(ra, rp, v6))


def verdict(r: BindRequest, *holders: Holder, **kw: object) -> Verdict:
    return evaluate(r, holders, S, **kw).verdict  # type: ignore[arg-type]


# §1.2: (new N, v6only of N) x (existing E, v6only of E) -> overlap. Rows and columns of the doc.
COLS = [
    ("0.0.0.0", None),
    ("127.0.0.1", None),
    ("::ffff:0.0.0.0", None),
    ("::ffff:127.0.0.1", None),
    ("::", False),
    ("::", True),
    ("::1", None),
]
MATRIX = {
    ("0.0.0.0", None): "YYYYYNN",
    ("127.0.0.1", None): "YYYYYNN",
    ("127.0.0.2", None): "YNYNYNN",
    ("::ffff:127.0.0.1", None): "YYYYYNN",
    ("::", False): "YYYYYYY",
    ("::", True): "NNNNYYY",
    ("::1", None): "NNNNYYY",
}


@pytest.mark.parametrize("row", sorted(MATRIX, key=str))
@pytest.mark.parametrize("col", range(len(COLS)))
def test_matrix(row: tuple[str, bool | None], col: int) -> None:
    (na, nv), (ea, ev) = row, COLS[col]
    expect = MATRIX[row][col] == "Y"
    e = rec(ea, v6only=ev if ev is not None else None)
    # A LISTEN holder blocks every plain bind it overlaps with: the verdict is the overlap.
    got = verdict(req(na, v6only=nv), h(e))
    assert (got is Verdict.FAIL) == expect
    assert overlap(ip_address(na), bool(nv), ip_address(ea), bool(ev)) == expect


ROWS = [
    # (label, request, holders, verdict, stage)
    ("a A1", req(reuseaddr=True), [h(tw(), False)], Verdict.FAIL, Stage.BIND),
    ("a' A3", req("127.0.0.2"), [h(tw(), False)], Verdict.OK, None),
    ("a'' B4 child set SO_REUSEADDR", req(reuseaddr=True), [h(tw(), True)], Verdict.OK, None),
    ("b B1/B2", req(reuseaddr=True), [h(tw(), True)], Verdict.OK, None),
    ("b' B3", req(), [h(tw(), True)], Verdict.FAIL, Stage.BIND),
    (
        "c1 C1",
        req(reuseaddr=True, listen=False),
        [h(rec("0.0.0.0", State.BOUND_INACTIVE), True)],
        Verdict.OK,
        None,
    ),
    ("c2 C2", req(reuseaddr=True), [h(rec("0.0.0.0", State.BOUND_INACTIVE), True)], Verdict.OK, None),
    ("c4 C4", req(reuseaddr=True), [h(rec("0.0.0.0"), True)], Verdict.FAIL, Stage.BIND),
    ("d D1", req(), [h(rec("127.0.0.1"))], Verdict.FAIL, Stage.BIND),
    ("d D2", req(reuseaddr=True), [h(rec("127.0.0.1"))], Verdict.FAIL, Stage.BIND),
    ("d D4", req(reuseaddr=True), [h(rec("127.0.0.1"), True)], Verdict.FAIL, Stage.BIND),
    ("d' D5/D6", req(reuseaddr=True), [h(rec("127.0.0.1", State.BOUND_INACTIVE), True)], Verdict.OK, None),
    ("d'' D8", req("127.0.0.1"), [h(rec("0.0.0.0"))], Verdict.FAIL, Stage.BIND),
    ("d'' D9", req("127.0.0.1", reuseaddr=True), [h(rec("0.0.0.0"), True)], Verdict.FAIL, Stage.BIND),
    ("e E1", req(), [h(rec("::", v6only=False))], Verdict.FAIL, Stage.BIND),
    ("e E2", req("127.0.0.1"), [h(rec("::", v6only=False))], Verdict.FAIL, Stage.BIND),
    ("e E3", req("::ffff:127.0.0.1"), [h(rec("::", v6only=False))], Verdict.FAIL, Stage.BIND),
    ("e E4", req("::1"), [h(rec("::", v6only=False))], Verdict.FAIL, Stage.BIND),
    ("e' E5", req(), [h(rec("::", v6only=True))], Verdict.OK, None),
    ("e' E6", req("::ffff:127.0.0.2"), [h(rec("::", v6only=True))], Verdict.OK, None),
    ("e' E7", req("::1"), [h(rec("::", v6only=True))], Verdict.FAIL, Stage.BIND),
    ("e'' E8", req("::", v6only=False), [h(rec("0.0.0.0"))], Verdict.FAIL, Stage.BIND),
    ("e'' E9", req("::", v6only=True), [h(rec("0.0.0.0"))], Verdict.OK, None),
    ("e'' E10", req("::1"), [h(rec("0.0.0.0"))], Verdict.OK, None),
    ("e'' E11", req("::ffff:127.0.0.1"), [h(rec("0.0.0.0"))], Verdict.FAIL, Stage.BIND),
    ("e''' E12", req("::1", v6only=False), [h(rec("0.0.0.0"))], Verdict.OK, None),
    ("f F1", req(reuseport=True), [h(rec("0.0.0.0"), rp=True)], Verdict.OK, None),
    ("f F2", req(reuseport=True, uid=65534), [h(rec("0.0.0.0"), rp=True)], Verdict.FAIL, Stage.BIND),
    ("f F7", req(reuseport=True), [h(rec("0.0.0.0", uid=65534), rp=True)], Verdict.FAIL, Stage.BIND),
    ("f' F8", req(reuseport=True, uid=65534), [h(tw(), rp=True)], Verdict.OK, None),
    ("f'' F5/F6", req(reuseport=True), [h(rec("0.0.0.0", State.BOUND_INACTIVE), rp=True)], Verdict.OK, None),
    (
        "g U1",
        req(proto=Proto.UDP),
        [h(rec("0.0.0.0", State.CLOSE, proto=Proto.UDP))],
        Verdict.FAIL,
        Stage.BIND,
    ),
    (
        "g U3",
        req(proto=Proto.UDP, reuseaddr=True),
        [h(rec("0.0.0.0", State.CLOSE, proto=Proto.UDP))],
        Verdict.FAIL,
        Stage.BIND,
    ),
    (
        "g U5",
        req(proto=Proto.UDP, reuseaddr=True),
        [h(rec("0.0.0.0", State.CLOSE, proto=Proto.UDP), True)],
        Verdict.OK,
        None,
    ),
    (
        "g U8",
        req(proto=Proto.UDP, reuseaddr=True, uid=65534),
        [h(rec("0.0.0.0", State.CLOSE, proto=Proto.UDP), True)],
        Verdict.OK,
        None,
    ),
    (
        "g U9",
        req(proto=Proto.UDP, reuseport=True),
        [h(rec("0.0.0.0", State.CLOSE, proto=Proto.UDP), rp=True)],
        Verdict.OK,
        None,
    ),
    (
        "g U10",
        req(proto=Proto.UDP, reuseport=True, uid=1),
        [h(rec("0.0.0.0", State.CLOSE, proto=Proto.UDP), rp=True)],
        Verdict.FAIL,
        Stage.BIND,
    ),
    (
        "g U14",
        req(proto=Proto.UDP),
        [h(rec("::", State.CLOSE, proto=Proto.UDP, v6only=False))],
        Verdict.FAIL,
        Stage.BIND,
    ),
    ("h1 H1 devices differ", req(ifindex=2), [h(rec("0.0.0.0", ifindex=3))], Verdict.OK, None),
    ("h2 H2 pinned vs unpinned", req(ifindex=2), [h(rec("0.0.0.0"))], Verdict.FAIL, Stage.BIND),
    ("h4 H4 unpinned vs pinned", req(), [h(rec("0.0.0.0", ifindex=2))], Verdict.FAIL, Stage.BIND),
    ("h3 H3 same device", req(ifindex=2), [h(rec("0.0.0.0", ifindex=2))], Verdict.FAIL, Stage.BIND),
    ("u4 U4 TCP vs UDP", req(proto=Proto.UDP), [h(rec("0.0.0.0"))], Verdict.OK, None),
]
ROWS += (
    [
        (
            f"h-{st.name} listener had SO_REUSEADDR",
            req(reuseaddr=True),
            [h(rec("127.0.0.1", st), True)],
            Verdict.OK,
            None,
        )
        for st in (State.CLOSE_WAIT, State.FIN_WAIT1, State.FIN_WAIT2, State.LAST_ACK, State.ESTABLISHED)
    ]
    + [
        (
            f"h-{st.name} listener lacked it",
            req(reuseaddr=True),
            [h(rec("127.0.0.1", st), False)],
            Verdict.FAIL,
            Stage.BIND,
        )
        for st in (State.CLOSE_WAIT, State.FIN_WAIT1, State.FIN_WAIT2, State.LAST_ACK, State.ESTABLISHED)
    ]
    + [
        (
            "h-orphan FIN_WAIT2 is a mini-socket",
            req(reuseaddr=True),
            [h(tw("127.0.0.1", State.FIN_WAIT2), True)],
            Verdict.OK,
            None,
        ),
        (
            "h-orphan FIN_WAIT2 skips uid",
            req(reuseport=True, uid=65534),
            [h(tw("127.0.0.1", State.FIN_WAIT2), rp=True)],
            Verdict.OK,
            None,
        ),
    ]
)


@pytest.mark.parametrize(("label", "r", "holders", "expect", "stage"), ROWS, ids=[r[0] for r in ROWS])
def test_section6_rows(
    label: str, r: BindRequest, holders: list[Holder], expect: Verdict, stage: Stage | None
) -> None:
    out = evaluate(r, holders, S)
    assert out.verdict is expect, out
    assert out.stage is stage
    if expect is Verdict.FAIL:
        assert out.errno == 98 and out.blockers and all(b.certain for b in out.blockers)


def test_second_check_at_listen_c3_d7() -> None:
    """C3/D7: bound SO_REUSEADDR sockets coexist; once one listens, the other's listen() fails."""
    r = req("127.0.0.1", reuseaddr=True)
    assert check_listen(r, [h(rec("0.0.0.0", State.BOUND_INACTIVE), True)], S).verdict is Verdict.OK
    out = check_listen(r, [h(rec("0.0.0.0"), True)], S)
    assert (out.verdict, out.stage, out.errno) == (Verdict.FAIL, Stage.LISTEN, 98)
    assert out.blockers[0].rule is Rule.LISTENER_NEVER_YIELDS
    notes = evaluate(r, [h(rec("0.0.0.0", State.BOUND_INACTIVE), True)], S).notes
    assert any("listen() first" in n for n in notes)


def test_reasons_are_plain_words() -> None:
    out = evaluate(req(reuseaddr=True), [h(tw(), False)], S)
    b = out.blockers[0]
    assert b.rule is Rule.REUSEADDR_MISSING_OLD
    assert "TIME_WAIT 127.0.0.1:8080 -> 127.0.0.1:50000 left by a socket without SO_REUSEADDR" in b.reason
    assert "cannot help" in b.reason
    other = evaluate(req(reuseport=True, uid=65534), [h(rec("0.0.0.0"), rp=True)], S).blockers[0]
    assert other.rule is Rule.REUSEPORT_OTHER_UID and "uid 0" in other.reason


def test_unknown_flag_names_the_deciding_flag() -> None:
    out = evaluate(req(reuseaddr=True), [Holder(tw(), SockOpts(None, None))], S)
    assert out.verdict is Verdict.DEPENDS
    assert out.blockers[0].decided_by == (Flag.REUSEADDR,) and not out.blockers[0].certain
    assert any("SO_REUSEADDR" in n for n in out.notes)
    # A listener blocks SO_REUSEADDR whatever its flag: not DEPENDS.
    assert verdict(req(reuseaddr=True), Holder(rec("0.0.0.0"), SockOpts(None, False))) is Verdict.FAIL


def test_v6only_unknown_for_a_child_of_a_dual_stack_listener() -> None:
    """inet_diag reports v6only only for LISTEN/CLOSE; an accepted [::1] child may have 0."""
    child = rec("::1", State.ESTABLISHED)
    assert verdict(req(), h(child)) is Verdict.DEPENDS
    assert verdict(req(), h(child, v6=False)) is Verdict.FAIL  # dual-stack listener's child
    assert verdict(req(), h(child, v6=True)) is Verdict.OK
    assert verdict(req("127.0.0.1"), h(child, v6=False)) is Verdict.OK  # bhash2: other bucket


def test_check_order_and_errors() -> None:
    priv = KernelSettings(cap_net_bind_service=False, local_addresses=frozenset())
    assert evaluate(BindRequest(Proto.TCP, ip_address("192.0.2.1"), 80), [], priv).errno == 99  # O8
    assert evaluate(BindRequest(Proto.TCP, ip_address("2001:db8::1"), 80), [], priv).errno == 13
    assert (
        evaluate(BindRequest(Proto.TCP, ip_address("127.0.0.1"), 80), [h(rec("0.0.0.0"))], priv).errno == 13
    )  # O6
    assert evaluate(BindRequest(Proto.TCP, ip_address("127.0.0.1"), 0), [], priv).verdict is Verdict.OK  # O3
    start = KernelSettings(unprivileged_port_start=80, cap_net_bind_service=False)
    assert evaluate(BindRequest(Proto.TCP, ip_address("0.0.0.0"), 80), [], start).verdict is Verdict.OK
    local = KernelSettings(local_addresses=frozenset({ip_address("10.0.0.1")}))
    assert evaluate(req("127.9.9.9"), [], local).verdict is Verdict.OK  # N5: all of 127/8
    assert evaluate(req("10.0.0.2"), [], local).errno == 99
    assert evaluate(req("10.0.0.2", freebind=True), [], local).verdict is Verdict.OK
    nl = KernelSettings(local_addresses=frozenset(), ip_nonlocal_bind=True)
    assert evaluate(req("10.0.0.2"), [], nl).verdict is Verdict.OK
    assert evaluate(req("::ffff:127.0.0.1", v6only=True), [], S).errno == 22
    assert evaluate(req("ff02::1"), [], S).errno == 22  # multicast on TCP
    assert evaluate(req("fe80::1"), [], S).errno == 22  # link-local without a device


def test_udp_first_match_in_chain_order() -> None:
    """udp_lib_lport_inuse returns at the first relevant socket (oracle finding)."""
    plain = h(rec("127.0.0.1", State.CLOSE, proto=Proto.UDP))
    shared = h(rec("127.0.0.2", State.CLOSE, proto=Proto.UDP), rp=True)
    r = req(proto=Proto.UDP, reuseport=True)
    assert verdict(r, *udp_chain_order([plain, shared])) is Verdict.OK  # newest (shared) first
    out = evaluate(r, udp_chain_order([shared, plain]), S)
    assert out.verdict is Verdict.FAIL and out.blockers[0].holder is plain
    assert any("never checked" in n for n in evaluate(r, udp_chain_order([plain, shared]), S).notes)


def test_udp_chain_puts_ipv6_reuseport_at_the_tail() -> None:
    v6 = h(rec("::1", State.CLOSE, proto=Proto.UDP, uid=65534), rp=True)
    v6b = h(rec("::ffff:127.0.0.1", State.CLOSE, proto=Proto.UDP), rp=True)
    v4 = h(rec("127.0.0.1", State.CLOSE, proto=Proto.UDP))
    assert udp_chain_order([v6, v6b, v4]) == [v4, v6, v6b]
    assert verdict(req("::", proto=Proto.UDP, reuseport=True), *udp_chain_order([v6, v6b])) is Verdict.FAIL


def test_reuseport_fast_path_cache() -> None:
    """tb->fastreuseport (sk_reuseport_match) skips the per-socket walk (oracle finding)."""
    e = h(rec("127.0.0.1", State.BOUND_INACTIVE), True, False)
    r = req("127.0.0.1", reuseport=True)
    assert verdict(r, e) is Verdict.FAIL
    cache = reuseport_cache_after(None, addr=ip_address("127.0.0.1"), v6only=False, uid=0, reuseport=True)
    assert cache == ReuseportCache(0, ip_address("127.0.0.1"), False)
    assert verdict(r, e, cache=cache) is Verdict.OK
    assert verdict(req("127.0.0.1", reuseport=True, uid=1), e, cache=cache) is Verdict.FAIL
    assert (
        reuseport_cache_after(cache, addr=ip_address("127.0.0.2"), v6only=False, uid=0, reuseport=False)
        is None
    )
    # A wildcard [::] matches a 0.0.0.0 cache and skips an IPv6 listener (ipv4_rcv_saddr_equal).
    wild = ReuseportCache(0, ip_address("0.0.0.0"), False)
    v6l = h(rec("::1"))
    assert verdict(req("::", reuseport=True), v6l) is Verdict.FAIL
    assert verdict(req("::", reuseport=True), v6l, cache=wild) is Verdict.OK
    # check_bind_conflict = false: the address-any buckets are skipped too.
    assert verdict(r, h(rec("0.0.0.0", State.BOUND_INACTIVE), True), cache=cache) is Verdict.OK


def test_alternatives() -> None:
    """Each variant once (plain bind() is the request as asked here), with the model's own
    prediction for its request, and the first other address that works (127.0.0.1 holds the
    TIME_WAIT)."""
    hs = [h(tw(), True)]
    port = PortState(BucketState.of_cache(None))
    alts = alternatives(req(), hs, S, port=port)
    got = [(a.label, a.request.reuseaddr, a.request.reuseport, str(a.request.addr), a.works) for a in alts]
    assert got == [
        ("as asked", False, False, "0.0.0.0", False),
        ("with SO_REUSEADDR", True, False, "0.0.0.0", True),
        ("with SO_REUSEPORT", False, True, "0.0.0.0", False),
        ("with SO_REUSEADDR and SO_REUSEPORT", True, True, "0.0.0.0", True),
        ("on 127.0.0.2", False, False, "127.0.0.2", True),
    ]
    assert all(a.outcome == _evaluate(a.request, hs, S, port=port) for a in alts)
    # ``works`` overrides what works for the other address (why passes the kernel's trial).
    tried = alternatives(req(), hs, S, port=port, works=lambda a: str(a.request.addr) == "::1")
    assert [a.label for a in tried][-1] == "on [::1]"


ADDRS = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "::", "::1", "::ffff:127.0.0.1", "::ffff:0.0.0.0"]
STATES = [State.LISTEN, State.BOUND_INACTIVE, State.ESTABLISHED, State.CLOSE_WAIT]


@st.composite
def holders(draw: st.DrawFn, proto: Proto | None = None) -> Holder:
    p = draw(st.sampled_from([Proto.TCP, Proto.UDP])) if proto is None else proto
    a = draw(st.sampled_from(ADDRS))
    v6 = draw(st.booleans()) if a == "::" else None
    if p is Proto.UDP:
        r = rec(a, State.CLOSE, proto=p, uid=draw(st.sampled_from([0, 65534])), v6only=v6)
    elif draw(st.booleans()):
        r = tw("127.0.0.1" if ":" not in a else "::1")
    else:
        r = rec(a, draw(st.sampled_from(STATES)), uid=draw(st.sampled_from([0, 65534])), v6only=v6)
    return h(r, draw(st.booleans()), draw(st.booleans()), v6)


@st.composite
def requests(draw: st.DrawFn, proto: Proto | None = None) -> BindRequest:
    a = draw(st.sampled_from(ADDRS))
    return req(
        a,
        proto=draw(st.sampled_from([Proto.TCP, Proto.UDP])) if proto is None else proto,
        reuseaddr=draw(st.booleans()),
        reuseport=draw(st.booleans()),
        uid=draw(st.sampled_from([0, 65534])),
        v6only=draw(st.booleans()) if a == "::" else None,
    )


@given(st.sampled_from(ADDRS), st.booleans(), st.sampled_from(ADDRS), st.booleans())
def test_overlap_is_symmetric(a: str, av6: bool, b: str, bv6: bool) -> None:
    assert overlap(ip_address(a), av6, ip_address(b), bv6) == overlap(ip_address(b), bv6, ip_address(a), av6)


@given(requests(Proto.UDP), st.lists(holders(Proto.TCP), max_size=4))
def test_tcp_and_udp_never_interfere(r: BindRequest, hs: list[Holder]) -> None:
    assert evaluate(r, hs, S).verdict is Verdict.OK


@given(requests(Proto.TCP), st.lists(holders(), max_size=3))
def test_other_port_or_netns_is_invisible(r: BindRequest, hs: list[Holder]) -> None:
    # Holders on another port (another bucket; another netns is never in the list at all).
    moved = [
        Holder(SocketRecord(**{**_fields(x.socket), "local": Endpoint(x.socket.local.addr, P + 1)}), x.opts)
        for x in hs
    ]
    assert evaluate(r, moved, S).verdict is Verdict.OK


def _fields(r: SocketRecord) -> dict[str, object]:
    return {f: getattr(r, f) for f in SocketRecord.__dataclass_fields__}


@given(
    st.sampled_from(ADDRS),
    st.sampled_from(ADDRS),
    st.booleans(),
    st.booleans(),
    st.just(State.BOUND_INACTIVE),
)
def test_plain_non_listening_sockets_conflict_symmetrically(
    a: str, b: str, ra: bool, rp: bool, state: State
) -> None:
    """Between two same-uid non-listening TCP sockets the rule is symmetric (no LISTEN, no TW)."""
    ab = verdict(req(a, reuseaddr=ra, reuseport=rp, listen=False), h(rec(b, state), ra, rp))
    ba = verdict(req(b, reuseaddr=ra, reuseport=rp, listen=False), h(rec(a, state), ra, rp))
    assert ab == ba


@given(requests(), holders())
def test_unknown_flag_depends_only_when_it_matters(r: BindRequest, x: Holder) -> None:
    v6 = True if x.opts.v6only is None else x.opts.v6only  # only the two SO_ flags are unknown here
    known = {
        evaluate(r, [Holder(x.socket, SockOpts(ra, rp, v6))], S).verdict
        for ra in (False, True)
        for rp in (False, True)
    }
    unknown = evaluate(r, [Holder(x.socket, SockOpts(None, None, v6))], S).verdict
    assert (unknown is Verdict.DEPENDS) == (len(known) == 2)
    if len(known) == 1:
        assert unknown in known


@given(requests(Proto.TCP), st.lists(holders(Proto.TCP), max_size=4))
def test_listen_never_fails_where_bind_alone_would_not_with_the_same_holders(
    r: BindRequest, hs: list[Holder]
) -> None:
    """With nothing changing in between, listen() repeats bind()'s check (inet_csk_listen_start)."""
    bind_only = evaluate(
        BindRequest(**{**{f: getattr(r, f) for f in BindRequest.__dataclass_fields__}, "listen": False}),
        hs,
        S,
    )
    full = evaluate(r, hs, S)
    if bind_only.verdict is Verdict.OK:
        assert full.verdict is Verdict.OK


# --------------------------------------------------------------------------------------------
# Issue 17: rules that differ between kernel builds, and kernel state nobody read.

UDP_PLAIN = h(rec("127.0.0.1", State.CLOSE, proto=Proto.UDP))
UDP_SHARED = h(rec("127.0.0.2", State.CLOSE, proto=Proto.UDP), rp=True)
UDP_WILD = req(proto=Proto.UDP, reuseport=True)


@pytest.mark.parametrize("order", [[UDP_PLAIN, UDP_SHARED], [UDP_SHARED, UDP_PLAIN]])
def test_udp_every_socket_rule_refuses_in_any_order(order: list[Holder]) -> None:
    """6.18.44-fc: no early stop, the plain 127.0.0.1 refuses 0.0.0.0 whatever the chain says."""
    every = KernelSettings(udp_first_match=False)
    out = evaluate(UDP_WILD, udp_chain_order(order), every)
    assert out.verdict is Verdict.FAIL and out.blockers[0].holder is UDP_PLAIN
    assert not any("never checked" in n for n in out.notes)


def test_udp_rule_not_calibrated_is_depends_only_where_builds_differ() -> None:
    unknown = KernelSettings()
    out = evaluate(UDP_WILD, udp_chain_order([UDP_PLAIN, UDP_SHARED]), unknown)
    assert out.verdict is Verdict.DEPENDS
    assert Flag.UDP_RULE in out.blockers[0].decided_by and any("calibrate" in n for n in out.notes)
    # Both rules agree when the plain socket comes first in the chain.
    assert evaluate(UDP_WILD, udp_chain_order([UDP_SHARED, UDP_PLAIN]), unknown).verdict is Verdict.FAIL
    assert evaluate(UDP_WILD, [UDP_SHARED], unknown).verdict is Verdict.OK


def test_udp_chain_order_unknown_is_depends_under_the_early_stop() -> None:
    unknown_order = PortState(BucketState.of_cache(None), udp_chain_order=False)
    out = evaluate(UDP_WILD, [UDP_PLAIN, UDP_SHARED], S, port=unknown_order)
    assert out.verdict is Verdict.DEPENDS and Flag.CHAIN_ORDER in out.blockers[0].decided_by
    every = KernelSettings(udp_first_match=False)
    assert evaluate(UDP_WILD, [UDP_SHARED, UDP_PLAIN], every, port=unknown_order).verdict is Verdict.FAIL


def test_unknown_bucket_never_gives_an_optimistic_or_wrong_fail() -> None:
    """The SO_REUSEPORT cache may outlive the flag (cleared after bind): unknown is DEPENDS."""
    cleared = h(rec("127.0.0.1", State.BOUND_INACTIVE), True, False)
    r = req("127.0.0.1", reuseport=True)
    out = _evaluate(r, [cleared], S)  # no port state: nothing read
    assert out.verdict is Verdict.DEPENDS and out.blockers[0].decided_by == (Flag.BUCKET,)
    assert "cleared the flag or closed" in " ".join(out.notes)
    assert "depends on the port's" not in " ".join(out.notes)  # not a flag *of the holder*
    # Without SO_REUSEPORT no fast path applies (fastreuse is dead since 6.8): a certain FAIL.
    assert _evaluate(req("127.0.0.1", reuseaddr=True), [h(rec("127.0.0.1"))], S).verdict is Verdict.FAIL
    # listen() after our own SO_REUSEPORT bind: the cache covers us whatever it was.
    assert _evaluate(req("127.0.0.2", reuseport=True), [cleared], S).verdict is Verdict.OK


def test_bucket_fields_decide_the_fast_path() -> None:
    cleared = h(rec("127.0.0.1", State.BOUND_INACTIVE), True, False)
    r = req("127.0.0.1", reuseport=True)
    strict = BucketState(0, 2, 0, ip_address("127.0.0.1"), False)
    assert _evaluate(r, [cleared], S, port=PortState(strict)).verdict is Verdict.OK
    assert _evaluate(r, [cleared], S, port=PortState(BucketState(0, 0))).verdict is Verdict.FAIL
    other_addr = BucketState(0, 2, 0, ip_address("127.0.0.2"), False)
    assert _evaluate(r, [cleared], S, port=PortState(other_addr)).verdict is Verdict.FAIL
    any_addr = BucketState(0, 1, 0, ip_address("127.0.0.2"), False)  # FASTREUSEPORT_ANY
    assert _evaluate(r, [cleared], S, port=PortState(any_addr)).verdict is Verdict.OK
    other_uid = BucketState(0, 2, 7, ip_address("127.0.0.1"), False)
    assert _evaluate(r, [cleared], S, port=PortState(other_uid)).verdict is Verdict.FAIL
    no_uid = BucketState(0, 2, None, ip_address("127.0.0.1"), False)
    assert _evaluate(r, [cleared], S, port=PortState(no_uid)).verdict is Verdict.DEPENDS


def test_subnet_broadcast_is_bindable() -> None:
    """inet_addr_valid_or_nonlocal accepts RTN_BROADCAST (10.9.0.255 beside 10.9.0.1/24)."""
    known = KernelSettings(
        local_addresses=frozenset({ip_address("10.9.0.1")}),
        broadcast_addresses=frozenset({ip_address("10.9.0.255")}),  # type: ignore[arg-type]
    )
    assert evaluate(req("10.9.0.255"), [], known).verdict is Verdict.OK
    assert evaluate(req("10.9.0.0"), [], known).errno == 99
