"""`why --connect`'s kernel origin read, without a kernel: which ports and sockets it asks about
(kernel/connect_origin.py: origin_ports, origin_plan, lookup_tuple) and how the answers land on
the holders (merge_origins). The kernel side is tests/kernel/test_connect_origin_kernel.py."""

from __future__ import annotations

import gc
from ipaddress import IPv4Address, IPv6Address

from rebind.gcpause import gc_paused
from rebind.kernel.connect_origin import (
    Draft,
    OriginFacts,
    lookup_tuple,
    merge_origins,
    origin_plan,
    origin_ports,
)
from rebind.model.connect import PortHolder
from rebind.model.records import State
from rebind.model.sockstate import SockKind, SockState
from tests.unit.test_connect_model import hold, rec, req

OTHER = ("127.0.0.1", 9001)


def test_ambiguous_ports_are_asked_about_and_one_socket_each_leads_to_the_bucket() -> None:
    hs = [
        hold(rec(40000, remote=OTHER, state=State.SYN_RECV), explicit=None),
        hold(rec(40000, remote=OTHER, state=State.TIME_WAIT, left_ms=1000), explicit=None),
        hold(rec(40000, remote=OTHER), explicit=None),  # a full connection: the surest
        hold(rec(40001, remote=OTHER, state=State.TIME_WAIT, left_ms=1000), explicit=None),
        hold(rec(8080, remote=("0.0.0.0", 0), state=State.LISTEN), explicit=True),
        hold(rec(40002), explicit=True),  # explicit: no question
    ]
    r = req()
    ports = origin_ports(r, hs)
    assert ports == {40000, 40001}
    plan = origin_plan(r, hs, ports)
    assert plan.reps == {40000: hs[2].socket, 40001: hs[3].socket}
    assert plan.walk == frozenset()
    assert plan.stamps == ()  # no time-wait entry to the destination


def test_time_waits_to_the_destination_are_looked_up_for_their_timestamps() -> None:
    hs = [
        hold(rec(40000, state=State.TIME_WAIT, left_ms=1000), explicit=None),  # to 127.0.0.1:9000
        hold(rec(40000, remote=OTHER, state=State.TIME_WAIT, left_ms=1000), explicit=None),
        hold(rec(40001, remote=OTHER), explicit=None),
    ]
    r = req()
    plan = origin_plan(r, hs, origin_ports(r, hs))
    assert plan.stamps == (0,)
    assert set(plan.reps) == {40000, 40001}


def test_the_fixed_local_port_is_walked_and_a_port_without_a_connected_socket_too() -> None:
    hs = [
        hold(rec(40000, remote=OTHER), explicit=None),
        hold(rec(40003, remote=("0.0.0.0", 0), state=State.BOUND_INACTIVE), explicit=True),
        hold(rec(41000, state=State.TIME_WAIT, left_ms=1000), explicit=True),
    ]
    r = req(local_port=40003)
    ports = origin_ports(r, hs)
    assert ports == {40000, 40003}  # its holder's SO_REUSEADDR is unknown (C19)
    plan = origin_plan(r, hs, ports | {40005})
    assert plan.walk == frozenset({40003, 40005})
    assert set(plan.reps) == {40000}


def test_lookup_tuples_hash_ipv4_talking_ipv6_sockets_by_their_ipv4_addresses() -> None:
    v4 = rec(40000, remote=OTHER)
    assert lookup_tuple(v4) == (40000, IPv4Address("127.0.0.1").packed, IPv4Address("127.0.0.1").packed, 9001)
    mapped = rec(40001, local="::ffff:127.0.0.1", remote=("::ffff:127.0.0.2", 9001))
    assert lookup_tuple(mapped) == (40001, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2]), 9001)
    v6 = rec(40002, local="::1", remote=("::1", 9001))
    assert lookup_tuple(v6) == (40002, IPv6Address("::1").packed, IPv6Address("::1").packed, 9001)


def _tw_state(stamp: int) -> SockState:
    r = rec(40001, state=State.TIME_WAIT, left_ms=1000)
    return SockState.make(
        proto=r.proto, family=r.family, state=r.state, kind=SockKind.TIMEWAIT, local=r.local,
        remote=r.remote, cookie=7, netns=1, uid=None, sk_uid=None, bound_dev_if=0, reuse=1,
        reuseport=False, ipv6only=False, userlocks=None, tw_ts_recent_stamp=stamp,
    )  # fmt: skip


def test_merge_keeps_untouched_holders_and_fills_what_the_kernel_said() -> None:
    hs = (
        hold(rec(40000, remote=OTHER), explicit=None),
        hold(rec(40001, remote=OTHER), explicit=None),
        hold(rec(40002, remote=OTHER), explicit=True),  # not asked about: kept as it is
        hold(rec(40003, state=State.TIME_WAIT, left_ms=1000), explicit=None),
    )
    got = OriginFacts({40000: True, 40001: False}, stamps={3: False})
    out = merge_origins(hs, {40000, 40001, 40003}, got)
    assert out[0].bucket_connect_only is True and out[0].port_from_bind is False
    assert out[1].bucket_connect_only is False and out[1].port_from_bind is True
    assert out[2] is hs[2]
    assert out[3].timestamps is False and out[3].bucket_connect_only is None  # unknown stays so
    assert out[3].port_from_bind is None
    # a port nothing was learnt about keeps its holders as they are (no copy)
    assert merge_origins(hs, {40002}, OriginFacts({}))[2] is hs[2]


def test_merge_of_a_walked_port_takes_each_socket_s_own_facts() -> None:
    tw = rec(40001, state=State.TIME_WAIT, left_ms=1000)
    tw = type(tw)(**{**{f: getattr(tw, f) for f in tw.__slots__}, "cookie": 7})  # type: ignore[arg-type]
    hs = (hold(tw, explicit=None),)
    got = OriginFacts({40001: True}, walked=frozenset({40001}), by_cookie={7: _tw_state(1234)})
    (h,) = merge_origins(hs, {40001}, got)
    assert (h.timestamps, h.reuseaddr, h.reuseport, h.bind_port_locked) == (True, True, False, None)
    assert h.bucket_connect_only is True


def test_drafts_become_the_same_holders_as_port_holders_would() -> None:
    """gather hands merge_origins Drafts (each PortHolder built once): same answers, and every
    holder out is a PortHolder, learnt about or not."""
    hs = (
        hold(rec(40000, remote=OTHER), explicit=None),
        hold(rec(40002, remote=OTHER), explicit=True, reuseaddr=True),
        hold(rec(40003, state=State.TIME_WAIT, left_ms=1000), explicit=None),
    )
    drafts = [Draft(*(getattr(h, f) for f in PortHolder.__slots__)) for h in hs]
    got = OriginFacts({40000: True}, stamps={2: False})
    r = req()
    assert origin_ports(r, drafts) == origin_ports(r, hs)
    assert origin_plan(r, drafts, {40000, 40003}) == origin_plan(r, hs, {40000, 40003})
    out = merge_origins(drafts, {40000, 40003}, got)
    assert all(type(h) is PortHolder for h in out)
    assert out == merge_origins(hs, {40000, 40003}, got)


def test_gather_pauses_the_cyclic_gc_and_restores_its_state() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own choice stays
    finally:
        gc.enable()
