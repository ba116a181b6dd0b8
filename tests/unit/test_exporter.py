"""`rebind exporter`, pure parts: bytecode, judgements, metric families, caching, textfile, CLI input."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from rebind.errors import EnvironmentProblem, UsageError
from rebind.exporter import bytecode as bc
from rebind.exporter.collector import RebindCollector
from rebind.exporter.connect_counts import bind_held_ports, connect_counts
from rebind.exporter.facts import Dest, EphemeralRange, Missing, PortKey, Reason, ServerFlags, Snapshot, Watch
from rebind.exporter.families import families
from rebind.exporter.port_stats import (
    WarningKind,
    config_warnings,
    frees_in_seconds,
    listener_groups,
    state_counts,
)
from rebind.exporter.restart import (
    assess_restart,
    bindable_value,
    missing_facts,
    port_holders,
    restart_answers,
    server_flags,
)
from rebind.exporter.serve import parse_listen, registry_with, write_atomic
from rebind.exporter.tally import Tally
from rebind.kernel.diag_codec import BC_OP, BcOp, port_filter
from rebind.model.assess import BindNow, Provenance
from rebind.model.conflict import KernelSettings, SockOpts
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State, Timer
from rebind.model.sockstate import BindBucket, SockKind, SockState

ANY4 = IPv4Address("0.0.0.0")
LO = IPv4Address("127.0.0.1")
SETTINGS = KernelSettings()


def rec(
    state: State,
    local: tuple[str, int],
    remote: tuple[str, int] = ("0.0.0.0", 0),
    *,
    proto: Proto = Proto.TCP,
    rq: int = 0,
    wq: int = 0,
    expires: int | None = None,
    uid: int | None = 1000,
) -> SocketRecord:
    la, ra = ip_address(local[0]), ip_address(remote[0])
    fam = Family.INET if la.version == 4 else Family.INET6
    mini = state is State.TIME_WAIT
    return SocketRecord(
        proto=proto,
        family=fam,
        state=state,
        local=Endpoint(la, local[1]),
        remote=Endpoint(ra, remote[1]),
        uid=None if mini else uid,
        inode=None if mini else 1,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
        expires_ms=expires if mini else None,
        v6only=True if fam is Family.INET6 and state is State.LISTEN else None,
        rqueue=rq,
        wqueue=wq,
    )


def listener(addr: str = "0.0.0.0", port: int = 8080, rq: int = 0, wq: int = 128) -> SocketRecord:
    return rec(State.LISTEN, (addr, port), rq=rq, wq=wq)


def snap_of(
    records: list[SocketRecord], watches: tuple[Watch, ...], dests: tuple[Dest, ...] = (), **kw: object
) -> Snapshot:
    """A snapshot as the gatherer builds it: records through a Tally."""
    t = Tally(watches, dests)
    watched = t.records(records)
    fields: dict[str, object] = dict(
        watches=watches,
        dests=dests,
        watched=tuple(watched),
        counts=tuple(t.counts.items()),
        tw_expires_ms=tuple(t.tw_max.items()),
        usage=t.dest_usage(),
        peers=t.peers(),
    )
    fields.update(kw)
    return Snapshot(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Bytecode


def test_any_of_single_port_terms_is_the_codecs_port_filter() -> None:
    for ports in ([80], [80, 443], [1, 2, 3, 65535]):
        assert bc.any_of([[bc.sport_eq(p)] for p in ports]) == port_filter(ports)


def test_any_of_jumps_land_on_term_starts_and_the_end() -> None:
    code = bc.any_of([[bc.remote_is(LO, 5432)], [bc.sport_ge(40000), bc.sport_le(40009)]])
    # Walk every op: each `no` must land on the start of a later term or at end + 4 (reject);
    # each JMP's `no` exactly on the end (accept).
    offsets, off = [], 0
    while off < len(code):
        kind, yes, no = BC_OP.unpack_from(code, off)
        offsets.append((off, BcOp(kind), yes, no))
        off += yes if kind != BcOp.JMP else 4
    assert off == len(code)
    starts = {0, offsets[2][0]}  # second term starts after the D_COND op and its JMP
    for at, kind, _yes, no in offsets:
        target = at + no
        if kind is BcOp.JMP:
            assert target == len(code)
        else:
            assert target in starts or target == len(code) + 4
    d_cond = offsets[0]
    assert d_cond[1] is BcOp.D_COND and d_cond[2] == 4 + 8 + 4


def _bc_run(code: bytes, holds: dict[BcOp, bool]) -> bool:
    """inet_diag_bc_run over ops whose outcome is given per op code (JMP always takes ``no``)."""
    off = 0
    while off < len(code):
        kind, yes, no = BC_OP.unpack_from(code, off)
        off += yes if kind != BcOp.JMP and holds[BcOp(kind)] else no
    return off == len(code)


def _bc_audit(code: bytes) -> bool:
    """inet_diag_bc_audit: the ``yes`` chain lands exactly on the end; every ``no`` lands on it,
    on the end, or 4 past it (valid_cc is not modelled: the term starts are checked elsewhere)."""
    off = 0
    while off < len(code):
        _kind, yes, no = BC_OP.unpack_from(code, off)
        if not (4 <= no <= len(code) - off + 4 and 4 <= yes <= len(code) - off + 4):
            return False
        off += yes
    return off == len(code)


def test_port_bound_explicitly_is_a_negated_auto_that_ends_the_program() -> None:
    """INET_DIAG_BC_AUTO matches an autobound port; the exporter wants the opposite (a port bind()
    named), as the last term: a match of AUTO rejects, a miss accepts, and the audit's yes-chain
    ends exactly on the end (else EINVAL: a kernel test runs it for real)."""
    group = bc.Group((), ((bc.sport_ge(40000), bc.sport_le(40001), bc.port_bound_explicitly()),))
    code = bc.program([bc.Group((), ((bc.sport_eq(8080),),)), group])
    assert _bc_audit(code)
    in_range = {BcOp.S_EQ: False, BcOp.S_GE: True, BcOp.S_LE: True}
    assert _bc_run(code, {**in_range, BcOp.AUTO: False})  # bind() named the port
    assert not _bc_run(code, {**in_range, BcOp.AUTO: True})  # autobound
    assert not _bc_run(code, {BcOp.S_EQ: False, BcOp.S_GE: False, BcOp.S_LE: True, BcOp.AUTO: False})
    assert _bc_run(code, {BcOp.S_EQ: True, BcOp.S_GE: False, BcOp.S_LE: False, BcOp.AUTO: True})
    with pytest.raises(ValueError):  # anywhere but last, the op after it would be unreachable
        bc.program([group, bc.Group((), ((bc.sport_eq(8080),),))])


def test_remote_is_uses_ipv4_for_a_mapped_address() -> None:
    assert bc.remote_is(IPv6Address("::ffff:127.0.0.1"), 80) == bc.remote_is(LO, 80)
    v6 = bc.remote_is(IPv6Address("::1"), 80)
    assert len(v6.payload) == 8 + 16


def test_any_of_rejects_nothing() -> None:
    with pytest.raises(ValueError):
        bc.any_of([])


# ---------------------------------------------------------------------------------------------
# Server ports


W = Watch(8080)
K = PortKey(8080)


def answer(
    table: list[SocketRecord],
    w: Watch = W,
    *,
    settings: KernelSettings = SETTINGS,
    watches: tuple[Watch, ...] | None = None,
    flags: tuple[tuple[Watch, ServerFlags], ...] = (),
) -> tuple[int, BindNow]:
    """The exported value and the judgement for ``w``, through a Tally as the gatherer does."""
    snap = snap_of(table, watches or (w,), settings=settings, server_flags=flags)
    [a] = [x for x in restart_answers(snap) if x.watch == w]
    return bindable_value(a.judgement), a.judgement.now


def read(reuseaddr: bool, reuseport: bool = False) -> ServerFlags:
    return ServerFlags(SockOpts(reuseaddr, reuseport), Provenance.READ, 1000, 7)


def test_running_server_with_connections_and_its_time_wait_would_restart() -> None:
    table = [
        listener(),
        rec(State.ESTABLISHED, ("127.0.0.1", 8080), ("127.0.0.1", 50000)),
        rec(State.ESTABLISHED, ("127.0.0.1", 8080), ("127.0.0.1", 50002)),
        rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 50001), expires=42_000),
        rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 50003), expires=41_000),
    ]
    # Unread flags: the restart and the live listener's own children share the assumption.
    assert answer(table) == (1, BindNow.BINDABLE)
    assert answer(table, flags=((W, read(True)),)) == (1, BindNow.BINDABLE)
    # Read without SO_REUSEADDR: its connections refuse the restart, as the kernel would.
    assert answer(table, flags=((W, read(False)),)) == (0, BindNow.BUSY)
    snap = snap_of(table, (W,))
    assert frees_in_seconds(snap, K) == 42.0
    # One representative of the children and of the leftovers per local address, not all.
    assert list(snap.watched or ()) == [table[0], table[1], table[3]]


def test_seed_case_time_wait_of_a_server_never_seen_is_unknown_and_exported_0() -> None:
    """The seed: a server without SO_REUSEADDR is gone, its TIME_WAIT stays. Its SO_REUSEADDR is
    unknown (inet_diag does not report it): never 1, and the missing fact is named."""
    table = [rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 50001), expires=42_000)]
    assert answer(table) == (0, BindNow.UNKNOWN)
    snap = snap_of(table, (W,))
    got = _scrape(snap)
    want = {"metric": "rebind_port_bindable", "reason": "so_reuseaddr_unknown"}
    assert (want, 1.0) in got["rebind_exporter_missing"]
    assert got["rebind_port_bindable"] == [({"port": "8080", "proto": "tcp", "addr": "0.0.0.0"}, 0.0)]
    # Its listener was read in an earlier scrape: the TIME_WAIT's flags are inferred from it.
    assert answer(table, flags=((W, read(False)),)) == (0, BindNow.BUSY)
    assert answer(table, flags=((W, read(True)),)) == (1, BindNow.BINDABLE)
    # A listener whose flags could not be read tells nothing about its leftovers.
    unread = ServerFlags(SockOpts(), Provenance.UNKNOWN, 1000, 7)
    assert answer(table, flags=((W, unread),)) == (0, BindNow.UNKNOWN)
    assert not server_flags(snap_of(table, (W,), server_flags=((W, unread),)), W).exact


def _kernel_state(
    r: SocketRecord, reuse: int, reuseport: bool = False, bucket: BindBucket | None = None
) -> SockState:
    """The BPF iterator's record of ``r`` (joined by cookie), with its own sk_reuse/sk_reuseport."""
    tw = r.state is State.TIME_WAIT
    return SockState.make(
        proto=r.proto, family=r.family, state=r.state, kind=SockKind.TIMEWAIT if tw else SockKind.FULL,
        local=r.local, remote=r.remote, cookie=r.cookie or 0, netns=1, uid=r.uid, sk_uid=r.uid,
        bound_dev_if=0, reuse=reuse, reuseport=reuseport, ipv6only=False, userlocks=None if tw else 8,
        bucket=bucket,
    )  # fmt: skip


