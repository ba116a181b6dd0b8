"""The client-side model (rebind.model.connect), pure: no sockets, no root."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from rebind.errors import UsageError
from rebind.model.connect import (
    ConnectRequest,
    ConnectSettings,
    PortHolder,
    PortUse,
    Stage,
    Verdict,
    effective_range,
    ephemeral_overlap_warning,
    evaluate_connect,
    parse_source,
    parse_target,
)
from rebind.model.records import Endpoint, Family, Owner, Proto, SocketEntry, SocketRecord, State, Timer
from rebind.render.connect import CONNECT_SCHEMA, result_json

DST = ("127.0.0.1", 9000)
SRC = IPv4Address("127.0.0.1")


def rec(
    lport: int,
    *,
    local: str = "127.0.0.1",
    remote: tuple[str, int] = DST,
    state: State = State.ESTABLISHED,
    proto: Proto = Proto.TCP,
    left_ms: int | None = None,
    v6only: bool | None = None,
) -> SocketRecord:
    la = ip_address(local)
    fam = Family.INET if la.version == 4 else Family.INET6
    mini = state in (State.TIME_WAIT, State.FIN_WAIT2) and left_ms is not None
    return SocketRecord(
        proto=proto,
        family=fam,
        state=state,
        local=Endpoint(la, lport),
        remote=Endpoint(ip_address(remote[0]), remote[1]),
        uid=None if mini else 0,
        inode=None if mini else 1000 + lport,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
        expires_ms=left_ms,
        v6only=v6only,
    )


def hold(r: SocketRecord, explicit: bool | None = False, **kw: object) -> PortHolder:
    return PortHolder(SocketEntry(r), explicit=explicit, **kw)  # type: ignore[arg-type]


def settings(lo: int = 40000, hi: int = 40003, **kw: object) -> ConnectSettings:
    return ConnectSettings(port_range=(lo, hi), **kw)  # type: ignore[arg-type]


def req(**kw: object) -> ConnectRequest:
    return ConnectRequest.create(*DST, src=kw.pop("src", None), **kw)  # type: ignore[arg-type]


# -- the request ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kw", "msg"),
    [
        (("127.0.0.1", "²"), {}, "not a port"),
        (("127.0.0.1", 0), {}, "out of range"),
        (("127.0.0.1", 70000), {}, "out of range"),
        (("0.0.0.0", 80), {}, "wildcard"),
        (("nonsense", 80), {}, "not an IP address"),
        (("127.0.0.1", 80), {"src": "::1"}, "same address family"),
        (("127.0.0.1", 80), {"proto": "sctp"}, "tcp or udp"),
        (("127.0.0.1", 80), {"local_port": 40000, "bind_address_no_port": True}, "fixed port"),
        (("127.0.0.1", 80), {"port_range": (50000, 40000)}, "low > high"),
        (("127.0.0.1", 80), {"local_port": "x"}, "not a port"),
    ],
)
def test_bad_requests_are_usage_errors(args, kw, msg):
    with pytest.raises(UsageError, match=msg):
        ConnectRequest.create(*args, **kw)


def test_request_normalises():
    r = ConnectRequest.create("::ffff:127.0.0.1", "9000")
    assert r.dst == IPv4Address("127.0.0.1") and r.dport == 9000 and r.own_choice
    r = ConnectRequest.create("127.0.0.1", 80, local_port=0)
    assert r.bind_before_connect and r.local_port is None and not r.own_choice
    r = ConnectRequest.create("127.0.0.1", 80, bind_address_no_port=True)
    assert r.bind_before_connect and r.own_choice
    assert ConnectRequest.create("127.0.0.1", 80, port_range=(0, 0)).port_range is None
    # --from ADDR alone: the source without a port, i.e. IP_BIND_ADDRESS_NO_PORT + bind(ADDR, 0).
    r = ConnectRequest.create("127.0.0.1", 80, src="127.0.0.2")
    assert r.bind_address_no_port and r.bind_before_connect and r.own_choice


def test_parse_target_and_source():
    assert parse_target("example.org:443") == ("example.org", 443)
    assert parse_target("[::1]:80") == ("::1", 80)
    for bad in ("::1:80", "host", ":80", "[::1]80", "h:99999"):
        with pytest.raises(UsageError):
            parse_target(bad)
    assert parse_source("127.0.0.2") == (IPv4Address("127.0.0.2"), None)
    assert parse_source("127.0.0.2:40000") == (IPv4Address("127.0.0.2"), 40000)
    assert parse_source("[::1]:5") == (IPv6Address("::1"), 5)
    assert parse_source("::1") == (IPv6Address("::1"), None)


def test_effective_range_per_socket_bounds_inside_only():
    s = settings(40000, 40099)
    assert effective_range(s, None) == (40000, 40099)
    assert effective_range(s, (40010, 40020)) == (40010, 40020)
    assert effective_range(s, (30000, 40020)) == (40000, 40020)  # C3: each bound alone
    assert effective_range(s, (40010, 0)) == (40010, 40099)


# -- connect()'s own choice ---------------------------------------------------------------------


def test_empty_range_is_usable():
    res = evaluate_connect(req(), [], settings())
    assert res.outcome.verdict is Verdict.OK and res.accounting.usable == 4
    assert res.accounting.counts == {"free": 4}


def test_every_port_in_use_to_the_destination_is_eaddrnotavail():
    hs = [hold(rec(p)) for p in range(40000, 40004)]
    res = evaluate_connect(req(), hs, settings())
    assert res.outcome.verdict is Verdict.FAIL
    assert res.outcome.errno_name == "EADDRNOTAVAIL" and res.outcome.stage is Stage.CONNECT
    assert res.accounting.counts == {"in-use-to-destination": 4}
    assert res.fixes and "pool" in res.fixes[0].title.lower()


def test_connections_elsewhere_share_ports_but_bind_held_ports_do_not():
    hs = [hold(rec(p, remote=("127.0.0.1", 9001))) for p in range(40000, 40004)]
    assert evaluate_connect(req(), hs, settings()).outcome.ok  # C5: another destination
    hs = [hold(rec(p, remote=("127.0.0.1", 9001)), explicit=True) for p in range(40000, 40004)]
    res = evaluate_connect(req(), hs, settings())
    assert not res.outcome.ok  # C6: a bucket taken by bind() is skipped
    assert res.accounting.counts == {"bind-before-connect": 4}


def test_listeners_and_bound_sockets_remove_their_port():
    hs = [
        hold(rec(40000, remote=("0.0.0.0", 0), state=State.LISTEN), None),
        hold(rec(40001, local="127.0.0.2", remote=("0.0.0.0", 0), state=State.BOUND_INACTIVE), None),
    ]
    res = evaluate_connect(req(), hs, settings(), route_src=SRC)
    assert res.accounting.counts == {"listener": 1, "bound-inactive": 1, "free": 2}
    assert res.accounting.usable == 2


def test_reserved_ports_are_not_candidates():
    res = evaluate_connect(req(), [], settings(reserved=frozenset({40000, 40001, 40002, 40003})))
    assert not res.outcome.ok and res.accounting.counts == {"reserved": 4}


def tw(p: int, left: int, state: State = State.TIME_WAIT, local: str = "127.0.0.1") -> SocketRecord:
    return rec(p, state=state, left_ms=left, local=local)


@pytest.mark.parametrize(
    ("tw_reuse", "left", "state", "ts", "reusable"),
    [
        (0, 1000, State.TIME_WAIT, True, False),  # never with 0
        (1, 1000, State.TIME_WAIT, True, True),  # 59 s old
        (2, 1000, State.TIME_WAIT, True, True),  # loopback
        (1, 59_900, State.TIME_WAIT, True, False),  # 100 ms < tcp_tw_reuse_delay
        (1, 1000, State.TIME_WAIT, False, False),  # no timestamps
        (1, 1000, State.FIN_WAIT2, True, False),  # C9: orphaned FIN_WAIT2 never
    ],
)
def test_time_wait_takeover_rules(tw_reuse, left, state, ts, reusable):
    hs = [hold(tw(p, left, state), timestamps=ts) for p in range(40000, 40004)]
    res = evaluate_connect(req(), hs, settings(tw_reuse=tw_reuse))
    assert res.outcome.ok is reusable
    assert len(res.time_waits) == 4 and all(t.reusable is reusable for t in res.time_waits)
    key = PortUse.TIME_WAIT_REUSABLE if reusable else PortUse.TIME_WAIT_TO_DESTINATION
    assert res.accounting.counts == {key.value: 4}


def test_tw_reuse_2_is_loopback_only():
    s = settings(tw_reuse=2)
    r = ConnectRequest.create("10.0.0.9", 80, src="10.0.0.1")
    hs = [
        hold(
            rec(p, local="10.0.0.1", remote=("10.0.0.9", 80), state=State.TIME_WAIT, left_ms=1000),
            timestamps=True,
        )
        for p in range(40000, 40004)
    ]
    assert not evaluate_connect(r, hs, s).outcome.ok
    assert evaluate_connect(r, hs, settings(tw_reuse=1)).outcome.ok


def test_time_wait_with_unknown_timestamps_is_the_worst_case_whatever_the_sysctl():
    """Issue 17: a TIME_WAIT keeps the old connection's own timestamps (tcp_twsk_unique reads
    tw_ts_recent_stamp); tcp_timestamps now says nothing about it. Unknown -> may fail, never ok
    (was: ok with tcp_timestamps=1) and never a certain fail (was: fail with tcp_timestamps=0)."""
    hs = [hold(tw(p, 1000), timestamps=None) for p in range(40000, 40004)]
    for sysctl_ts in (1, 0):
        res = evaluate_connect(req(), hs, settings(tw_reuse=1, tcp_timestamps=sysctl_ts))
        assert res.outcome.verdict is Verdict.MAY_FAIL and res.accounting.usable == 0
        assert res.accounting.counts == {"time-wait-unknown": 4}
        assert all(t.reusable is None for t in res.time_waits)
    # Known either way: decided.
    known = [hold(tw(p, 1000), timestamps=True) for p in range(40000, 40004)]
    assert evaluate_connect(req(), known, settings(tw_reuse=1, tcp_timestamps=0)).outcome.ok
    # A fixed port over such an entry: may fail, not ok.
    t = hold(tw(40001, 59_990), explicit=True, reuseaddr=True, reuseport=False, timestamps=None)
    r = ConnectRequest.create(*DST, src="127.0.0.1", local_port=40001, reuseaddr=True)
    assert evaluate_connect(r, [t], settings()).outcome.verdict is Verdict.MAY_FAIL
    # tcp_tw_reuse=0: no takeover by connect()'s own choice with or without timestamps: decided.
    assert evaluate_connect(req(), hs, settings(tw_reuse=0)).outcome.verdict is Verdict.FAIL


def test_other_source_has_its_own_four_tuples():
    hs = [hold(rec(p)) for p in range(40000, 40004)]
    r = req(src="127.0.0.2", bind_address_no_port=True)
    assert evaluate_connect(r, hs, settings()).outcome.ok


def test_ipv6_and_ipv4_four_tuples_coexist():
    hs = [hold(rec(p, local="::1", remote=("::1", 9000))) for p in range(40000, 40004)]
    assert evaluate_connect(req(), hs, settings()).outcome.ok  # C24
    v6 = ConnectRequest.create("::1", 9000)
    assert not evaluate_connect(v6, hs, settings()).outcome.ok


def test_device_pinned_socket_does_not_match_unpinned_connect():
    r = rec(40000)
    pinned = SocketRecord(**{**{f: getattr(r, f) for f in r.__slots__}, "ifindex": 1})  # type: ignore[arg-type]
    res = evaluate_connect(req(), [hold(pinned)], settings(40000, 40000))
    assert res.outcome.ok  # C25


def test_odd_range_with_only_an_end_usable_may_fail():
    hs = [hold(rec(p)) for p in range(40000, 40004)]  # 40000-40004: only 40004 left
    res = evaluate_connect(req(), hs, settings(40000, 40004))
    assert res.outcome.verdict is Verdict.MAY_FAIL
    hs = [hold(rec(p)) for p in range(40001, 40004)]  # lo and hi both usable: always reachable
    assert evaluate_connect(req(), hs, settings(40000, 40004)).outcome.ok


def test_slow_path_when_first_parity_half_is_used_up():
    hs = [hold(rec(p)) for p in range(40000, 40010, 2)]
    res = evaluate_connect(req(), hs, settings(40000, 40009))
    assert res.outcome.ok and res.capacity is not None
    assert res.capacity.slow_path and "slow path" in res.capacity.note
    res = evaluate_connect(req(port_range=(40000, 40009)), hs, settings(40000, 40009))
    assert res.capacity is not None and not res.capacity.slow_path  # one linear walk (6.8+)


# -- bind before connect ------------------------------------------------------------------------


def test_bind_zero_needs_a_wholly_unused_port():
    hs = [hold(rec(p, remote=("127.0.0.1", 9001))) for p in range(40000, 40004)]
    r = req(src="127.0.0.1", bind_before_connect=True)
    res = evaluate_connect(r, hs, settings())
    assert res.outcome.verdict is Verdict.FAIL
    assert res.outcome.errno_name == "EADDRINUSE" and res.outcome.stage is Stage.BIND
    assert "IP_BIND_ADDRESS_NO_PORT" in res.fixes[0].title
    assert "24" in (res.fixes[0].python or "") and "IP_BIND_ADDRESS_NO_PORT" in (res.fixes[0].c or "")
    # Another address does not overlap (C13), and IP_BIND_ADDRESS_NO_PORT leaves it to connect().
    assert evaluate_connect(req(src="127.0.0.2", bind_before_connect=True), hs, settings()).outcome.ok
    assert evaluate_connect(req(src="127.0.0.1", bind_address_no_port=True), hs, settings()).outcome.ok
    # Capacity is about this destination's 4-tuples, whatever happens before connect().
    assert res.capacity is not None and res.capacity.usable_for_destination == 4


# -- fixed port ---------------------------------------------------------------------------------


def test_fixed_port_reuseaddr_client_same_destination_is_eaddrnotavail():
    h = hold(rec(40001), explicit=True, reuseaddr=True, reuseport=False)
    r = req(src="127.0.0.1", local_port=40001, reuseaddr=True)
    res = evaluate_connect(r, [h], settings())
    assert res.outcome.errno_name == "EADDRNOTAVAIL" and res.outcome.stage is Stage.CONNECT
    assert "fixed" in res.fixes[0].title.lower()
    other = ConnectRequest.create("127.0.0.1", 9001, src="127.0.0.1", local_port=40001, reuseaddr=True)
    assert evaluate_connect(other, [h], settings()).outcome.ok  # C19: another server works
    plain = req(src="127.0.0.1", local_port=40001)
    assert evaluate_connect(plain, [h], settings()).outcome.errno_name == "EADDRINUSE"


def test_fixed_port_takes_over_time_wait_with_timestamps_whatever_tw_reuse():
    t = hold(tw(40001, 59_990), explicit=True, reuseaddr=True, reuseport=False, timestamps=True)
    r = req(src="127.0.0.1", local_port=40001, reuseaddr=True)
    assert evaluate_connect(r, [t], settings(tw_reuse=0)).outcome.ok  # C17 / G4
    t = hold(tw(40001, 59_990), explicit=True, reuseaddr=True, reuseport=False, timestamps=False)
    assert evaluate_connect(r, [t], settings()).outcome.errno_name == "EADDRNOTAVAIL"  # G5


# -- UDP -----------------------------------------------------------------------------------------


def test_udp_shares_nothing_by_destination():
    hs = [
        hold(rec(p, proto=Proto.UDP, remote=("127.0.0.1", 53)), explicit=False, reuseaddr=False)
        for p in range(40000, 40004)
    ]
    r = ConnectRequest.create("127.0.0.2", 9000, proto="udp")
    res = evaluate_connect(r, hs, settings())
    assert res.outcome.errno_name == "EAGAIN" and res.capacity is None
    assert evaluate_connect(
        ConnectRequest.create("127.0.0.2", 9000, proto="udp", local_port=0), hs, settings()
    )
    both = [hold(h.socket, explicit=False, reuseaddr=True) for h in hs]
    assert evaluate_connect(
        ConnectRequest.create("127.0.0.2", 9000, proto="udp", reuseaddr=True), both, settings()
    )


def test_udp_dual_stack_client_blocks_ipv4_autobind():
    h = hold(rec(40000, proto=Proto.UDP, local="::1", remote=("::1", 53)), explicit=False)
    r = ConnectRequest.create("127.0.0.1", 53, proto="udp")
    assert evaluate_connect(r, [h], settings(40000, 40000)).outcome.errno_name == "EAGAIN"  # J8
    bound = hold(rec(40000, proto=Proto.UDP, local="::1", remote=("::", 0)), explicit=True)
    assert evaluate_connect(r, [bound], settings(40000, 40000)).outcome.ok


# -- consumers, JSON, server side ---------------------------------------------------------------


def test_consumers_ranked_and_json_escapes_process_text():
    evil = Owner(pid=7, fd=3, name="x\x1b[2Jevil", cmdline=("x\x1b]0;t\x07",), user="r\x1bt")
    calm = Owner(pid=8, fd=3, name="calm")
    hs = [PortHolder(SocketEntry(rec(p), (evil,)), explicit=False) for p in (40000, 40001)]
    hs.append(PortHolder(SocketEntry(rec(40002, remote=("0.0.0.0", 0), state=State.LISTEN), (calm,)), True))
    res = evaluate_connect(req(), hs, settings())
    assert [(c.pid, c.to_destination, c.by_bind) for c in res.consumers] == [(7, 2, 0), (8, 0, 1)]
    doc = result_json(res)
    assert doc["schema"] == CONNECT_SCHEMA
    assert "\x1b" not in str(doc) and doc["consumers"][0]["name"] == "x\\x1b[2Jevil"
    assert doc["range"]["usable"] == 1 and doc["verdict"] == "ok"
    assert doc["consumers"][0]["unit"] is None


def test_ambiguous_client_sockets_give_the_worst_case_never_ok():
    """Issue 17: a port held by a client whose port origin is unknown is not counted usable; when
    no port is surely usable the verdict is may-fail (exit 1), never ok."""
    hs = [hold(rec(p, remote=("127.0.0.1", 9001)), explicit=None) for p in range(40000, 40004)]
    res = evaluate_connect(req(), hs, settings())
    acc = res.accounting
    assert res.outcome.verdict is Verdict.MAY_FAIL and res.outcome.errno_name == "EADDRNOTAVAIL"
    assert (acc.ambiguous, acc.usable, acc.usable_worst, acc.usable_best) == (4, 0, 0, 4)
    assert acc.counts == {PortUse.UNKNOWN_ORIGIN.value: 4}
    assert "worst case" in res.headline
    # One free port left: ok in the worst case too.
    res = evaluate_connect(req(), hs[:3], settings())
    assert res.outcome.ok and res.accounting.usable == 1 and res.accounting.usable_best == 4


def test_one_bound_client_port_range_is_not_usable():
    """Issue 17: a 1-port range held by a client connected elsewhere: "1 of 1 usable" was wrong
    when that client had bound its port (connect() gets EADDRNOTAVAIL)."""
    h = rec(40000, remote=("127.0.0.1", 9001))
    unknown = evaluate_connect(req(), [hold(h, explicit=None)], settings(40000, 40000))
    assert unknown.outcome.verdict is Verdict.MAY_FAIL and unknown.accounting.usable == 0
    bound = evaluate_connect(req(), [hold(h, explicit=None, bind_port_locked=True)], settings(40000, 40000))
    assert bound.outcome.verdict is Verdict.FAIL and bound.accounting.counts == {"bind-before-connect": 1}
    # bind_port_locked=False alone proves nothing (bind(ip, 0) leaves it clear): still the worst case.
    clear = evaluate_connect(req(), [hold(h, explicit=None, bind_port_locked=False)], settings(40000, 40000))
    assert clear.outcome.verdict is Verdict.MAY_FAIL
    chosen = evaluate_connect(req(), [hold(h, explicit=None, connect_bind=True)], settings(40000, 40000))
    assert chosen.outcome.ok and chosen.accounting.counts == {"shared": 1}
    by_bind = evaluate_connect(req(), [hold(h, explicit=None, connect_bind=False)], settings(40000, 40000))
    assert by_bind.outcome.verdict is Verdict.FAIL


def test_ephemeral_overlap_warning():
    assert ephemeral_overlap_warning(8080, (32768, 60999)) is None
    assert ephemeral_overlap_warning(40000, (32768, 60999), {40000}) is None
    w = ephemeral_overlap_warning(40000, (32768, 60999), {9000})
    assert w is not None and "ip_local_reserved_ports=9000,40000" in w and "EADDRINUSE" in w


def test_reserved_ports_in_the_kernels_form_and_merged():
    from rebind.model.ephemeral import format_reserved, parse_reserved, reserve_command

    assert format_reserved({45000, 8080, *range(30000, 30012)}) == "8080,30000-30011,45000"
    assert format_reserved(()) == ""
    old = parse_reserved("30000-30010,45000")
    assert reserve_command(old, {8080, 9000}) == (
        "sysctl -w net.ipv4.ip_local_reserved_ports=8080,9000,30000-30010,45000"
    )
    assert reserve_command(old, {30005}) is None  # nothing to change: no line


def test_widened_range_never_takes_a_server_port_in():
    from rebind.model.connect import widened_range

    none: frozenset[int] = frozenset()
    assert widened_range((32768, 60999), none, none, 1024) == (15000, 64999)
    # Server ports just outside: stop short of them, keep an even count.
    lo, hi = widened_range((40000, 40009), none, frozenset({39990, 40100, 8080}), 1024)  # type: ignore[misc]
    assert (lo, hi) == (39992, 40099) and (hi - lo + 1) % 2 == 0
    # A reserved server port is no obstacle (connect() never takes it).
    assert widened_range((40000, 40009), frozenset({39990}), frozenset({39990}), 1024) == (15000, 64999)
    # Bordered on both sides: nothing to propose.
    assert widened_range((40000, 40009), none, frozenset({39999, 40010}), 1024) is None
    # ip_unprivileged_port_start above the target: the low end stays at or above it.
    assert widened_range((32768, 60999), none, none, 20000) == (20000, 64999)


def test_widen_fix_is_built_from_the_hosts_values():
    held = [
        hold(rec(p, remote=("0.0.0.0", 0), state=State.LISTEN), explicit=True) for p in range(40000, 40004)
    ]
    st = settings(reserved=frozenset({30000, 30001, 45000}))
    res = evaluate_connect(req(), held, st, servers=frozenset({40000, 40001, 40002, 40003, 39000}))
    widen = next(f for f in res.fixes if "Widen" in f.title)
    assert widen.command == (
        "sysctl -w net.ipv4.ip_local_reserved_ports=30000-30001,40000-40003,45000 && "
        "sysctl -w net.ipv4.ip_local_port_range='39002 64999'"
    )
    # Server ports unknown: no widening is guessed.
    res = evaluate_connect(req(), held, st)
    assert not any("Widen" in f.title for f in res.fixes)


def test_a_fixed_port_names_the_same_blocker_whatever_the_holders_order() -> None:
    """The fixed port's holders come in the order the table was read (the established hash's,
    or the bind hash's for `rebind trace`): the blocker named is a live socket before a
    time-wait entry, then by its endpoints, in both orders."""
    r = req(src="127.0.0.1", local_port=40001)
    tw = hold(rec(40001, remote=("127.0.0.1", 9002), state=State.FIN_WAIT2, left_ms=5000), reuseaddr=False)
    live = hold(rec(40001, remote=("127.0.0.1", 9001)), reuseaddr=False)
    a = evaluate_connect(r, [tw, live], settings(), route_src=SRC)
    b = evaluate_connect(r, [live, tw], settings(), route_src=SRC)
    assert a.outcome.errno_name == "EADDRINUSE"
    assert a.outcome.explanation == b.outcome.explanation
    assert "ESTABLISHED 127.0.0.1:40001 -> 127.0.0.1:9001" in a.outcome.explanation
