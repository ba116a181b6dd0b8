"""Issue 17, client side: the ports of the range whose origin only the bind bucket tells
(bind(ip, 0) or connect()?), pure parts: which ports are read, how a bucket is judged, and what
an unknown origin does to the connect metrics (never counted free)."""

from __future__ import annotations

from dataclasses import replace
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
from rebind.exporter.origins import bucket_origins, range_ports
from rebind.kernel.diag_codec import BcOp
from rebind.model.sockstate import BindBucket, PortBucket, Unavailable

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
    assert (known.undecided, c.undecided) == (0, 1)  # only 40001 would be free if connect-made


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
    missing = {k[1] for k, v in s.items() if k[0] == "rebind_exporter_missing" and v == 1}
    assert missing == {
        (("metric", m), ("reason", "port_origin_unknown"))
        for m in ("rebind_connect_free_ports", "rebind_ephemeral_bind_held_ports")
    }
    # the unknown port is taken for the dest anyway: its free count is exact
    taken = replace(snap, usage=(DestUsage(DST, SRC, frozenset({40002}), frozenset()),))
    missing = {k[1] for k, v in _samples(taken).items() if k[0] == "rebind_exporter_missing"}
    assert missing == {(("metric", "rebind_ephemeral_bind_held_ports"), ("reason", "port_origin_unknown"))}
    assert not [
        k for k in _samples(replace(snap, origins=PortOrigins())) if k[0] == "rebind_exporter_missing"
    ]
    assert bind_held_ports((), RNG, frozenset({40001})) == {40001}


def test_gatherer_reads_the_origin_of_each_port_once_and_without_the_kernel_knows_nothing() -> None:
    peer = (SRC.packed, DST.addr.packed, 5433, 0)  # no cookie: read every scrape
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
    g._origins(reps)
    assert len(asked) == 2  # without a cookie nothing is remembered
    off = Gatherer((), (DST,), read_kernel=False, read_origins=reader)
    assert off._origins(reps) == PortOrigins(frozenset(), frozenset({40000, 40001}))


def test_gatherer_reads_a_port_again_only_when_its_socket_changed() -> None:
    """A bucket lives as long as any socket of its port: while the socket it was read through
    (same cookie) is there, the answer stands; another socket may lead to a bucket made anew."""
    answers = {40000: False, 40001: True}
    asked: list[list[int]] = []

    def reader(rs):  # type: ignore[no-untyped-def]
        asked.append(sorted(rs))
        return {p: answers[p] for p in rs if p in answers}

    g = Gatherer((), (DST,), read_origins=reader)
    a = (SRC.packed, DST.addr.packed, 5433)
    first = {40000: (*a, 7), 40001: (*a, 8), 40002: (*a, 9)}
    assert g._origins(first) == PortOrigins(frozenset({40000}), frozenset({40002}))
    answers[40000] = True  # what a new bucket would say: not asked while socket 7 is there
    answers[40002] = False
    assert g._origins(first) == PortOrigins(frozenset({40000, 40002}), frozenset())
    assert asked == [[40000, 40001, 40002], [40002]]  # the unknown port is asked again
    second = {40000: (*a, 17), 40001: (*a, 8)}  # 40000: another socket now; 40002 gone
    assert g._origins(second) == PortOrigins(frozenset(), frozenset())
    assert asked[-1] == [40000]
    assert g._origins(first) == PortOrigins(frozenset({40002}), frozenset())
    assert asked[-1] == [40000, 40002]  # 40002 was forgotten when it had no socket


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


def _entry(found: int, **fields: object) -> bytes:
    from rebind.kernel.bpf.socklayout import RECORD, RECORD_FIELDS
    from rebind.kernel.bpf.socklookup import ENTRY_SIZE, FOUND, FOUND_AT, RECORD_AT

    zero = {"s": b"", "B": 0, "b": 0, "H": 0, "I": 0, "Q": 0}
    values = [fields.get(n, zero[f[-1]]) for n, f in RECORD_FIELDS]
    buf = bytearray(ENTRY_SIZE)
    buf[FOUND_AT : FOUND_AT + FOUND.size] = FOUND.pack(found)
    buf[RECORD_AT : RECORD_AT + RECORD.size] = RECORD.pack(*values)
    return bytes(buf)


