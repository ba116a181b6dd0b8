"""The exporter's port origins from the kernel's bind hash (exporter/origins.py), against the
fallback (the client walk and one lookup per port) and against the kernel's own connect().

Every socket is opened by the test in its own network namespace; the gatherer runs in-process
there (the bind hash is read for the caller's namespace)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from prometheus_client.registry import CollectorRegistry

from rebind.exporter import gather as gather_mod
from rebind.exporter.facts import Dest, Snapshot, Watch
from rebind.exporter.families import families
from rebind.exporter.gather import Gatherer
from rebind.model.sockstate import Unavailable

LO, HI = 40000, 40009
DEST = Dest(IPv4Address("127.0.0.1"), 5432)
FREE = (("rebind_connect_free_ports", (("dport", "5432"), ("dst", "127.0.0.1"), ("src", "127.0.0.1"))),)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:  # per-netns
        f.write(value + "\n")


def _bindhash_or_skip() -> None:
    from rebind.kernel.bpf.bindhash import read_port_buckets
    from rebind.kernel.bpf.sockiter import prepare

    for got in (read_port_buckets([1]), prepare()):
        if isinstance(got, Unavailable):
            pytest.skip(f"BPF: {got.reason}")


def _samples(snap: Snapshot) -> Samples:
    reg = CollectorRegistry()

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            return families(snap)

    reg.register(One())  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in reg.collect()
        for s in fam.samples
        if s.name != "rebind_scrape_duration_seconds"
    }


def _connects_left(keep: list[socket.socket]) -> int:
    """How many more connect()s to DEST the kernel allows (each kept open)."""
    more = 0
    while True:
        try:
            keep.append(socket.create_connection((str(DEST.addr), DEST.port)))
            more += 1
        except OSError:
            return more


@pytest.fixture
def clients(netns: int) -> Iterator[tuple[list[socket.socket], frozenset[int]]]:
    """Ports of a 10-port range held every way: a listener (40009) and a bound-inactive socket
    (40008) on ports bind() named, a bound-inactive socket and two clients on ports bind(ip, 0)
    picked, two clients whose ports connect() chose (shared by another destination). Yields the
    sockets and the ports bind() holds (connect() skips them for every destination)."""
    _sysctl("ip_local_port_range", f"{LO} {HI}")
    _sysctl("ip_local_reserved_ports", "")
    _sysctl("tcp_tw_reuse", "0")
    keep: list[socket.socket] = [socket.create_server(("127.0.0.1", p)) for p in (5432, 5433)]
    try:
        keep.append(socket.create_server(("127.0.0.1", HI)))
        named = socket.socket()
        named.bind(("127.0.0.1", HI - 1))  # bound-inactive, SOCK_BINDPORT_LOCK
        keep.append(named)
        held = {HI, HI - 1}
        for _ in range(2):
            c = socket.socket()
            c.bind(("127.0.0.1", 0))  # bind(ip, 0): no lock shows it, only the bucket
            c.connect(("127.0.0.1", 5433))
            keep.append(c)
            held.add(c.getsockname()[1])
        for _ in range(2):
            keep.append(socket.create_connection(("127.0.0.1", 5433)))  # connect()-made buckets
        idle = socket.socket()
        idle.bind(("127.0.0.1", 0))  # bound-inactive on a port bind(ip, 0) picked
        keep.append(idle)
        held.add(idle.getsockname()[1])
        assert len(held) == 5 and all(LO <= p <= HI for p in held)
        yield keep, frozenset(held)
    finally:
        for s in keep:
            s.close()


def test_bindhash_gives_the_fallbacks_metrics_and_the_kernels_answer(clients) -> None:  # type: ignore[no-untyped-def]
    """bind(ip, 0) ports, connect()-made ports, bound-inactive sockets and a listener in the
    range: the same metrics whether the buckets come from the bind hash (one read of the range,
    no client walk) or the fallback (a walk of the range's client sockets, one lookup per port),
    and the free count is what connect() still gets from the kernel."""
    _bindhash_or_skip()
    keep, held = clients
    walked: list[list[int]] = []

    def spy(reps):  # type: ignore[no-untyped-def]
        walked.append(sorted(reps))
        return gather_mod.read_connect_only(reps)

    watches = [Watch(5432), Watch(HI)]
    fast = Gatherer(watches, [DEST], read_origins=spy)()
    assert walked == []  # the bind hash answered: no client walk, no lookups
    assert fast.origins.bind_made == held - {HI} and not fast.origins.unknown
    slow = Gatherer(watches, [DEST], read_origins=spy, read_buckets=lambda ports: Unavailable("forced"))()
    assert len(walked) == 1 and len(walked[0]) == 4  # the fallback: the 4 clients' ports read
    s = _samples(fast)
    assert s == _samples(slow)
    assert s[("rebind_ephemeral_bind_held_ports", ())] == len(held) == 5
    assert not [k for k in s if k[0] == "rebind_exporter_missing"]
    free = s[FREE[0]]
    assert free == (HI - LO + 1) - len(held) == _connects_left(keep)  # model == kernel


def test_bucket_groups_are_the_per_port_answer_grouped(clients) -> None:  # type: ignore[no-untyped-def]
    """bindhash.read_port_bucket_groups (the exporter's read) is read_port_buckets, grouped."""
    _bindhash_or_skip()
    from rebind.kernel.bpf.bindhash import read_port_bucket_groups, read_port_buckets

    ports = [*range(LO - 5, HI + 5), 0, 70000]  # outside 1-65535: left out by both
    per_port, groups = read_port_buckets(ports), read_port_bucket_groups(ports)
    assert not isinstance(groups, Unavailable) and not isinstance(per_port, Unavailable)
    assert {p: b for b, ps in groups for p in ps} == per_port
    assert sum(len(ps) for _b, ps in groups) == len(per_port) == HI - LO + 10
    assert len(groups) < 6  # a handful of distinct buckets, each decoded once


def test_a_bound_inactive_port_is_held_at_once_however_old_the_bound_walk(clients, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The bound-inactive walk (bhash2, every bound socket of the host) is reused for up to
    ``slow_every`` seconds when it is dear. A socket bound since, on a port of the range, was
    counted free until the next walk: connect() says otherwise. The bind hash is read every
    scrape, so it is held at once. (Fails on main: 1 port free too many.)"""
    _bindhash_or_skip()
    keep, _held = clients
    monkeypatch.setattr(gather_mod, "CHEAP_WALK_S", 0.0)  # every walk counts as dear: reused
    g = Gatherer([Watch(5432)], [DEST])
    first = _samples(g())
    late = socket.socket()
    late.bind(("127.0.0.1", 0))  # bound-inactive, after the walk
    keep.append(late)
    s = _samples(g())
    assert s[("rebind_ephemeral_bind_held_ports", ())] == first[("rebind_ephemeral_bind_held_ports", ())] + 1
    assert s[FREE[0]] == first[FREE[0]] - 1 == _connects_left(keep)  # model == kernel


def test_a_servers_time_wait_in_the_range_holds_its_port_both_ways(netns) -> None:  # type: ignore[no-untyped-def]
    """A server on a port of the range closed first, then went: its TIME_WAIT keeps the bucket
    bind() made (tw_tb), so connect() skips the port. The bind hash and the fallback (the
    TIME_WAIT is a client socket without a lock to inet_diag) say so alike, and the kernel too."""
    _bindhash_or_skip()
    _sysctl("ip_local_port_range", f"{LO} {HI}")
    _sysctl("ip_local_reserved_ports", "")
    _sysctl("tcp_tw_reuse", "0")
    keep = [socket.create_server(("127.0.0.1", DEST.port))]
    try:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", HI - 2))
        srv.listen()
        c = socket.socket()
        c.bind(("127.0.0.1", 50000))  # outside the range: only the server's port is in it
        c.connect(("127.0.0.1", HI - 2))
        a, _ = srv.accept()
        a.close()  # the server closes first: its side ends in TIME_WAIT
        c.recv(1)
        c.close()
        srv.close()
        fast = Gatherer([Watch(DEST.port)], [DEST])()
        slow = Gatherer([Watch(DEST.port)], [DEST], read_buckets=lambda ports: Unavailable("forced"))()
        assert fast.origins.bind_made == slow.origins.bind_made == {HI - 2}
        s = _samples(fast)
        assert s == _samples(slow)
        assert s[FREE[0]] == HI - LO == _connects_left(keep)  # model == kernel
    finally:
        for k in keep:
            k.close()