def test_time_wait_flags_read_from_the_kernel_are_exact_both_ways() -> None:
    """Issue 17: with the TIME_WAIT's own tw_reuse read (BPF, as `why`), the seed's leftover is
    judged exactly -- BUSY without SO_REUSEADDR, BINDABLE with -- and nothing is missing."""
    tw = replace(rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 50001), expires=42_000), cookie=77)
    for reuse, want in ((0, (0, BindNow.BUSY)), (1, (1, BindNow.BINDABLE))):
        snap = snap_of([tw], (W,), kernel=(_kernel_state(tw, reuse),))
        [a] = restart_answers(snap)
        assert (bindable_value(a.judgement), a.judgement.now) == want
        assert missing_facts([a]) == []


def test_a_reuseport_restart_takes_the_buckets_fast_path_as_the_kernel() -> None:
    """A listener on 127.0.0.1 that bound with SO_REUSEPORT and cleared it after listen(): its
    flags alone refuse a SO_REUSEPORT restart on 0.0.0.0, but the bucket's cache (FASTREUSEPORT_ANY,
    same uid) lets it through (sk_reuseport_match). Without the bucket: unknown, the cache named."""
    other = replace(listener("127.0.0.1"), cookie=5, uid=0)
    bucket = BindBucket(8080, 0, 1, 0, LO, None, 2, False)
    flags = ServerFlags(SockOpts(False, True), Provenance.READ, 0, 9)
    snap = snap_of(
        [other], (W,), server_flags=((W, flags),), kernel=(_kernel_state(other, 0, False, bucket),)
    )
    [a] = restart_answers(snap)
    assert a.judgement.now is BindNow.BINDABLE
    blind = snap_of([other], (W,), server_flags=((W, flags),), kernel=(_kernel_state(other, 0, False),))
    [b] = restart_answers(blind)
    assert b.judgement.now is BindNow.UNKNOWN
    assert Missing("rebind_port_bindable", Reason.BUCKET_UNKNOWN) in missing_facts([b])


