"""Issue 17, client side: the ports of the range whose origin only the bind bucket tells
(bind(ip, 0) or connect()?), pure parts: which ports are read, how a bucket is judged, and what
an unknown origin does to the connect metrics (never counted free)."""

from __future__ import annotations

from ipaddress import IPv4Address

from prometheus_client.registry import CollectorRegistry

from rebind.exporter import bytecode as bc
from rebind.exporter.connect_counts import (
    bind_held_ports,
    bucket_connect_only,
    connect_counts,
    origin_candidates,
    port_origins,
)
from rebind.exporter.facts import Dest, DestUsage, EphemeralRange, PortOrigins, Snapshot
from rebind.exporter.families import families
from rebind.exporter.gather import Gatherer
from rebind.kernel.diag_codec import BcOp
from rebind.model.sockstate import BindBucket

RNG = EphemeralRange(40000, 40009, frozenset({40005}))
DST = Dest(IPv4Address("10.0.0.5"), 5432)
SRC = IPv4Address("10.0.0.1")


def bucket(fastreuse: int, fastreuseport: int) -> BindBucket:
    return BindBucket(40000, fastreuse, fastreuseport, None, None, None, None, None)


def test_candidates_are_the_range_minus_reserved_and_known_ports() -> None:
    got = origin_candidates([40000, 40001, 40005, 39999, 40010, 40001, 40002], RNG, frozenset({40002}))
    assert got == {40000, 40001}


def test_a_bucket_is_connect_only_when_both_caches_are_minus_one() -> None:
    assert bucket_connect_only(bucket(-1, -1))
    assert not bucket_connect_only(bucket(0, 0))  # bind(ip, 0) without SO_REUSEADDR
    assert not bucket_connect_only(bucket(1, 0))  # bind() with SO_REUSEADDR
    assert not bucket_connect_only(bucket(-1, 0))


def test_port_origins_sorts_read_ports_and_keeps_unread_ones_unknown() -> None:
    got = port_origins([40000, 40001, 40002], {40000: True, 40001: False, 40009: False})
    assert got == PortOrigins(bind_made=frozenset({40001}), unknown=frozenset({40002}))
    assert port_origins([], {}) == PortOrigins()


def test_an_unknown_port_is_never_counted_free() -> None:
    usage = (DestUsage(DST, SRC, frozenset({40003}), frozenset({40004})),)
    held = frozenset({40000})
    known = connect_counts(DST, SRC, usage, RNG, held)
    assert known.free == 9 - 3
    c = connect_counts(DST, SRC, usage, RNG, held, frozenset({40001, 40003}))
    assert (c.free, c.live, c.timewait) == (9 - 4, 1, 1)  # 40003 is live anyway: counted once


def _samples(snap: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            return families(snap)

    reg.register(One())  # type: ignore[arg-type]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in reg.collect() for s in fam.samples}


def test_families_count_bind_made_ports_held_and_unknown_ones_neither_free_nor_held() -> None:
    snap = Snapshot(
        dests=(DST,),
        usage=(),
        bound_in_range=(),
        bind_held_conn=frozenset({40000}),
        origins=PortOrigins(bind_made=frozenset({40001}), unknown=frozenset({40002})),
        ephemeral=RNG,
        sources=((DST, SRC),),
    )
    s = _samples(snap)
    assert s[("rebind_ephemeral_bind_held_ports", ())] == 2
    labels = (("dport", "5432"), ("dst", "10.0.0.5"), ("src", "10.0.0.1"))
    assert s[("rebind_connect_free_ports", labels)] == 9 - 3
    assert bind_held_ports((), RNG, frozenset({40001})) == {40001}


def test_gatherer_reads_the_origin_of_each_port_once_and_without_the_kernel_knows_nothing() -> None:
    peer = (SRC.packed, DST.addr.packed, 5433)
    reps = {40000: peer, 40001: peer}
    asked: list[list[int]] = []

    def reader(rs):  # type: ignore[no-untyped-def]
        asked.append(list(rs))
        return {40000: True}  # 40001: its socket went away meanwhile

    g = Gatherer((), (DST,), read_origins=reader)
    assert g._origins(reps) == PortOrigins(frozenset(), frozenset({40001}))
    assert asked == [[40000, 40001]]
    assert g._origins({}) == PortOrigins()
    assert len(asked) == 1  # nothing to read: no BPF call at all
    off = Gatherer((), (DST,), read_kernel=False, read_origins=reader)
    assert off._origins(reps) == PortOrigins(frozenset(), frozenset({40000, 40001}))


def test_client_filter_only_with_dests_and_a_range() -> None:
    assert Gatherer((), ())._client_filter(RNG) is None
    assert Gatherer((), (DST,))._client_filter(None) is None
    code = Gatherer((), (DST,))._client_filter(RNG)
    assert code == bc.program(
        [bc.Group((), ((bc.sport_ge(40000), bc.sport_le(40009), bc.port_autobound()),))]
    )


def test_port_autobound_is_a_plain_auto_op() -> None:
    op = bc.port_autobound()
    assert (op.code, op.payload, op.negate) == (BcOp.AUTO, b"", False)
