"""Issue 19's budget for a failing connect: `rebind trace`'s snapshot finds the sockets the
answer names by lookups and bucket walks (kernel/connect_lookup.py), not by inet_diag's walk of
the whole table. Its answer must be the dump's, field for field (a TIME_WAIT's time left apart:
the two reads are apart), on a range that holds every kind of port, with servers and
bound-inactive sockets outside the range too; and where a part cannot be had that way, the dump
answers.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from rebind.kernel import bindhash_table, connect_lookup, diag
from rebind.kernel.connect_facts import gather
from rebind.model.connect import ConnectRequest
from rebind.model.records import Proto, SocketRecord, State
from rebind.render.connect import result_json
from tests.kernel.test_connect_kernel import bpf_works
from tests.kernel.test_connect_range_kernel import REQUESTS, busy_range  # noqa: F401  (a fixture)


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What named_sockets answered, each time the gatherer asked."""
    got: list[object] = []
    real = connect_lookup.named_sockets

    def spy(*a: Any, **kw: Any) -> object:
        out = real(*a, **kw)
        got.append(out)
        return out

    monkeypatch.setattr(connect_lookup, "named_sockets", spy)
    return got


@pytest.fixture
def hz() -> int:
    if not bpf_works():
        pytest.skip("BPF cannot run here")
    got = bindhash_table.calibrate_hz()
    assert got is not None, "HZ could not be calibrated"
    return got


@pytest.fixture
def servers_too(busy_range: None) -> Iterator[None]:  # noqa: F811
    """Beside the busy range: a listener and a bound-inactive socket outside it (the servers a
    widened range must spare), a bind-made port outside it held by TIME_WAITs alone, and a
    connection to the destination from a port outside the range."""
    keep: list[socket.socket] = []
    try:
        keep.append(socket.create_server(("127.0.0.1", 7000)))
        inactive = socket.socket()
        inactive.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        inactive.bind(("127.0.0.1", 7001))
        keep.append(inactive)
        srv = socket.create_server(("127.0.0.1", 7002))
        c = socket.create_connection(("127.0.0.1", 7002))
        a, _ = srv.accept()
        a.close()  # the server closes first: its TIME_WAIT holds 7002, no listener does
        time.sleep(0.05)
        c.close()
        srv.close()
        fixed = socket.socket()
        fixed.bind(("127.0.0.1", 7003))
        fixed.connect(("127.0.0.1", 9000))
        keep.append(fixed)
        yield
    finally:
        for s in keep:
            s.close()


def _answer(req: ConnectRequest, lookups: bool) -> tuple[dict[str, object], frozenset[int] | None]:
    facts = gather(req, owners=True, summary=True, lookups=lookups)
    assert facts.buckets is not None, "the bind hash could not be read"
    doc = result_json(facts.evaluate(req))
    for t in doc["time_wait_to_destination"]:
        t["left_ms"] = None  # a time: the two reads are apart
    return doc, facts.servers


@pytest.mark.parametrize("how", list(REQUESTS))
def test_lookups_answer_as_the_dump_does(servers_too, hz, spied, how):
    req = ConnectRequest.create("127.0.0.1", 9000, **REQUESTS[how])  # type: ignore[arg-type]
    dumped, servers = _answer(req, lookups=False)
    assert not spied
    looked, looked_servers = _answer(req, lookups=True)
    assert len(spied) == 1 and isinstance(spied[0], connect_lookup.Named), (
        f"the lookups could not answer: {spied}"
    )
    assert looked == dumped
    assert looked_servers == servers
    assert servers is not None and {7000, 7001} <= servers and 7002 not in servers