def test_client_that_took_the_server_port_blocks_the_restart() -> None:
    # kubernetes#111682: the server is down and an outgoing connection got 8080 as its source.
    # It blocks unless it set SO_REUSEADDR itself, which inet_diag does not say: 0, not 1.
    table = [rec(State.ESTABLISHED, ("10.0.0.1", 8080), ("10.0.0.9", 443))]
    assert answer(table) == (0, BindNow.UNKNOWN)
    snap = snap_of(table, (W,))
    assert list(snap.watched or ()) == table
    assert frees_in_seconds(snap, K) == 0.0


def test_squatter_on_another_address_is_a_holder_not_the_server() -> None:
    """M4: a listener on 127.0.0.77 while the real (0.0.0.0) server is down: the only series is
    the configured address's, and it says the restart fails."""
    table = [rec(State.LISTEN, ("127.0.0.77", 8080), uid=65534)]
    assert answer(table) == (0, BindNow.BUSY)
    got = _scrape(snap_of(table, (W,)))
    assert got["rebind_port_bindable"] == [({"port": "8080", "proto": "tcp", "addr": "0.0.0.0"}, 0.0)]
    assert "rebind_listener_accept_queue" not in got  # not a watched address: no series


def test_thousands_of_user_bound_addresses_add_no_series() -> None:
    """H3: labels come from the command line. 2,000 listeners on 127.x.y.z: still one bindable
    series and one set of listener series (the watched address's)."""
    table = [listener("0.0.0.0")]
    table += [rec(State.LISTEN, (f"127.100.{i >> 8}.{i & 255}", 8080), uid=65534) for i in range(2000)]
    got = _scrape(snap_of(table, (W,)))
    assert len(got["rebind_port_bindable"]) == 1
    assert len(got["rebind_listener_accept_queue"]) == 1
    assert len(got["rebind_listener_reuseport_group_size"]) == 1


