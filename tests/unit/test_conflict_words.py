"""The conflict model's sentences, whole: each kernel rule's reason, how each kind of holder is
described, what an unknown fact adds, and the UDP notes. Substring checks elsewhere let a
sentence lose its second half unnoticed (issue 21 item 6: surviving mutations)."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from rebind.model.conflict import (
    BindRequest,
    BucketState,
    Holder,
    KernelSettings,
    Outcome,
    PortState,
    ReuseportCache,
    Rule,
    SockOpts,
    Verdict,
    evaluate,
)
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State, Timer

P = 8080
KNOWN = PortState(BucketState.of_cache(None), udp_chain_order=True)
UPSTREAM = KernelSettings(udp_first_match=True)


def sock(state: State, *, proto: Proto = Proto.TCP, uid: int | None = 0, peer: int = 0) -> SocketRecord:
    mini = state in (State.TIME_WAIT, State.FIN_WAIT2) and uid is None
    return SocketRecord(
        proto,
        Family.INET,
        state,
        Endpoint(ip_address("127.0.0.1"), P),
        Endpoint(ip_address("127.0.0.1" if peer else "0.0.0.0"), peer),
        uid,
        None if mini else 7,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
    )


def hold(r: SocketRecord, ra: bool | None = False, rp: bool | None = False) -> Holder:
    return Holder(r, SockOpts(ra, rp))


def req(proto: Proto = Proto.TCP, **kw: Any) -> BindRequest:
    return BindRequest(proto, ip_address("127.0.0.1"), P, **kw)


def one(r: BindRequest, h: Holder, port: PortState | None = KNOWN, s: KernelSettings = UPSTREAM) -> Outcome:
    out = evaluate(r, [h], s, port=port)
    assert out.verdict is not Verdict.OK and len(out.blockers) == 1, out
    return out


LISTEN = "LISTEN 127.0.0.1:8080"
TW = "TIME_WAIT 127.0.0.1:8080 -> 127.0.0.1:50000"


@pytest.mark.parametrize(
    ("r", "h", "rule", "reason"),
    [
        (
            req(reuseaddr=True),
            hold(sock(State.LISTEN), ra=True),
            Rule.LISTENER_NEVER_YIELDS,
            f"{LISTEN} (with SO_REUSEADDR); a listening socket never yields to SO_REUSEADDR; only "
            "SO_REUSEPORT on both sockets (same user) shares a listener",
        ),
        (
            req(reuseaddr=True),
            hold(sock(State.TIME_WAIT, uid=None, peer=50000)),
            Rule.REUSEADDR_MISSING_OLD,
            f"{TW} left by a socket without SO_REUSEADDR; SO_REUSEADDR on your side cannot help: both "
            "sockets need it",
        ),
        (
            req(),
            hold(sock(State.BOUND_INACTIVE), ra=True),
            Rule.REUSEADDR_MISSING_NEW,
            "bound, not listening, 127.0.0.1:8080 (with SO_REUSEADDR); it has SO_REUSEADDR but your "
            "socket does not; set SO_REUSEADDR before bind()",
        ),
        (
            req(),
            hold(sock(State.LISTEN), rp=True),
            Rule.REUSEPORT_MISSING_NEW,
            f"{LISTEN} (without SO_REUSEADDR); it has SO_REUSEPORT (same user); set SO_REUSEPORT before "
            "bind() to share",
        ),
        (
            req(reuseport=True),
            hold(sock(State.BOUND_INACTIVE)),
            Rule.REUSEPORT_MISSING_OLD,
            "bound, not listening, 127.0.0.1:8080 (without SO_REUSEADDR); SO_REUSEPORT on your side "
            "cannot help: it does not have SO_REUSEPORT",
        ),
        (
            req(reuseport=True),
            hold(sock(State.LISTEN, uid=1000), rp=True),
            Rule.REUSEPORT_OTHER_UID,
            f"{LISTEN} (without SO_REUSEADDR); SO_REUSEPORT is shared only within one user: it belongs "
            "to uid 1000, yours to uid 0",
        ),
        (
            req(),
            hold(sock(State.LISTEN)),
            Rule.PLAIN_OVERLAP,
            f"{LISTEN} (without SO_REUSEADDR); its address overlaps yours and neither SO_REUSEADDR "
            "(both sides, not listening) nor SO_REUSEPORT (both sides, same user) applies",
        ),
        (
            req(Proto.UDP),
            hold(sock(State.CLOSE, proto=Proto.UDP)),
            Rule.UDP_OVERLAP,
            "UDP socket 127.0.0.1:8080 (without SO_REUSEADDR); UDP sockets share a port only if both "
            "set SO_REUSEADDR, or both set SO_REUSEPORT as the same user",
        ),
        (
            req(),
            hold(sock(State.FIN_WAIT2, uid=None, peer=50000)),
            Rule.PLAIN_OVERLAP,
            "orphaned FIN_WAIT2 (handled as TIME_WAIT) 127.0.0.1:8080 -> 127.0.0.1:50000 left by a "
            "socket without SO_REUSEADDR; its address overlaps yours and neither SO_REUSEADDR (both "
            "sides, not listening) nor SO_REUSEPORT (both sides, same user) applies",
        ),
    ],
)
def test_each_rule_has_its_whole_sentence(r: BindRequest, h: Holder, rule: Rule, reason: str) -> None:
    (b,) = one(r, h).blockers
    assert (b.rule, b.certain, b.reason) == (rule, True, reason)


def test_an_unknown_flag_is_named_in_the_reason_and_a_note() -> None:
    out = one(req(reuseaddr=True), hold(sock(State.TIME_WAIT, uid=None, peer=50000), ra=None, rp=None))
    (b,) = out.blockers
    assert b.reason == (
        f"{TW} left by a socket SO_REUSEADDR unknown; SO_REUSEADDR on your side cannot help: both "
        "sockets need it — unless its SO_REUSEADDR is what sharing needs; nobody could read it"
    )
    assert out.notes == (f"depends on the SO_REUSEADDR of {TW}: EADDRINUSE if it blocks, ok if not",)


def test_an_unknown_uid_is_an_unknown_user() -> None:
    (b,) = one(req(reuseport=True), hold(sock(State.LISTEN, uid=None), rp=True)).blockers
    assert "it belongs to an unknown user, yours to uid 0 — unless its socket uid is what" in b.reason


def test_the_unknown_bucket_is_named_as_the_ports_not_the_holders() -> None:
    out = one(req(reuseport=True), hold(sock(State.BOUND_INACTIVE)), port=None)
    (b,) = out.blockers
    assert b.reason.endswith(
        "it does not have SO_REUSEPORT — unless the port's SO_REUSEPORT cache lets the bind skip this "
        "check (unknown: no BPF iterator)"
    )
    assert out.notes == (
        "the port's SO_REUSEPORT cache (tb->fastreuseport, tb->fastuid, tb->fast_rcv_saddr) is "
        "unknown: it keeps the uid and address of the last SO_REUSEPORT bind on the port, also after "
        "that socket cleared the flag or closed, and a bind that matches it skips the conflict check "
        "(sk_reuseport_match)",
    )


def test_two_unknown_flags_of_one_holder() -> None:
    holder = hold(sock(State.BOUND_INACTIVE), None, None)
    out = evaluate(req(reuseaddr=True, reuseport=True, listen=False), [holder], UPSTREAM, port=KNOWN)
    assert out.verdict is Verdict.DEPENDS
    assert out.blockers[0].reason.endswith(
        " — unless its SO_REUSEADDR and SO_REUSEPORT is what sharing needs; nobody could read it"
    )
    assert out.notes[1:] == (
        "depends on the SO_REUSEADDR and SO_REUSEPORT of bound, not listening, 127.0.0.1:8080: "
        "EADDRINUSE if it blocks, ok if not",
    )


def test_the_fast_path_names_the_check_it_skips() -> None:
    cache = PortState(BucketState.of_cache(ReuseportCache(0, ip_address("127.0.0.1"), False)))
    out = evaluate(
        req(reuseport=True, listen=False), [hold(sock(State.BOUND_INACTIVE))], UPSTREAM, port=cache
    )
    assert out.verdict is Verdict.OK
    assert out.notes == (
        "the port's SO_REUSEPORT fast path (tb->fastreuseport: same uid and address as the last "
        "SO_REUSEPORT binder) skips the conflict check that bound, not listening, 127.0.0.1:8080 would fail",
    )


def test_whoever_listens_first_wins() -> None:
    out = evaluate(req(reuseaddr=True), [hold(sock(State.BOUND_INACTIVE), ra=True)], UPSTREAM, port=KNOWN)
    assert out.verdict is Verdict.OK
    assert out.notes == (
        "bound, not listening, 127.0.0.1:8080 shares the port through SO_REUSEADDR: whichever calls "
        "listen() first wins, the other's listen() fails with EADDRINUSE (inet_csk_listen_start "
        "checks again)",
    )


# -- UDP: the early stop, the kernel build's rule, the chain order ---------------------------------

UDP_SHARED = hold(sock(State.CLOSE, proto=Proto.UDP), rp=True)
UDP_PLAIN = hold(sock(State.CLOSE, proto=Proto.UDP, uid=1000))
UDP_RP = req(Proto.UDP, reuseport=True)
UDP_REASON = (
    "UDP socket 127.0.0.1:8080 (without SO_REUSEADDR); UDP sockets share a port only if both set "
    "SO_REUSEADDR, or both set SO_REUSEPORT as the same user"
)
EARLY_STOP = (
    "udp_lib_lport_inuse() stops at the first same-uid SO_REUSEPORT socket (UDP socket "
    "127.0.0.1:8080), so the older UDP socket 127.0.0.1:8080 is never checked"
)
BUILDS_DIFFER = (
    "kernel builds differ here: upstream udp_lib_lport_inuse() stops at the first same-uid "
    "SO_REUSEPORT socket (ok), some builds check every socket (EADDRINUSE); rebind could not "
    "calibrate this one (it needs a private network namespace: run as root once)"
)
ORDER_UNKNOWN = (
    "udp_lib_lport_inuse() stops at the first same-uid SO_REUSEPORT socket in the port's hash chain, "
    "and the chain's order is unknown (only the BPF socket iterator reads it)"
)


def test_udp_early_stop_note() -> None:
    out = evaluate(UDP_RP, [UDP_SHARED, UDP_PLAIN], UPSTREAM, port=KNOWN)
    assert out.verdict is Verdict.OK and out.notes == (EARLY_STOP,)


def test_udp_uncalibrated_build_note_and_reason() -> None:
    out = evaluate(UDP_RP, [UDP_SHARED, UDP_PLAIN], KernelSettings(), port=KNOWN)
    assert out.verdict is Verdict.DEPENDS and out.notes == (BUILDS_DIFFER,)
    (b,) = out.blockers
    assert b.reason == UDP_REASON + (
        " — unless the kernel build stops at an earlier same-uid SO_REUSEPORT socket "
        "(its UDP rule is not calibrated here)"
    )


def test_udp_unknown_chain_order_note_and_reason() -> None:
    out = evaluate(UDP_RP, [UDP_SHARED, UDP_PLAIN], UPSTREAM, port=PortState())
    assert out.verdict is Verdict.DEPENDS and out.notes == (ORDER_UNKNOWN,)
    (b,) = out.blockers
    assert b.reason == UDP_REASON + (
        " — unless the UDP hash chain puts a same-uid SO_REUSEPORT socket before it (chain order unknown)"
    )


def test_udp_rule_and_chain_order_both_unknown() -> None:
    out = evaluate(UDP_RP, [UDP_SHARED, UDP_PLAIN], KernelSettings(), port=PortState())
    assert out.verdict is Verdict.DEPENDS and out.notes == (BUILDS_DIFFER, ORDER_UNKNOWN)
    (b,) = out.blockers
    assert b.reason == UDP_REASON + (
        " — unless the kernel build stops at an earlier same-uid SO_REUSEPORT socket (its UDP rule is "
        "not calibrated here) or the UDP hash chain puts a same-uid SO_REUSEPORT socket before it "
        "(chain order unknown)"
    )