def test_the_lookup_finds_the_range_s_connections_and_time_waits_to_the_destination(servers_too, hz):
    from rebind.kernel.connect_range import range_buckets

    req = ConnectRequest.create("127.0.0.1", 9000)
    outside = connect_lookup.outside_ports((40000, 40009))
    assert not isinstance(outside, str)
    # the listener, the bound-inactive socket, the TIME_WAIT-only server port and the fixed
    # client's port outside the range, and the destination's listeners: bind() made each
    assert {7000, 7001, 7002, 7003, 9000, 9001} <= set(outside.ports) and not outside.unknown
    rb = range_buckets((40000, 40009))
    assert not isinstance(rb, str)
    named = connect_lookup.named_sockets(req, req.dst, (40000, 40009), rb, outside)
    assert not isinstance(named, str)
    got = named.records

    def to_dst(recs: Iterable[SocketRecord]) -> set[tuple[int, str]]:
        return {
            (r.local.port, r.state.name)
            for r in recs
            if r.remote.port == 9000 and 40000 <= r.local.port <= 40009
        }

    with diag.DiagSocket() as d:
        dumped = to_dst(d.dump(None, Proto.TCP, frozenset(State)))
    # the fixture's two connections to the destination from the range (the server took the
    # first one's end and closed it: CLOSE_WAIT; the client closed the other one: FIN_WAIT2)
    assert len(dumped) == 2 and to_dst(got) == dumped
    assert any(r.local.port == 7001 and r.state.name == "BOUND_INACTIVE" for r in got)
    assert not any(r.local.port == 7002 for r in got), "a TIME_WAIT outside the range is no server"


def test_without_hz_the_dump_answers(servers_too, hz, spied, monkeypatch):
    from rebind.kernel import hz

    # HZ known from nowhere: not measured, no boot cache, no kernel configuration
    monkeypatch.setattr(hz, "_MEMO", {})
    monkeypatch.setattr(hz, "config_hz", lambda: None)
    monkeypatch.setattr(hz, "cache_key", lambda: None)
    req = ConnectRequest.create("127.0.0.1", 9000)
    dumped, _ = _answer(req, lookups=False)
    assert _answer(req, lookups=True)[0] == dumped
    assert spied == ["HZ not calibrated"]


def test_many_bind_made_ports_go_to_the_dump(servers_too, hz, spied, monkeypatch):
    monkeypatch.setattr(connect_lookup, "PORTS_MAX", 1)
    req = ConnectRequest.create("127.0.0.1", 9000)
    dumped, _ = _answer(req, lookups=False)
    assert _answer(req, lookups=True)[0] == dumped
    assert len(spied) == 1 and isinstance(spied[0], str) and "one by one" in spied[0]


def test_an_owner_walk_can_keep_one_state(netns, hz):
    """The owners program's ONLY_STATE: a port's bound-inactive socket among its TIME_WAITs,
    the others walked past in the kernel."""
    srv = socket.create_server(("127.0.0.1", 7100))
    clients = []
    for _ in range(50):
        c = socket.create_connection(("127.0.0.1", 7100))
        a, _ = srv.accept()
        a.close()
        clients.append(c)
    srv.close()
    time.sleep(0.05)
    for c in clients:
        c.close()
    inactive = socket.socket()
    inactive.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    inactive.bind(("127.0.0.2", 7100))
    try:
        every = bindhash_table.read_port_sockets(7100, 1000)
        only = bindhash_table.read_port_sockets(7100, 1000, only_state=connect_lookup.TCP_CLOSE)
        assert not isinstance(every, str) and not isinstance(only, str)
        assert len(every.owners.sockets) == 51
        assert [(s.local.addr.exploded, s.state.name) for s in only.owners.sockets] == [
            ("127.0.0.2", "CLOSE")
        ]
        assert only.inodes == tuple(i for i in every.inodes if i)
        assert not only.owners.truncated
        # the limit counts what is kept: 50 TIME_WAITs walked past do not cut a 1-record read
        assert not bindhash_table.read_port_sockets(
            7100, 1, only_state=connect_lookup.TCP_CLOSE
        ).owners.truncated
    finally:
        inactive.close()


def test_trace_s_failing_connect_snapshot_reads_by_lookups(netns, hz, spied, monkeypatch):
    """`rebind trace`'s snapshot of a failing connect (trace_snapshot._connect_snapshot) takes
    the lookups, and says what the dump says: where the range went, and who holds it."""
    import os
    import threading
    from ipaddress import ip_address

    from rebind.kernel.trace_snapshot import snapshot
    from rebind.model.trace import AF_INET, Kind, TraceEvent
    from tests.kernel.test_connect_kernel import write

    write("ip_local_port_range", "40000 40003")
    srv = socket.create_server(("127.0.0.1", 9100))
    held = [srv, *(socket.create_connection(("127.0.0.1", 9100)) for _ in range(4))]
    s = socket.socket()
    held.append(s)
    try:
        with pytest.raises(OSError) as got:
            s.connect(("127.0.0.1", 9100))
        assert got.value.errno == errno.EADDRNOTAVAIL
        ev = TraceEvent(
            kind=Kind.CONNECT,
            errno=errno.EADDRNOTAVAIL,
            pid=os.getpid(),
            tid=threading.get_native_id(),
            comm="pytest",
            cgroup_id=0,
            netns=netns,
            family=AF_INET,
            proto=Proto.TCP,
            fd=s.fileno(),
            addr=ip_address("127.0.0.1"),
            port=9100,
            mono_ns=time.monotonic_ns(),
        )
        snap = snapshot(ev)
        assert len(spied) == 1 and isinstance(spied[0], connect_lookup.Named), spied
        assert snap.reason.startswith("0 of 4 ports of 40000-40003 usable"), snap.reason
        assert f"(pid {os.getpid()})" in snap.reason
        monkeypatch.setattr(connect_lookup, "named_sockets", lambda *a, **kw: "not asked")
        dumped = snapshot(ev)
        assert (snap.verdict, snap.reason, snap.blockers, snap.headline) == (
            dumped.verdict,
            dumped.reason,
            dumped.blockers,
            dumped.headline,
        )
    finally:
        for x in held:
            x.close()