TABLES = [
    [listener(), rec(State.ESTABLISHED, ("127.0.0.1", 8080), ("127.0.0.1", 5))],
    [listener("127.0.0.1"), rec(State.ESTABLISHED, ("127.0.0.2", 8080), ("127.0.0.1", 5))],
    [listener("::"), rec(State.ESTABLISHED, ("::ffff:127.0.0.1", 8080), ("::ffff:127.0.0.1", 5))],
    [
        rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 6), expires=1),
        rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 7), expires=1),
        rec(State.BOUND_INACTIVE, ("127.0.0.3", 8080)),
    ],
    [rec(State.SYN_SENT, ("127.0.0.1", 8080), ("10.1.1.1", 80))],
]


@pytest.mark.parametrize("table", TABLES)
def test_the_model_sees_the_same_answer_from_the_tally_kept_sockets(table: list[SocketRecord]) -> None:
    """Keeping one child and one leftover per local address (the fast path) never changes an
    answer."""
    watches = tuple(Watch(8080, addr=a) for a in (ANY4, LO, IPv4Address("127.0.0.2"), IPv6Address("::")))
    kept = list(snap_of(table, watches).watched or ())
    for flags in (ServerFlags(SockOpts(True, False), Provenance.ASSUMED), read(False), read(True)):
        servers = {w.addr: flags for w in watches}
        for w in watches:
            a = assess_restart(port_holders(kept, K, servers), w, flags, SETTINGS)
            b = assess_restart(port_holders(table, K, servers), w, flags, SETTINGS)
            assert a.now == b.now, (w, flags)


def test_stray_bound_inactive_socket_blocks_a_wildcard_server() -> None:
    table = [listener("127.0.0.1"), rec(State.BOUND_INACTIVE, ("127.0.0.2", 8080))]
    both = (W, Watch(8080, addr=LO))
    assert answer(table, watches=both)[0] == 0
    # ...while the server's own address (127.0.0.1) does not overlap 127.0.0.2.
    assert answer(table, Watch(8080, addr=LO), watches=both) == (1, BindNow.BINDABLE)


def test_another_listener_on_an_overlapping_address_blocks() -> None:
    table = [listener("0.0.0.0"), listener("127.0.0.1")]  # impossible without SO_REUSEPORT...
    assert answer(table, Watch(8080, addr=LO))[0] == 0  # ...and the other one stays


