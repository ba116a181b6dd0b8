"""inet_diag bytecode against the real kernel: the audit accepts it, and it filters exactly."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from rebind.errors import KernelError
from rebind.kernel import diag
from rebind.kernel import diag_codec as c
from rebind.model.records import Family, Proto, State

BASE = 21000
COUNT = 200


@pytest.fixture
def listeners(netns: int) -> Iterator[list[socket.socket]]:
    """TCP listeners on BASE..BASE+COUNT-1 (v4 and v6) and UDP sockets on the same ports."""
    socks: list[socket.socket] = []
    for i in range(COUNT):
        socks.append(socket.create_server(("127.0.0.1", BASE + i)))
        if i % 2:
            socks.append(socket.create_server(("::1", BASE + i), family=socket.AF_INET6))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", BASE + i))
        socks.append(u)
    yield socks
    for s in socks:
        s.close()


def _ports(
    family: Family | None, proto: Proto, bc: bytes, states: frozenset[State] = frozenset(State)
) -> list[int]:
    with diag.DiagSocket() as d:
        return [r.local.port for r in d.dump(family, proto, states, bytecode=bc)]


@pytest.mark.parametrize("n", [1, 2, 5, 100])
def test_port_filter_accepted_and_exact(listeners, n):
    wanted = {BASE + 2 * i for i in range(n)}  # every other port: neighbours must not leak in
    bc = c.port_filter(wanted)
    v4 = _ports(Family.INET, Proto.TCP, bc)
    assert sorted(v4) == sorted(wanted)
    # One TCPDIAG_GETSOCK walk, both families: v6 listeners exist on odd ports only.
    anyfam = _ports(None, Proto.TCP, bc)
    assert sorted(anyfam) == sorted(wanted | {p for p in wanted if (p - BASE) % 2})
    odd = {BASE + 2 * i + 1 for i in range(n)}
    assert sorted(_ports(Family.INET6, Proto.TCP, c.port_filter(odd))) == sorted(odd)
    udp = _ports(Family.INET, Proto.UDP, bc, frozenset({State.CLOSE}))
    assert sorted(udp) == sorted(wanted)


def test_port_range_filter_accepted_and_exact(listeners):
    got = _ports(Family.INET, Proto.TCP, c.port_range_filter(BASE + 10, BASE + 19))
    assert sorted(got) == list(range(BASE + 10, BASE + 20))
    assert _ports(Family.INET, Proto.TCP, c.port_range_filter(BASE + 19, BASE + 10)) == []


def test_largest_filter_is_accepted(listeners):
    ports = range(BASE - 2000, BASE - 2000 + c.MAX_FILTER_PORTS)  # covers BASE..BASE+2095
    got = _ports(Family.INET, Proto.TCP, c.port_filter(ports))
    assert sorted(got) == list(range(BASE, BASE + COUNT))


def test_more_ports_than_one_filter_holds(listeners):
    """iter_sockets splits a long port list over several dumps; nothing is lost or repeated."""
    ports = [*range(1, c.MAX_FILTER_PORTS + 1), BASE + 7, BASE + 150]
    got = [r.local.port for r in diag.iter_sockets(protos=[Proto.TCP], families=[Family.INET], ports=ports)]
    assert sorted(got) == [BASE + 7, BASE + 150]


def test_malformed_bytecode_is_rejected_by_the_audit(netns):
    """The kernel really audits what we send: a bad jump gives EINVAL, as a KernelError."""
    bad = struct.pack("=BBH", c.BcOp.S_EQ, 3, 12) + struct.pack("=BBH", 0, 0, 80)
    with pytest.raises(KernelError) as exc:
        _ports(Family.INET, Proto.TCP, bad)
    assert exc.value.errno == errno.EINVAL


def test_single_port_shortcut_keeps_every_state(netns):
    """sport in the request lets the kernel skip other ports; no state on the port may vanish."""
    port = 21500
    bound = socket.socket()
    bound.bind(("127.0.0.1", port + 1))  # a neighbour, bound-inactive: must not appear
    srv = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=True)
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()
    cli2 = socket.create_connection(("::1", port))
    acc2, _ = srv.accept()
    acc2.close()  # server side closes first...
    cli2.close()  # ...and the client answers: server-side TIME_WAIT on the port
    inactive = socket.socket(socket.AF_INET6)
    inactive.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # same uid: may share the port
    inactive.bind(("::1", port))
    time.sleep(0.05)
    recs = list(diag.iter_sockets(protos=[Proto.TCP], ports=[port]))
    seen = {(r.family, r.state) for r in recs}
    assert {r.local.port for r in recs} == {port}
    assert (Family.INET6, State.LISTEN) in seen
    assert (Family.INET6, State.ESTABLISHED) in seen  # the accepted v4-mapped connection
    assert (Family.INET6, State.TIME_WAIT) in seen
    assert (Family.INET6, State.BOUND_INACTIVE) in seen
    for s in (bound, srv, cli, acc, inactive):
        s.close()
