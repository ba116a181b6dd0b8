"""Destination bytecode against the real kernel: the audit accepts it and it filters exactly."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from rebind.kernel import diag
from rebind.kernel import diag_codec as c
from rebind.kernel.connect_facts import connect_bytecode
from rebind.model.connect import ConnectRequest
from rebind.model.records import Family, Proto, SocketRecord, State

LO, HI = 40000, 40099


@pytest.fixture
def table(netns: int) -> Iterator[list[socket.socket]]:
    """Servers on 9000/9001 (v4) and 9000 (v6), clients to each, a listener and a bound socket
    inside the range, and a dual-stack client to ::ffff:127.0.0.1."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{LO} {HI}")
    socks: list[socket.socket] = []
    servers = [
        socket.create_server(("127.0.0.1", 9000)),
        socket.create_server(("127.0.0.1", 9001)),
        socket.create_server(("127.0.0.2", 9000)),
        socket.create_server(("::", 9000), family=socket.AF_INET6, dualstack_ipv6=False),
    ]
    socks += servers
    # Bound first: connect() then skips their ports (C6), so no client lands on them.
    lst = socket.socket()
    lst.bind(("127.0.0.3", LO + 50))
    lst.listen()
    bound = socket.socket()
    bound.bind(("127.0.0.3", LO + 51))
    out_of_range = socket.socket()
    out_of_range.bind(("127.0.0.3", HI + 5))
    socks += [lst, bound, out_of_range]
    for host, port, n in (
        ("127.0.0.1", 9000, 5),
        ("127.0.0.1", 9001, 3),
        ("127.0.0.2", 9000, 2),
        ("::1", 9000, 4),
    ):
        for _ in range(n):
            socks.append(socket.create_connection((host, port)))
    mapped = socket.socket(socket.AF_INET6)
    mapped.connect(("::ffff:127.0.0.1", 9000))
    socks.append(mapped)
    for s in servers:
        s.settimeout(1)
        try:
            while True:
                socks.append(s.accept()[0])
        except TimeoutError:
            pass
    yield socks
    for s in socks:
        s.close()


def dump(bc: bytes) -> list[SocketRecord]:
    with diag.DiagSocket() as d:
        return list(d.dump(None, Proto.TCP, frozenset(State), bytecode=bc))


def _dst(r: SocketRecord) -> tuple[str, int]:
    a = r.remote.addr
    if isinstance(a, IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(a), r.remote.port


def test_destination_filter_exact(table):
    got = dump(c.destination_filter(IPv4Address("127.0.0.1"), 9000))
    # 5 IPv4 clients + the v4-mapped IPv6 client: an AF_INET condition matches ::ffff:127.0.0.1.
    assert len(got) == 6 and {_dst(r) for r in got} == {("127.0.0.1", 9000)}
    assert sum(r.family is Family.INET6 for r in got) == 1
    got = dump(c.destination_filter(IPv6Address("::1"), 9000))
    assert len(got) == 4 and all(r.family is Family.INET6 for r in got)
    assert len(dump(c.destination_filter(IPv4Address("127.0.0.2"), 9000))) == 2
    assert dump(c.destination_filter(IPv4Address("127.0.0.1"), 9002)) == []


def test_port_comparisons_on_the_destination(table):
    chain = [[c.port_cond(c.BcOp.D_GE, 9001), c.port_cond(c.BcOp.D_LE, 9001)]]
    got = dump(c.compile_any(chain))
    assert len(got) == 3 and all(r.remote.port == 9001 for r in got)
    got = dump(c.compile_any([[c.port_cond(c.BcOp.D_EQ, 9001)]]))
    assert len(got) == 3


def test_source_condition_with_prefix(table):
    got = dump(
        c.compile_any([[c.host_cond(c.BcOp.S_COND, IPv4Address("127.0.0.0"), prefix_len=8, port=LO + 50)]])
    )
    assert [(str(r.local.addr), r.state) for r in got] == [("127.0.0.3", State.LISTEN)]


def test_connect_bytecode_selects_what_the_model_needs(table):
    req = ConnectRequest.create("127.0.0.1", 9000)
    got = dump(connect_bytecode(req, ip_address("127.0.0.1"), (LO, HI)))
    to_dst = [r for r in got if _dst(r) == ("127.0.0.1", 9000)]
    assert len(to_dst) == 6
    # Every socket on a port of the range, whatever its peer: the listener, the bound socket and
    # the clients to other destinations (one of them may hold its port by bind(): issue 17) --
    # not the servers (9000, 9001), their accepted children, nor the bound socket outside it.
    everything = dump(c.compile_any([[c.port_cond(c.BcOp.S_GE, 0)]]))
    in_range = sorted((r.local.port, r.inode) for r in everything if LO <= r.local.port <= HI)
    assert sorted((r.local.port, r.inode) for r in got) == in_range
    assert len(in_range) == 5 + 3 + 2 + 4 + 1 + 2
    assert {(r.local.port, r.state) for r in got if r.remote.port == 0} == {
        (LO + 50, State.LISTEN),
        (LO + 51, State.BOUND_INACTIVE),
    }


def test_connect_bytecode_for_bind_before_connect_and_fixed_port(table):
    req = ConnectRequest.create("127.0.0.1", 9000, src="127.0.0.3", bind_before_connect=True)
    got = dump(connect_bytecode(req, ip_address("127.0.0.3"), (LO, HI)))
    # Everything in the range on 127.0.0.3 (listener, bound) and the destination's clients.
    assert {str(r.local.addr) for r in got} >= {"127.0.0.3"}
    assert {r.local.port for r in got if str(r.local.addr) == "127.0.0.3"} == {LO + 50, LO + 51}
    req = ConnectRequest.create("127.0.0.1", 9000, src="127.0.0.3", local_port=HI + 5)
    got = dump(connect_bytecode(req, ip_address("127.0.0.3"), (LO, HI)))
    assert HI + 5 in {r.local.port for r in got}