def test_privileged_port_is_judged_as_the_server_would_bind_it() -> None:
    table = [listener(port=80)]
    unpriv = KernelSettings(cap_net_bind_service=False)
    assert answer(table, Watch(80), settings=unpriv) == (1, BindNow.BINDABLE)


def test_udp_server_own_socket_excluded_other_socket_blocks() -> None:
    u = Watch(5353, Proto.UDP)
    own = rec(State.CLOSE, ("0.0.0.0", 5353), proto=Proto.UDP)
    assert answer([own], u) == (1, BindNow.BINDABLE)
    other = rec(State.CLOSE, ("127.0.0.1", 5353), proto=Proto.UDP)
    assert answer([own, other], u)[0] == 0


def test_ipv4_mapped_addr_labels_are_dotted_on_every_python() -> None:
    """L4: ``::ffff:127.0.0.9``, never 3.11's ``::ffff:7f00:9``."""
    w = Watch(8080, addr=IPv6Address("::ffff:127.0.0.9"))
    table = [rec(State.LISTEN, ("::ffff:127.0.0.9", 8080))]
    got = _scrape(snap_of(table, (w,)))
    assert {lab["addr"] for lab, _ in got["rebind_port_bindable"]} == {"::ffff:127.0.0.9"}
    assert {lab["addr"] for lab, _ in got["rebind_listener_backlog"]} == {"::ffff:127.0.0.9"}


def test_watch_and_collector_refuse_bad_input_with_a_usage_error() -> None:
    """L2: out-of-range ports, strings for watches, nan or negative intervals."""
    for bad in (
        lambda: RebindCollector([Watch(70000)], []),
        lambda: RebindCollector(["8080"], []),  # type: ignore[list-item]
        lambda: RebindCollector("8080", []),  # type: ignore[arg-type]
        lambda: RebindCollector([W], [], interval=float("nan")),
        lambda: RebindCollector([W], [], interval=-5),
        lambda: Watch(True),
        lambda: Watch(8080, "sctp"),  # type: ignore[arg-type]
        lambda: Watch(8080, addr="localhost"),  # type: ignore[arg-type]
        lambda: Dest(IPv4Address("10.0.0.1"), 0),
    ):
        with pytest.raises(UsageError):
            bad()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8080", [Watch(8080)]),
        ("127.0.0.1:8080", [Watch(8080, addr=LO)]),
        ("[::]:8080", [Watch(8080, addr=IPv6Address("::"))]),
        ("[::1]:53/udp", [Watch(53, Proto.UDP, IPv6Address("::1"))]),
        ("0.0.0.0:53/UDP,53", [Watch(53), Watch(53, Proto.UDP)]),
    ],
)
def test_parse_watches(text: str, want: list[Watch]) -> None:
    from rebind.cli.exporter import parse_watches

    assert parse_watches((text,)) == want


@pytest.mark.parametrize("text", ["::1:8080", "localhost:8080", "[fe80::1%lo]:80", "1.2.3.4:0", ":8080"])
def test_parse_watches_rejects(text: str) -> None:
    from rebind.cli.exporter import parse_watches

    with pytest.raises(UsageError):
        parse_watches((text,))


def test_state_counts_lower_case_with_zeros() -> None:
    table = [
        listener(),
        rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("127.0.0.1", 1), expires=1),
        rec(State.BOUND_INACTIVE, ("127.0.0.2", 8080)),
        rec(State.NEW_SYN_RECV, ("127.0.0.1", 8080), ("127.0.0.1", 2)),
        rec(State.ESTABLISHED, ("127.0.0.1", 9999), ("127.0.0.1", 3)),  # other port
    ]
    counts = state_counts(snap_of(table, (W,)), K)
    assert counts["listen"] == 1 and counts["time_wait"] == 1 and counts["bound_inactive"] == 1
    assert counts["syn_recv"] == 1 and counts["established"] == 0
    assert all(k == k.lower() for k in counts)
    assert "unconn" not in counts
    u = Watch(53, Proto.UDP)
    udp = state_counts(snap_of([rec(State.CLOSE, ("0.0.0.0", 53), proto=Proto.UDP)], (u,)), u.key)
    assert udp == {"unconn": 1, "established": 0}