def test_buckets_of_reads_the_bucket_of_found_unfaulted_sockets_of_the_port() -> None:
    from rebind.kernel.bpf.socklookup import buckets_of

    data = b"".join(
        [
            _entry(1, lport=40000, has_bucket=1, fastreuse=-1, fastreuseport=-1),
            _entry(1, lport=40001, has_bucket=3, fastreuse=0, fastreuseport=0),
            _entry(0, lport=40002, has_bucket=1, fastreuse=-1, fastreuseport=-1),  # not found
            _entry(1, lport=40003, has_bucket=1, faults=1),  # freed mid-read
            _entry(1, lport=9999, has_bucket=1),  # another port's socket
            _entry(1, lport=40005, has_bucket=0),  # the bucket was not read
        ]
    )
    got = buckets_of([40000, 40001, 40002, 40003, 40004, 40005], data)
    assert got == [(-1, -1), (0, 0), None, None, None, None]


def test_raw_entry_is_the_records_entry() -> None:
    """The lookup entry made from address bytes is the one made from a SocketRecord's endpoints:
    IPv4, v4-mapped IPv6 (looked up as IPv4), and IPv6."""
    from ipaddress import ip_address

    from rebind.kernel.bpf.socklookup import _entry as record_entry
    from rebind.kernel.bpf.socklookup import _raw_entry
    from rebind.model.records import Endpoint

    for local, remote in (
        ("10.0.0.1", "10.0.0.5"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.5"),
        ("::1", "fe80::2"),
    ):
        la, ra = ip_address(local), ip_address(remote)
        key = [a.ipv4_mapped.packed if getattr(a, "ipv4_mapped", None) else a.packed for a in (la, ra)]
        want, _ = record_entry(Endpoint(la, 40000), Endpoint(ra, 5432))
        assert _raw_entry(40000, key[0], key[1], 5432) == want


def test_first_per_port_keeps_each_ports_first_socket_and_skips_known_ports() -> None:
    import socket as so

    from rebind.exporter.fastdiag import MSG, first_per_port
    from rebind.kernel import diag_codec as codec

    def msg(fam: int, sport: int, dport: int, src: bytes, dst: bytes) -> bytes:
        body = MSG.pack(fam, 1, 0, 0, so.htons(sport), so.htons(dport), src, dst, 0, sport, 1, 0, 0, 0, 0, 0)
        return codec.NLMSGHDR.pack(codec.NLMSGHDR.size + len(body), codec.TCPDIAG_GETSOCK, 2, 1, 0) + body

    v4 = lambda a: IPv4Address(a).packed + bytes(12)  # noqa: E731
    mapped = bytes(10) + b"\xff\xff" + IPv4Address("10.0.0.1").packed
    data = b"".join(
        [
            msg(2, 40000, 5433, v4("10.0.0.1"), v4("10.0.0.5")),
            msg(2, 40000, 5434, v4("10.0.0.1"), v4("10.0.0.6")),  # the port's second: not read
            msg(10, 40001, 5433, mapped, bytes(10) + b"\xff\xff" + IPv4Address("10.0.0.5").packed),
            msg(2, 40002, 5433, v4("10.0.0.1"), v4("10.0.0.5")),  # known already
            codec.NLMSGHDR.pack(codec.NLMSGHDR.size + 4, codec.NLMSG_DONE, 2, 1, 0) + bytes(4),
        ]
    )

    class Fake:
        def send(self, _req: bytes) -> None:
            pass

        def recv_into(self, buf: bytearray) -> int:
            buf[: len(data)] = data
            return len(data)

    class Sock:
        _sock = Fake()

    skip = {40002}
    got = first_per_port(Sock(), b"", skip)  # type: ignore[arg-type]
    a, b = IPv4Address("10.0.0.1").packed, IPv4Address("10.0.0.5").packed
    assert got == {40000: (a, b, 5433, 40000 | 1 << 32), 40001: (a, b, 5433, 40001 | 1 << 32)}
    assert skip == {40000, 40001, 40002}


# --------------------------------------------------------------------------------------------
# The bind hash's answer (exporter/origins.py: bucket_origins), one PortBucket per port


def _pb(buckets: int = 1, reuse: int = -1, reuseport: int = -1, **kw: object) -> PortBucket:
    return PortBucket(buckets, reuse, reuseport, **kw)  # type: ignore[arg-type]


def _groups(answer: dict[int, PortBucket]) -> list[tuple[PortBucket, list[int]]]:
    """A port -> bucket answer as bindhash.read_port_bucket_groups gives it."""
    out: dict[PortBucket, list[int]] = {}
    for p, b in answer.items():
        out.setdefault(b, []).append(p)
    return list(out.items())


def test_bucket_origins_sorts_ports_by_their_bucket() -> None:
    connect = _pb()  # __inet_hash_connect's: fastreuse = fastreuseport = -1
    bind_ip_0 = _pb(reuse=0, reuseport=0)  # bind(ip, 0) without SO_REUSEADDR
    reuseaddr = _pb(reuse=1, reuseport=0)  # bind() with SO_REUSEADDR (a bound-inactive socket)
    reuseport = _pb(reuse=0, reuseport=1)
    half = _pb(reuse=-1, reuseport=0)  # bind() onto a connect()-made bucket: no longer shared
    nobody = PortBucket(0)
    answer = {
        40000: connect,
        40001: bind_ip_0,
        40002: reuseaddr,
        40003: reuseport,
        40004: half,
        40005: nobody,
    }
    got = bucket_origins(list(range(40000, 40007)), _groups(answer))
    # 40006: asked, not in the answer: unknown, never free
    assert got == PortOrigins(bind_made=frozenset({40001, 40002, 40003, 40004}), unknown=frozenset({40006}))
    assert bucket_origins(list(answer), _groups(answer)).unknown == frozenset()


def test_bucket_origins_unknown_when_the_bucket_cannot_be_trusted() -> None:
    faulted = PortBucket(0, faulted=True)  # a copy faulted / a bucket freed mid-walk (inconsistent)
    truncated = PortBucket(0, chain_truncated=True)  # a bucket may lie beyond the walk's bound
    bad_bind = _pb(reuse=0, reuseport=0, faulted=True)
    vrf = _pb(buckets=2)  # l3mdev binds: which bucket a plain connect() matches is not said
    counts = _pb(reuse=0, reuseport=0, counts_truncated=True)  # only bind2/owners are lower bounds
    answer = {1: faulted, 2: truncated, 3: bad_bind, 4: vrf, 5: counts}
    got = bucket_origins([1, 2, 3, 4, 5], _groups(answer))
    assert got == PortOrigins(bind_made=frozenset({5}), unknown=frozenset({1, 2, 3, 4}))
    assert not faulted.known and not truncated.known
    assert bucket_origins([], []) == PortOrigins()


def test_range_ports_leave_out_reserved_and_known_ports() -> None:
    assert range_ports(RNG, [40002, 39000]) == [40000, 40001, 40003, 40004, 40006, 40007, 40008, 40009]


def test_gatherer_takes_the_fallback_only_when_the_bind_hash_is_unavailable() -> None:
    """With dests and a range the bind hash is read for the range's ports but the reserved and
    the listeners'; Unavailable (e.g. REBIND_NO_BPF, a BTF member missing): None, the fallback."""
    asked: list[list[int]] = []

    def reader(ports):  # type: ignore[no-untyped-def]
        asked.append(list(ports))
        return _groups({p: (_pb(reuse=0, reuseport=0) if p == 40003 else PortBucket(0)) for p in ports})

    g = Gatherer((), (DST,), read_buckets=reader)
    assert g._range_origins(RNG, ()) == PortOrigins(bind_made=frozenset({40003}))
    assert asked[-1] == [40000, 40001, 40002, 40003, 40004, 40006, 40007, 40008, 40009]
    assert Gatherer((), (), read_buckets=reader)._range_origins(RNG, ()) is None  # no --dest: unread
    assert len(asked) == 1
    off = Gatherer((), (DST,), read_buckets=lambda ports: Unavailable("REBIND_NO_BPF is set"))
    assert off._range_origins(RNG, ()) is None
    assert Gatherer((), (DST,), read_kernel=False, read_buckets=reader)._range_origins(RNG, ()) is None
    assert len(asked) == 1


def test_the_connection_walk_asks_for_bind_named_ports_only_in_the_fallback() -> None:
    g = Gatherer((), (DST,))
    with_group, without = g._conn_filter(RNG, True), g._conn_filter(RNG, False)
    assert with_group is not None and without is not None
    assert len(without) < len(with_group)
    assert without == Gatherer((), (DST,))._conn_filter(None)  # the range plays no part


def test_scan_conns_is_tally_conn_inlined() -> None:
    """fastdiag.scan_conns feeds the tally exactly as Tally.conn does, socket by socket: IPv4,
    IPv6 and v4-mapped addresses, TIME_WAIT leftovers, a listener's children, connections to a
    dest, a bind-named port of the range, and returns the payloads Tally.conn wants."""
    import socket as so
    from ipaddress import IPv6Address

    from rebind.exporter.facts import Watch
    from rebind.exporter.fastdiag import MSG, addr_key, scan_conns
    from rebind.exporter.tally import Tally
    from rebind.kernel import diag_codec as codec
    from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State

    def v4(a: str) -> bytes:
        return IPv4Address(a).packed + bytes(12)

    def mapped(a: str) -> bytes:
        return bytes(10) + b"\xff\xff" + IPv4Address(a).packed

    six = IPv6Address("fd00::1").packed
    socks = [  # family, state, timer, sport, dport, src, dst, expires
        (2, 1, 0, 8080, 40001, v4("10.0.0.1"), v4("10.0.0.9"), 0),  # a listener's child
        (2, 1, 0, 8080, 40002, v4("10.0.0.1"), v4("10.0.0.9"), 0),  # its second: only counted
        (2, 6, 3, 8080, 40003, v4("10.0.0.1"), v4("10.0.0.8"), 500),  # TIME_WAIT leftover
        (2, 6, 3, 8080, 40004, v4("10.0.0.1"), v4("10.0.0.8"), 900),
        (2, 5, 3, 8080, 40005, v4("10.0.0.1"), v4("10.0.0.8"), 100),  # orphaned FIN_WAIT2 mini
        (10, 1, 0, 8080, 40006, six, six, 0),  # not a child (no listener on fd00::1)
        (10, 1, 0, 9000, 40007, mapped("10.0.0.2"), mapped("10.0.0.9"), 0),
        (2, 1, 0, 40010, 5432, v4("10.0.0.1"), v4("10.0.0.5"), 0),  # to the dest, live
        (10, 6, 3, 40011, 5432, mapped("10.0.0.1"), mapped("10.0.0.5"), 20),  # to the dest, TIME_WAIT
        (2, 1, 0, 40012, 5555, v4("10.0.0.1"), v4("10.0.0.5"), 0),  # bind-named, in the range
        (2, 1, 0, 50000, 5555, v4("10.0.0.1"), v4("10.0.0.5"), 0),  # outside the range
    ]

    def msg(f: tuple[int, int, int, int, int, bytes, bytes, int], tag: int) -> bytes:
        fam, st, timer, sport, dport, src, dst, expires = f
        body = MSG.pack(
            fam, st, timer, 0, so.htons(sport), so.htons(dport), src, dst, 0, tag, 0, expires, 0, 0, 0, 0
        )
        body += bytes(8)  # an attribute's room: payloads are kept whole
        return codec.NLMSGHDR.pack(codec.NLMSGHDR.size + len(body), codec.TCPDIAG_GETSOCK, 2, 1, 0) + body

    msgs = [msg(f, i) for i, f in enumerate(socks)]
    data = b"".join(msgs) + codec.NLMSGHDR.pack(codec.NLMSGHDR.size + 4, codec.NLMSG_DONE, 2, 1, 0) + bytes(4)

    class Fake:
        def send(self, _req: bytes) -> None:
            pass

        def recv_into(self, buf: bytearray) -> int:
            buf[: len(data)] = data
            return len(data)

    class Sock:
        _sock = Fake()

    watches, dests = [Watch(8080), Watch(9000)], [DST, Dest(IPv4Address("10.0.0.5"), 5432)]
    rng = EphemeralRange(40000, 40099)

    def tally() -> Tally:
        t = Tally(watches, dests)
        here, anywhere = Endpoint(IPv4Address("10.0.0.1"), 8080), Endpoint(IPv4Address("0.0.0.0"), 0)
        t.server(SocketRecord(Proto.TCP, Family.INET, State.LISTEN, here, anywhere, 0, 1))
        t.client_range(rng)
        return t

    ref, got = tally(), tally()
    want = [
        m[codec.NLMSGHDR.size :]
        for m, (fam, st, timer, sport, dport, src, dst, exp) in zip(msgs, socks, strict=True)
        if ref.conn(
            st, timer == 3 and st in (6, 5), sport, dport, addr_key(fam, src), addr_key(fam, dst), exp
        )
    ]
    assert scan_conns(Sock(), b"", got) == want  # type: ignore[arg-type]
    assert len(want) == 4  # a child, a leftover, and the two sockets no listener explains
    assert got.counts == ref.counts and got.tw_max == ref.tw_max and got.peers() == ref.peers()
    assert got.dest_usage() == ref.dest_usage() and got.kept == ref.kept
    assert got.bind_held == ref.bind_held == {40012}


def test_bucket_groups_are_grouped_by_entry_and_an_unchanged_idle_range_by_one_comparison() -> None:
    """bindhash._grouped (read_port_bucket_groups): each distinct entry (but for the port) once
    with its ports, in order; an answer all equal to the last all-equal one is recognised whole,
    and any entry that differs from it is seen."""
    from rebind.kernel.bpf import bindhash
    from rebind.kernel.bpf.bindhashlayout import ENTRY, ENTRY_NAMES, RAN

    def entry(port: int, **kw: int) -> bytes:
        fields: dict[str, object] = {n: 0 for n in ENTRY_NAMES} | {"port": port, "flags": RAN} | kw
        fields |= {"fast_rcv_saddr": bytes(4), "fast_v6_rcv_saddr": bytes(16)}
        return ENTRY.pack(*(fields[n] for n in ENTRY_NAMES))

    ports = list(range(40000, 40100))
    idle = b"".join(entry(p) for p in ports)
    first = dict(bindhash._grouped(ports, idle))
    assert first == {idle[2 : ENTRY.size]: ports}
    assert dict(bindhash._grouped(ports, idle)) == first  # by the comparison this time
    held = b"".join(entry(p, matched=1) if p in (40003, 40050) else entry(p) for p in ports)
    got = dict(bindhash._grouped(ports, held))
    assert sorted(map(len, got.values())) == [2, 98]
    assert [40003, 40050] in got.values()
    assert dict(bindhash._grouped(ports[:50], idle[: 50 * ENTRY.size])) == {idle[2 : ENTRY.size]: ports[:50]}
