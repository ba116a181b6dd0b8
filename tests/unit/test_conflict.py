"""The pure conflict model on the labelled rows of bind-rules.md §6 and the §1.2 matrix."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebind.model.conflict import (
    BindRequest,
    BucketState,
    Holder,
    KernelSettings,
    Outcome,
    PortState,
    Rule,
    SockOpts,
    Verdict,
    overlap,
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


def sock(
    addr: str,
    state: State = State.LISTEN,
    *,
    proto: Proto = Proto.TCP,
    uid: int | None = 0,
    v6only: bool | None = None,
    ifindex: int = 0,
) -> SocketRecord:
    a = ip_address(addr)
    mini = state is State.TIME_WAIT
    return SocketRecord(
        proto,
        Family.INET if a.version == 4 else Family.INET6,
        state,
        Endpoint(a, P),
        Endpoint(
            ip_address("127.0.0.1" if a.version == 4 else "::1"), 50000 if state is not State.LISTEN else 0
        ),
        None if mini else uid,
        None if mini else 1,
        ifindex=ifindex,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
        expires_ms=30_000 if mini else None,
        v6only=v6only if a.version == 6 else None,
    )


def req(addr: str = "0.0.0.0", **kw: object) -> BindRequest:
    return BindRequest(Proto(kw.pop("proto", Proto.TCP)), ip_address(addr), P, **kw)  # type: ignore[arg-type]


def h(rec: SocketRecord, ra: bool | None = False, rp: bool | None = False) -> Holder:
    return Holder(rec, SockOpts(ra, rp))


TW = sock("127.0.0.1", State.TIME_WAIT)


@pytest.mark.parametrize(
    ("label", "request_", "holders", "expect"),
    [
        ("a: TIME_WAIT without flag vs new SO_REUSEADDR", req(reuseaddr=True), [h(TW, False)], Verdict.FAIL),
        ("a': other loopback address", req("127.0.0.2"), [h(TW, False)], Verdict.OK),
        ("b: both SO_REUSEADDR", req(reuseaddr=True), [h(TW, True)], Verdict.OK),
        ("b': new lacks SO_REUSEADDR", req(), [h(TW, True)], Verdict.FAIL),
        ("c4: third bind while one LISTENs", req(reuseaddr=True), [h(sock("0.0.0.0"), True)], Verdict.FAIL),
        (
            "c1: both bound, not listening",
            req(reuseaddr=True),
            [h(sock("0.0.0.0", State.BOUND_INACTIVE), True)],
            Verdict.OK,
        ),
        (
            "d8: wildcard LISTEN vs specific",
            req("127.0.0.1", reuseaddr=True),
            [h(sock("0.0.0.0"), True)],
            Verdict.FAIL,
        ),
        ("e1: [::] dual vs 0.0.0.0", req(), [h(sock("::", v6only=False))], Verdict.FAIL),
        ("e5: [::] v6only vs 0.0.0.0", req(), [h(sock("::", v6only=True))], Verdict.OK),
        ("e7: [::] v6only vs ::1", req("::1"), [h(sock("::", v6only=True))], Verdict.FAIL),
        ("e6: [::] v6only vs mapped", req("::ffff:127.0.0.2"), [h(sock("::", v6only=True))], Verdict.OK),
        ("e10: 0.0.0.0 vs ::1", req("::1"), [h(sock("0.0.0.0"))], Verdict.OK),
        ("e11: 0.0.0.0 vs mapped", req("::ffff:127.0.0.1"), [h(sock("0.0.0.0"))], Verdict.FAIL),
        ("e12: [::1] v6only=0 is forced v6only", req("::1", v6only=False), [h(sock("0.0.0.0"))], Verdict.OK),
        ("f1: reuseport same uid", req(reuseport=True), [h(sock("0.0.0.0"), rp=True)], Verdict.OK),
        (
            "f2: reuseport other uid",
            req(reuseport=True, uid=65534),
            [h(sock("0.0.0.0"), rp=True)],
            Verdict.FAIL,
        ),
        (
            "f8: reuseport over other uid's TIME_WAIT",
            req(reuseport=True, uid=65534),
            [h(TW, rp=True)],
            Verdict.OK,
        ),
        ("h: devices differ", req(ifindex=2), [h(sock("0.0.0.0", ifindex=3))], Verdict.OK),
        ("h2: pinned vs unpinned", req(ifindex=2), [h(sock("0.0.0.0"))], Verdict.FAIL),
        (
            "u1: UDP no options",
            req(proto=Proto.UDP),
            [h(sock("0.0.0.0", State.CLOSE, proto=Proto.UDP))],
            Verdict.FAIL,
        ),
        (
            "u5: UDP both SO_REUSEADDR",
            req(proto=Proto.UDP, reuseaddr=True),
            [h(sock("0.0.0.0", State.CLOSE, proto=Proto.UDP), True)],
            Verdict.OK,
        ),
        (
            "u10: UDP reuseport other uid",
            req(proto=Proto.UDP, reuseport=True, uid=1),
            [h(sock("0.0.0.0", State.CLOSE, proto=Proto.UDP), rp=True)],
            Verdict.FAIL,
        ),
        ("u4: TCP and UDP never conflict", req(proto=Proto.UDP), [h(sock("0.0.0.0"))], Verdict.OK),
    ],
)
def test_rows(label, request_, holders, expect):
    assert evaluate(request_, holders, S).verdict is expect, label


def test_unknown_flag_gives_depends_and_names_it():
    out = evaluate(req(reuseaddr=True), [Holder(TW, SockOpts(None, False))], S)
    assert out.verdict is Verdict.DEPENDS and not out.blockers[0].certain
    # Without SO_REUSEADDR on the new socket the unknown flag cannot matter.
    assert evaluate(req(), [Holder(TW, SockOpts(None, None))], S).verdict is Verdict.FAIL


def test_listener_rule_and_order_of_checks():
    out = evaluate(req(reuseaddr=True), [h(sock("0.0.0.0"), True)], S)
    assert out.blockers[0].rule is Rule.LISTENER_NEVER_YIELDS and out.errno == 98
    priv = KernelSettings(cap_net_bind_service=False, local_addresses=frozenset())
    v4 = evaluate(BindRequest(Proto.TCP, ip_address("192.0.2.1"), 80), [], priv)
    assert v4.errno == 99  # IPv4: address check before privilege
    v6 = evaluate(BindRequest(Proto.TCP, ip_address("2001:db8::1"), 80), [], priv)
    assert v6.errno == 13  # IPv6: privilege first


ADDRS = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "::", "::1", "::ffff:127.0.0.1", "::ffff:0.0.0.0"]


@given(st.sampled_from(ADDRS), st.booleans(), st.sampled_from(ADDRS), st.booleans())
def test_overlap_is_symmetric(a, av6, b, bv6):
    assert overlap(ip_address(a), av6, ip_address(b), bv6) == overlap(ip_address(b), bv6, ip_address(a), av6)


@given(st.sampled_from(ADDRS), st.booleans(), st.booleans())
def test_protocols_never_interfere(addr, ra, rp):
    r = BindRequest(Proto.UDP, ip_address(addr), P, reuseaddr=ra, reuseport=rp)
    assert evaluate(r, [h(sock("0.0.0.0")), h(sock("::", v6only=False))], S).verdict is Verdict.OK


@given(st.booleans(), st.booleans(), st.sampled_from([State.LISTEN, State.BOUND_INACTIVE, State.ESTABLISHED]))
def test_depends_only_when_the_flag_matters(ra_new, rp_new, state):
    rec = sock("0.0.0.0", state)
    r = req(reuseaddr=ra_new, reuseport=rp_new)
    known = {evaluate(r, [h(rec, ra, rp)], S).verdict for ra in (False, True) for rp in (False, True)}
    unknown = evaluate(r, [Holder(rec, SockOpts(None, None))], S).verdict
    assert (unknown is Verdict.DEPENDS) == (len(known) == 2)