def test_listener_groups_report_the_fullest_reuseport_member() -> None:
    table = [listener(rq=10, wq=100), listener(rq=90, wq=100), listener(rq=5, wq=10), listener("::", rq=1)]
    groups = listener_groups(table, [W, Watch(8080, addr=IPv6Address("::"))])
    assert [(g.addr, g.size, g.accept_queue, g.backlog) for g in groups] == [
        (ANY4, 3, 90, 100),
        (IPv6Address("::"), 1, 1, 128),
    ]
    assert [g.addr for g in listener_groups(table, [W])] == [ANY4]  # only watched addresses
    assert listener_groups(table, [Watch(8080, Proto.UDP)]) == []


# ---------------------------------------------------------------------------------------------
# Client side


RNG = EphemeralRange(40000, 40009, frozenset({40005, 50000}))
DST = Dest(IPv4Address("10.0.0.5"), 5432)


def test_ephemeral_range_counts_only_reserved_ports_inside() -> None:
    assert RNG.size == 9
    assert 40005 not in RNG and 40000 in RNG and 40010 not in RNG


def test_connect_counts() -> None:
    socks = [
        rec(State.ESTABLISHED, ("10.0.0.1", 40000), ("10.0.0.5", 5432)),
        rec(State.SYN_SENT, ("10.0.0.1", 40001), ("10.0.0.5", 5432)),
        rec(State.TIME_WAIT, ("10.0.0.1", 40002), ("10.0.0.5", 5432), expires=1000),
        rec(State.ESTABLISHED, ("10.0.0.2", 40003), ("10.0.0.5", 5432)),  # another source: shares
        rec(State.ESTABLISHED, ("10.0.0.1", 40004), ("10.0.0.5", 5433)),  # another dport: shares
        rec(State.ESTABLISHED, ("10.0.0.1", 30000), ("10.0.0.5", 5432)),  # outside the range
    ]
    bound = [listener(port=40006), rec(State.BOUND_INACTIVE, ("0.0.0.0", 40007)), listener(port=8080)]
    held = bind_held_ports(bound, RNG)
    assert held == {40006, 40007}
    usage = snap_of(socks, (), (DST,)).usage or ()
    c = connect_counts(DST, IPv4Address("10.0.0.1"), usage, RNG, held)
    assert (c.free, c.timewait, c.live) == (9 - 2 - 3, 1, 2)
    other = connect_counts(DST, IPv4Address("10.0.0.2"), usage, RNG, held)
    assert (other.free, other.live) == (9 - 2 - 1, 1)


def test_connect_counts_mapped_addresses_match() -> None:
    socks = [rec(State.ESTABLISHED, ("::ffff:10.0.0.1", 40000), ("::ffff:10.0.0.5", 5432))]
    usage = snap_of(socks, (), (DST,)).usage or ()
    c = connect_counts(DST, IPv4Address("10.0.0.1"), usage, RNG, frozenset())
    assert c.free == 8


def test_config_warnings() -> None:
    snap = Snapshot(watches=(Watch(40001), Watch(40005), Watch(8080)), ephemeral=RNG)
    w = config_warnings(snap)
    assert w[WarningKind.SERVER_PORT_IN_EPHEMERAL_RANGE] == 1  # 40005 is reserved, 8080 outside
    assert w[WarningKind.EPHEMERAL_RANGE_ODD] == 0
    odd = config_warnings(Snapshot(ephemeral=EphemeralRange(32768, 60998), source="procfs"))
    assert odd[WarningKind.EPHEMERAL_RANGE_ODD] == 1
    assert odd[WarningKind.SOCKET_TABLE_FROM_PROCFS] == 1


# ---------------------------------------------------------------------------------------------
# Families: the names and labels are a contract (docs/metrics.md)