def test_every_socket_of_the_fixed_port_is_read(netns, hz, spied):
    """A fixed local port (bind(port) + connect()) is judged by the bind rules against every
    socket on it: a bind(ip, 0)-made port's TIME_WAIT to another peer included (the connect
    oracle's scenario 12 at seed 12, which the lookups missed once)."""
    from tests.kernel.test_connect_kernel import write

    write("ip_local_port_range", "40000 40001")
    srv = socket.create_server(("127.0.0.1", 9001))
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("127.0.0.2", 0))
    port = c.getsockname()[1]
    c.connect(("127.0.0.1", 9001))
    a, _ = srv.accept()
    c.close()  # the client closes first: its TIME_WAIT holds the bind-made port
    time.sleep(0.05)
    a.close()
    srv.close()
    req = ConnectRequest.create("127.0.0.1", 9000, src="127.0.0.2", local_port=port)
    dumped, _ = _answer(req, lookups=False)
    looked, _ = _answer(req, lookups=True)
    assert isinstance(spied[-1], connect_lookup.Named)
    assert looked == dumped
    probe = socket.socket()
    with pytest.raises(OSError) as got:  # the kernel's answer, which both give
        probe.bind(("127.0.0.2", port))
    probe.close()
    assert looked["errno"] == "EADDRINUSE" == errno.errorcode[got.value.errno]


@pytest.fixture
def ipv6_range(netns: int) -> Iterator[None]:
    """A range of IPv6 connections to [::1]:9000 (one closed first by the client: its
    TIME_WAIT), and IPv6 sockets talking IPv4 (v4-mapped) to 127.0.0.1:9000."""
    from tests.kernel.test_connect_kernel import write

    write("ip_local_port_range", "40000 40007")
    write("tcp_tw_reuse", "2")
    keep: list[socket.socket] = []
    try:
        srv6 = socket.create_server(("::1", 9000), family=socket.AF_INET6)
        srv4 = socket.create_server(("127.0.0.1", 9000))
        keep += [srv6, srv4]
        for _ in range(3):
            keep.append(socket.create_connection(("::1", 9000)))
        tw = socket.create_connection(("::1", 9000))
        tw.close()  # the client closes first: TIME_WAIT (the server never accepts: FIN_WAIT2)
        for _ in range(2):
            m = socket.socket(socket.AF_INET6)
            m.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            m.connect(("::ffff:127.0.0.1", 9000))
            keep.append(m)
        time.sleep(0.05)
        yield
    finally:
        for s in keep:
            s.close()


@pytest.mark.parametrize("dst", ["::1", "127.0.0.1"])
def test_ipv6_and_v4_mapped_connections_are_found(ipv6_range, hz, spied, dst):
    """IPv6 4-tuples are looked up as IPv6 (36-byte tuples), an IPv6 socket talking IPv4 as
    IPv4 (tcp_v6_connect hands it to tcp_v4_connect: hashed by its IPv4 addresses)."""
    req = ConnectRequest.create(dst, 9000)
    dumped, _ = _answer(req, lookups=False)
    looked, _ = _answer(req, lookups=True)
    assert isinstance(spied[-1], connect_lookup.Named)
    assert looked == dumped
    named = spied[-1].records
    to_dst = [r for r in named if r.remote.port == 9000 and 40000 <= r.local.port <= 40007]
    assert len(to_dst) == (4 if dst == "::1" else 2), to_dst
