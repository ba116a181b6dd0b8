"""The conflict model against the kernel: random scenarios (bench/oracle_lib.py) and focused tests for
the behaviours the oracle found that bind-rules.md does not describe."""

from __future__ import annotations

import os
import socket
from ipaddress import ip_address

import pytest
from bench.oracle_lib import (
    SETTINGS,
    Existing,
    Kind,
    Lab,
    ListenMode,
    Probe,
    Scenario,
    Spec,
    run_asking,
    run_scenarios,
)

from rebind.kernel.netns import private_netns
from rebind.model.conflict import Verdict
from rebind.model.records import Proto

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
T, U = Proto.TCP, Proto.UDP


def spec(
    proto: Proto, addr: str, ra: bool = False, rp: bool = False, uid: int = 0, v6only: bool | None = None
) -> Spec:
    return Spec(proto, addr, v6only, ra, rp, uid)


def run_one(
    existing: list[Existing], probes: list[Probe], port: int = 20000
) -> list[tuple[Verdict, int | None, bool]]:
    with Lab() as lab:
        checks = lab.run(Scenario(0, port, tuple(existing), tuple(probes)))
    for c in checks:
        assert c.agree, str(c)
    return [(c.predicted.verdict, c.actual, c.agree) for c in checks]


def test_random_scenarios_agree_with_the_kernel(netns: int) -> None:
    seed = int(os.environ.get("REBIND_ORACLE_SEED", "20240611"))
    count = int(os.environ.get("REBIND_ORACLE_SCENARIOS", "400"))
    # Half in the fixture's namespace, half in a fresh one (new bucket tables, new uid helper).
    checks = list(run_scenarios(count // 2, seed))
    with private_netns():
        checks += list(run_scenarios(count - count // 2, seed + 1, start=count // 2))
    bad = [c for c in checks if not c.agree]
    assert len(checks) >= count
    assert not bad, "\n\n".join(str(c) for c in bad[:10])


def test_oracle_covers_both_stages_and_outcomes(netns: int) -> None:
    checks = list(run_scenarios(150, 3))
    kinds = {(c.stage.value, c.actual is None) for c in checks}
    assert {("bind", True), ("bind", False), ("listen", True), ("listen", False)} <= kinds


def test_udp_lport_inuse_rule_is_the_calibrated_one(netns: int) -> None:
    """Plain 127.0.0.1, then SO_REUSEPORT 127.0.0.2, then SO_REUSEPORT 0.0.0.0: upstream stops at
    the first same-uid SO_REUSEPORT socket in the chain (ok), some 6.18.44 builds check every
    socket (EADDRINUSE). The calibrated model agrees with the real bind in both bind orders,
    whichever build runs this (run_one asserts model == kernel)."""
    assert SETTINGS.udp_first_match is not None, "root can always calibrate in a private netns"
    plain, shared = spec(U, "127.0.0.1"), spec(U, "127.0.0.2", rp=True)
    n = Probe(spec(U, "0.0.0.0", rp=True), ListenMode.NEVER)
    first = run_one([Existing(plain, Kind.UDP), Existing(shared, Kind.UDP)], [n], 20001)[0]
    assert first[:2] == ((Verdict.OK, None) if SETTINGS.udp_first_match else (Verdict.FAIL, 98))
    # The other order: the plain socket is met first under both rules.
    assert run_one([Existing(shared, Kind.UDP), Existing(plain, Kind.UDP)], [n], 20002)[0][:2] == (
        Verdict.FAIL,
        98,
    )


def test_calibration_matches_a_plain_experiment_and_leaves_this_namespace_alone(netns: int) -> None:
    """The cached/calibrated rule equals what three plain binds here show; running the experiment
    binds nothing in this namespace and leaves this thread in it."""
    from rebind.kernel.calibrate import run_experiments
    from rebind.kernel.diag import iter_sockets

    here = os.stat("/proc/thread-self/ns/net").st_ino
    before = sorted(str(r.local) for r in iter_sockets())
    fresh = run_experiments()
    assert fresh is not None and fresh.udp_first_match == SETTINGS.udp_first_match
    assert os.stat("/proc/thread-self/ns/net").st_ino == here
    assert sorted(str(r.local) for r in iter_sockets()) == before
    socks = []
    try:
        for addr, rp in (("127.0.0.1", False), ("127.0.0.2", True)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            if rp:
                s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            s.bind((addr, 20050))
        n = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(n)
        n.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        try:
            n.bind(("0.0.0.0", 20050))
            early_stop = True
        except OSError:
            early_stop = False
    finally:
        for s in socks:
            s.close()
    assert early_stop is SETTINGS.udp_first_match


def test_udp_ipv6_reuseport_sockets_go_to_the_chain_tail(netns: int) -> None:
    """sk_add_node_tail_rcu: the older [::1] (other uid) is still met first by [::]."""
    probes = [
        Probe(spec(U, "::1", rp=True, uid=65534), ListenMode.NEVER),
        Probe(spec(U, "::ffff:127.0.0.1", rp=True), ListenMode.NEVER),
        Probe(spec(U, "::", rp=True), ListenMode.NEVER),
    ]
    assert [r[:2] for r in run_one([], probes, 20003)] == [
        (Verdict.OK, None),
        (Verdict.OK, None),
        (Verdict.FAIL, 98),
    ]


def test_tcp_reuseport_fast_path_skips_the_per_socket_check(netns: int) -> None:
    """A REUSEADDR-only bound socket, then REUSEADDR+REUSEPORT: a REUSEPORT-only bind then succeeds."""
    existing = [
        Existing(spec(T, "127.0.0.1", ra=True), Kind.BOUND),
        Existing(spec(T, "127.0.0.1", ra=True, rp=True), Kind.BOUND),
    ]
    out = run_one(existing, [Probe(spec(T, "127.0.0.1", rp=True), ListenMode.NOW)], 20004)
    assert out[0][:2] == (Verdict.OK, None)


def test_tcp_fast_path_skips_the_address_any_buckets_too(netns: int) -> None:
    """check_bind_conflict=false: a REUSEADDR-only 0.0.0.0 is not checked either (seed 42 finding)."""
    existing = [
        Existing(spec(T, "0.0.0.0", ra=True), Kind.BOUND),
        Existing(spec(T, "::ffff:127.0.0.1", ra=True, rp=True), Kind.BOUND),
    ]
    probes = [Probe(spec(T, "127.0.0.1", rp=True), ListenMode.NEVER)]
    assert run_one(existing, probes, 20040)[0][:2] == (Verdict.OK, None)


def test_tcp_fast_path_lets_dual_stack_wildcard_pass_an_ipv6_listener(netns: int) -> None:
    existing = [Existing(spec(T, "::1"), Kind.LISTEN), Existing(spec(T, "0.0.0.0", rp=True), Kind.BOUND)]
    out = run_one(existing, [Probe(spec(T, "::", rp=True, v6only=False), ListenMode.NEVER)], 20005)
    assert out[0][:2] == (Verdict.OK, None)


@pytest.mark.parametrize("kind", [Kind.CHILD, Kind.TIME_WAIT, Kind.FIN_WAIT2])
def test_child_of_dual_stack_listener_on_ipv6_loopback_blocks_ipv4_wildcard(netns: int, kind: Kind) -> None:
    """The child keeps the listener's ipv6only=0, so its [::1] still matches 0.0.0.0."""
    # v6only unset (default 0): the test client dials ::1, so the child sits on [::1].
    existing = [Existing(spec(T, "::"), kind, keep_listener=False)]
    out = run_one(existing, [Probe(spec(T, "0.0.0.0", ra=True), ListenMode.NEVER)], 20006 + len(kind))
    assert out[0][:2] == (Verdict.FAIL, 98)
    ok = run_one(existing, [Probe(spec(T, "127.0.0.1"), ListenMode.NEVER)], 20020 + len(kind))
    assert ok[0][:2] == (Verdict.OK, None)


def test_second_listen_fails_c3(netns: int) -> None:
    probes = [
        Probe(spec(T, "0.0.0.0", ra=True), ListenMode.LATER),
        Probe(spec(T, "0.0.0.0", ra=True), ListenMode.NOW),
    ]
    out = run_one([], probes, 20030)
    assert out == [(Verdict.OK, None, True), (Verdict.OK, None, True), (Verdict.FAIL, 98, True)]


def test_address_not_local(netns: int) -> None:
    out = run_one(
        [],
        [Probe(spec(T, "192.0.2.1"), ListenMode.NEVER), Probe(spec(T, "2001:db8::1"), ListenMode.NEVER)],
        20031,
    )
    assert [r[:2] for r in out] == [(Verdict.FAIL, 99), (Verdict.FAIL, 99)]
    assert SETTINGS.local_addresses is not None and ip_address("::1") in SETTINGS.local_addresses


def test_asking_never_changes_the_answer(netns: int) -> None:
    """The user's real bind gives the same result with and without `rebind why` just before it,
    and why's verdict, headline and bindable (so exit code and JSON) agree. Benchmark: 2,000+."""
    count = int(os.environ.get("REBIND_ASKING_SCENARIOS", "150"))
    with Lab() as lab:
        checks = list(run_asking(count, 2026, lab=lab))
    bad = [c for c in checks if not c.same or not c.consistent or c.wrong]
    assert len(checks) == count and sum(c.unstable for c in checks) <= count // 20
    assert not bad, "\n\n".join(str(c) for c in bad[:10])


def test_asking_leaves_the_reuseport_cache_for_every_later_bind(netns: int) -> None:
    """Issue 17: 127.0.0.1 bound with SO_REUSEADDR, then with SO_REUSEADDR+SO_REUSEPORT (the
    bucket's SO_REUSEPORT cache now holds 127.0.0.1); `why --addr 127.0.0.2` must not take that
    cache away from a later SO_REUSEPORT bind on 127.0.0.1."""
    from rebind.diagnosis import diagnose
    from rebind.model.request import BindRequest

    port = 20060
    held = []
    for rp in (False, True):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rp:
            s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        held.append(s)
    try:
        for asked in (
            BindRequest.create(port, addr="127.0.0.2"),
            BindRequest.create(port, addr="127.0.0.2", reuseport=True),
        ):
            diagnose(asked)
            later = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(later)
            later.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            later.bind(("127.0.0.1", port))  # the cache's fast path: it works without the why
            held.remove(later)
            later.close()
    finally:
        for s in held:
            s.close()


def test_dual_stack_udp_client_on_ipv6_loopback_overlaps_only_the_ipv4_wildcard_and_127_0_0_6(
    netns: int,
) -> None:
    """An IPv6 UDP socket with ipv6only 0 that connect() autobound to [::1]:P has sk_rcv_saddr
    LOOPBACK4_IPV6 (ip6_datagram_connect): an IPv4 bind on P conflicts for 0.0.0.0 and 127.0.0.6
    only. The model once gave it sk_rcv_saddr 0 and called 127.0.0.1 busy."""
    from rebind.kernel.facts import gather
    from rebind.model.advice import advise
    from rebind.model.request import BindRequest

    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    client.connect(("::1", 9))
    port = client.getsockname()[1]
    try:
        seen = {}
        for addr in ("127.0.0.1", "127.0.0.6", "0.0.0.0"):
            req = BindRequest(proto=U, addr=ip_address(addr), port=port)
            predicted = advise(gather(req, owners=False, trials=False)).bindable
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind((addr, port))
                actual = True
            except OSError:
                actual = False
            finally:
                probe.close()
            seen[addr] = (predicted, actual)
        assert seen == {"127.0.0.1": (True, True), "127.0.0.6": (False, False), "0.0.0.0": (False, False)}
    finally:
        client.close()