def _scrape(snap: Snapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    class C:
        def collect(self):  # type: ignore[no-untyped-def]
            return families(snap)

    reg = CollectorRegistry()
    reg.register(C())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _snapshot(**kw: object) -> Snapshot:
    table = [
        listener(rq=3, wq=4),
        rec(State.CLOSE, ("0.0.0.0", 53), proto=Proto.UDP),
        rec(State.TIME_WAIT, ("10.0.0.1", 40002), ("10.0.0.5", 5432), expires=1000),
    ]
    base: dict[str, object] = dict(
        bound_in_range=(),
        ephemeral=RNG,
        sources=((DST, IPv4Address("10.0.0.1")),),
        duration_s=0.01,
    )
    base.update(kw)
    return snap_of(table, (W, Watch(53, Proto.UDP)), (DST,), **base)


CONTRACT = {
    "rebind_port_bindable": {"port", "proto", "addr"},
    "rebind_port_frees_in_seconds": {"port", "proto"},
    "rebind_sockets": {"port", "proto", "state"},
    "rebind_listener_accept_queue": {"port", "addr"},
    "rebind_listener_backlog": {"port", "addr"},
    "rebind_listener_reuseport_group_size": {"port", "addr"},
    "rebind_connect_free_ports": {"src", "dst", "dport"},
    "rebind_connect_timewait": {"src", "dst", "dport"},
    "rebind_ephemeral_range_ports": set(),
    "rebind_ephemeral_bind_held_ports": set(),
    "rebind_config_warning": {"kind"},
    "rebind_scrape_duration_seconds": set(),
}


def test_every_contract_metric_with_its_labels() -> None:
    got = _scrape(_snapshot())
    for name, labels in CONTRACT.items():
        assert name in got, name
        assert all(set(lab) == labels for lab, _ in got[name]), name
    assert ({"port": "8080", "addr": "0.0.0.0"}, 3.0) in got["rebind_listener_accept_queue"]
    assert ({"src": "10.0.0.1", "dst": "10.0.0.5", "dport": "5432"}, 1.0) in got["rebind_connect_timewait"]
    states = {lab["state"] for lab, _ in got["rebind_sockets"] if lab["proto"] == "tcp"}
    assert {"bound_inactive", "time_wait", "listen", "established"} <= states
    assert "rebind_exporter_missing" not in got


def test_missing_metrics_are_exported_and_unknown_is_not_zero() -> None:
    snap = _snapshot(
        bound_inactive_visible=False,
        usage=None,
        missing=(Missing("rebind_sockets", Reason.KERNEL_TOO_OLD), Missing("x", Reason.NO_ROUTE)),
    )
    got = _scrape(snap)
    assert ({"metric": "rebind_sockets", "reason": "kernel_too_old"}, 1.0) in got["rebind_exporter_missing"]
    assert not any(lab["state"] == "bound_inactive" for lab, _ in got["rebind_sockets"])
    assert "rebind_connect_free_ports" not in got


def test_no_series_for_a_dest_without_route() -> None:
    got = _scrape(_snapshot(sources=((DST, None),)))
    assert "rebind_connect_free_ports" not in got


def test_nothing_gathered_still_exports_the_exporters_own_metrics() -> None:
    got = _scrape(Snapshot(watched=None, usage=None, bound_in_range=None, ephemeral=None))
    assert "rebind_scrape_duration_seconds" in got and "rebind_config_warning" in got
    assert "rebind_port_bindable" not in got


# ---------------------------------------------------------------------------------------------
# Collector: gathers at scrape time, at most once per interval


def test_collector_caches_for_the_interval() -> None:
    now = [100.0]
    calls: list[int] = []

    def fake() -> Snapshot:
        calls.append(1)
        return _snapshot()

    c = RebindCollector([W], [], interval=5.0, gatherer=fake, clock=lambda: now[0])
    reg = registry_with(c, process=False)
    assert calls == []  # registering does not scrape
    generate_latest(reg)
    generate_latest(reg)
    now[0] += 4.9
    generate_latest(reg)
    assert len(calls) == 1
    now[0] += 0.2
    generate_latest(reg)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Textfile and --listen


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "rebind.prom"
    write_atomic(str(target), b"a 1\n")
    write_atomic(str(target), b"a 2\n")
    assert target.read_bytes() == b"a 2\n"
    assert os.listdir(tmp_path) == ["rebind.prom"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_write_atomic_replaces_a_planted_symlink_without_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "rebind.prom"
    target.symlink_to(victim)
    write_atomic(str(target), b"a 1\n")
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"a 1\n"


def test_write_atomic_refuses_names_node_exporter_ignores(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        write_atomic(str(tmp_path / "rebind.txt"), b"")
    with pytest.raises(EnvironmentProblem):
        write_atomic(str(tmp_path / "nodir" / "rebind.prom"), b"")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:9811", ("127.0.0.1", 9811)),
        (":9811", ("0.0.0.0", 9811)),
        ("9811", ("127.0.0.1", 9811)),
        ("[::1]:9811", ("::1", 9811)),
        ("[::]:80", ("::", 80)),
    ],
)
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize(
    "text", ["localhost:9811", "::1:9811", "1.2.3.4:0", "1.2.3.4:99999", "1.2.3.4:²", ""]
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_listen(text)


@pytest.mark.parametrize(
    "args",
    [
        ["--watch", "0"],
        ["--watch", "8080/sctp"],
        ["--watch", "80,,81"],
        ["--watch", "²"],
        ["--dest", "10.0.0.1"],
        ["--dest", "10.0.0.1:http"],
        ["--dest", "no-such-host.invalid:80"],
        ["--interval", "nan"],
        ["--interval", "-1"],
        ["--listen", "foo:80"],
        ["--once"],
        ["--textfile", "/tmp/x.prom", "--interval", "0.5"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str]) -> None:
    env = dict(os.environ, NO_COLOR="1")
    res = subprocess.run(
        [sys.executable, "-m", "rebind", "exporter", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 2, res
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# Bytecode semantics: a transcription of inet_diag_bc_run for the ops the exporter emits


def _run_bc(code: bytes, sport: int, dport: int, daddr: IPv4Address) -> bool:
    import struct

    pc, end = 0, len(code)
    while pc < end:
        kind, yes, no = BC_OP.unpack_from(code, pc)
        if kind == BcOp.JMP:
            ok = False
        elif kind in (BcOp.S_EQ, BcOp.S_GE, BcOp.S_LE, BcOp.D_GE, BcOp.D_LE):
            (_, _, val) = BC_OP.unpack_from(code, pc + 4)
            port = sport if kind in (BcOp.S_EQ, BcOp.S_GE, BcOp.S_LE) else dport
            ok = {
                BcOp.S_EQ: port == val,
                BcOp.S_GE: port >= val,
                BcOp.S_LE: port <= val,
                BcOp.D_GE: port >= val,
                BcOp.D_LE: port <= val,
            }[BcOp(kind)]
        elif kind == BcOp.D_COND:
            _fam, plen, cport = struct.unpack_from("=BBxxi", code, pc + 4)
            addr = code[pc + 12 : pc + 12 + plen // 8]
            ok = (cport == -1 or cport == dport) and daddr.packed == addr
        else:
            raise AssertionError(f"unexpected op {kind}")
        pc += yes if ok else no
    assert pc in (end, end + 4), pc
    return pc == end


def test_guarded_program_accepts_exactly_the_watched_ports_and_dests() -> None:
    import random

    ports = [8080, 8081, 9000, 10000, 10006]
    dests = [(IPv4Address("127.0.0.2"), 10000), (IPv4Address("10.0.0.5"), 5432)]
    code = bc.program(
        [
            bc.Group((bc.sport_ge(8080), bc.sport_le(10006)), tuple((bc.sport_eq(p),) for p in ports)),
            bc.Group((bc.dport_ge(5432), bc.dport_le(10000)), tuple((bc.remote_is(a, p),) for a, p in dests)),
            bc.Group((), ((bc.sport_ge(40000), bc.sport_le(40009)),)),
        ]
    )
    rnd = random.Random(12)
    cands = [*ports, 5432, 10000, 40000, 40009, 39999, 40010, 8079, 10007, 1, 65535]
    addrs = [a for a, _ in dests] + [IPv4Address("127.0.0.3")]
    for _ in range(3000):
        sp, dp, da = rnd.choice(cands), rnd.choice(cands), rnd.choice(addrs)
        want = sp in ports or (da, dp) in dests or 40000 <= sp <= 40009
        assert _run_bc(code, sp, dp, da) == want, (sp, dp, da)


def test_peers_are_top_k_per_port_plus_other() -> None:
    table = [listener()]
    for i, n in enumerate([9, 1, 7, 3, 5, 2, 8]):  # 7 peers
        table += [rec(State.ESTABLISHED, ("127.0.0.1", 8080), (f"10.0.0.{i}", 1000 + j)) for j in range(n)]
    table.append(rec(State.TIME_WAIT, ("127.0.0.1", 8080), ("10.0.0.1", 9), expires=5))
    snap = snap_of(table, (W,))
    got = [(p.peer, p.sockets) for p in snap.peers]
    assert got == [
        ("10.0.0.0", 9),
        ("10.0.0.6", 8),
        ("10.0.0.2", 7),
        ("10.0.0.4", 5),
        ("10.0.0.3", 3),
        ("other", 4),
    ]
    scraped = _scrape(snap)["rebind_port_peer_sockets"]
    assert ({"port": "8080", "peer": "other"}, 4.0) in scraped
    assert len(scraped) == 6


def test_write_atomic_leaves_no_temp_file_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(tmp_path / "rebind.prom"), b"a 1\n")
    assert os.listdir(tmp_path) == []
