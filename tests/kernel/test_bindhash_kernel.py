"""The bind-hash reader (kernel/bpf/bindhash.py) says what the kernel holds: for each scenario
made here by real socket calls, a port's bucket exists (or not) and is connect()-made exactly as
the 4-tuple lookup (socklookup.lookup_port_buckets) and the socket iterator say, and
read_port_owners returns exactly the iterator's sockets for the port (model == kernel).

Where the iterator cannot see a socket (bound, not listening: in no hash it walks), the kernel's
own behaviour is the oracle: a second bind() of the port fails with EADDRINUSE.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address

import pytest

from rebind.kernel import netns as nsmod
from rebind.kernel.bpf.bindhash import prepare_port_owners, read_port_buckets, read_port_owners
from rebind.kernel.bpf.sockiter import load_sock_layout, read_socket_states
from rebind.kernel.bpf.socklookup import lookup_port_buckets
from rebind.model.records import Proto, State
from rebind.model.sockstate import PortBucket, PortOwners, SockState, Unavailable

LIMIT = 4096


def _buckets(port: int) -> PortBucket:
    got = read_port_buckets([port], owners=True)
    assert not isinstance(got, Unavailable), got.reason
    b = got[port]
    assert b.known and not b.counts_truncated, b
    return b


def _owners(port: int) -> PortOwners:
    got = read_port_owners(port, LIMIT)
    assert not isinstance(got, Unavailable), got.reason
    assert not got.truncated and not got.faulted and not got.inconsistent, got
    return got


def _iterated(port: int) -> list[SockState]:
    got = read_socket_states([port], [Proto.TCP])
    assert not isinstance(got, Unavailable), got.reason
    assert got.faulted == 0
    return list(got.sockets)


def _cookie(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")  # SO_COOKIE


def _view(st: SockState) -> tuple[object, ...]:
    """What the two readers must agree on for one socket (the iterator's order apart)."""
    return (st.cookie, st.state, st.kind, st.family, st.local, st.remote, st.reuse, st.reuseport, st.ipv6only,
            st.bound_dev_if, st.userlocks, st.sk_uid, st.tw_substate, st.tw_connect_bind, st.bucket,
            st.tw_ts_recent, st.netns)  # fmt: skip


def _same_as_iterator(port: int, extra: frozenset[int] = frozenset()) -> PortOwners:
    """read_port_owners(port) == the iterator's sockets of the port; ``extra``: cookies of
    sockets only the bind hash holds (bound, not listening). The iterator runs first: it makes
    the cookies (bpf_get_socket_cookie) that the owners' records read as held."""
    walked = sorted(map(_view, _iterated(port)), key=str)
    owners = _owners(port)
    mine = sorted((_view(s) for s in owners.sockets if s.cookie not in extra), key=str)
    assert mine == walked
    assert {s.cookie for s in owners.sockets} >= extra
    return owners


def _lookup(port: int, s: socket.socket) -> tuple[int, int] | None:
    """The port's bucket (fastreuse, fastreuseport) through this connected socket's 4-tuple."""
    local, remote = s.getsockname(), s.getpeername()
    got = lookup_port_buckets(
        load_sock_layout(), [(port, ip_address(local[0]).packed, ip_address(remote[0]).packed, remote[1])]
    )
    assert not isinstance(got, Unavailable), got.reason
    return got[0]


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


def _tcp(held: list[socket.socket], *, reuseaddr: bool = False, reuseport: bool = False) -> socket.socket:
    s = socket.socket()
    held.append(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    return s


def _listener(
    held: list[socket.socket], addr: str = "127.0.0.1", port: int = 0, **flags: bool
) -> socket.socket:
    s = _tcp(held, **flags)
    s.bind((addr, port))
    s.listen()
    return s


def test_a_listener_and_a_connect_made_port(netns: int, closing: list[socket.socket]) -> None:
    srv = _listener(closing)
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    closing.append(c)
    a, _ = srv.accept()
    closing.append(a)
    cport = c.getsockname()[1]
    b, cb = _buckets(port), _buckets(cport)
    assert b.exists and not b.connect_made and (b.bind2, b.owners) == (1, 2)  # listener + accepted
    assert cb.exists and cb.connect_made and (cb.fastreuse, cb.fastreuseport) == (-1, -1)
    assert (cb.fastreuse, cb.fastreuseport) == _lookup(cport, c)
    assert (b.fastreuse, b.fastreuseport) == _lookup(port, a)
    for p, want in ((port, b), (cport, cb)):
        (st, *_) = _iterated(p)
        assert st.bucket is not None
        assert want.bind_bucket(p) == replace(st.bucket, bind2_fastreuse=None, bind2_fastreuseport=None)
    owners = _same_as_iterator(port)
    assert {s.cookie for s in owners.sockets} == {_cookie(srv), _cookie(a)}
    assert (owners.buckets, owners.bind2, owners.netns) == (1, 1, netns)
    assert {s.cookie for s in _same_as_iterator(cport).sockets} == {_cookie(c)}


def test_a_bound_socket_holds_its_port_where_no_walk_sees_it(
    netns: int, closing: list[socket.socket]
) -> None:
    s = _tcp(closing, reuseaddr=True)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    b = _buckets(port)
    assert b.exists and not b.connect_made and b.owners == 1
    assert _iterated(port) == []  # BOUND_INACTIVE: in no hash the iterator walks
    other = _tcp(closing)
    with pytest.raises(OSError) as err:
        other.bind(("127.0.0.1", port))
    assert err.value.errno == errno.EADDRINUSE  # the kernel's own answer: the port is held
    (st,) = _same_as_iterator(port, frozenset({_cookie(s)})).sockets
    assert st.state is State.CLOSE and st.reuseaddr and st.addr_locked and not st.port_locked  # bind(ip, 0)


def test_a_port_made_by_bind_to_port_zero(netns: int, closing: list[socket.socket]) -> None:
    srv = _listener(closing)
    c = _tcp(closing)
    c.bind(("127.0.0.1", 0))  # inet_csk_get_port picks it: a bind()-made bucket
    c.connect(srv.getsockname())
    cport = c.getsockname()[1]
    b = _buckets(cport)
    assert b.exists and not b.connect_made and (b.fastreuse, b.fastreuseport) == (0, 0)
    assert (b.fastreuse, b.fastreuseport) == _lookup(cport, c)
    assert {s.cookie for s in _same_as_iterator(cport).sockets} == {_cookie(c)}


def test_reuse_listeners_on_two_addresses(netns: int, closing: list[socket.socket]) -> None:
    first = _listener(closing, reuseaddr=True, reuseport=True)
    port = first.getsockname()[1]
    second = _listener(closing, "127.0.0.2", port, reuseaddr=True, reuseport=True)
    b = _buckets(port)
    assert (b.buckets, b.bind2, b.owners) == (1, 2, 2)
    assert b.fastreuseport and b.fastreuseport > 0 and b.fastuid == 0  # the SO_REUSEPORT cache
    (st, *_) = _iterated(port)
    assert st.bucket is not None and (st.bucket.fastreuse, st.bucket.fastreuseport) == (
        b.fastreuse,
        b.fastreuseport,
    )
    assert st.bucket.fastuid == b.fastuid and st.bucket.fast_rcv_saddr == b.fast_rcv_saddr
    owners = _same_as_iterator(port)
    assert {s.cookie for s in owners.sockets} == {_cookie(first), _cookie(second)} and owners.bind2 == 2


def test_time_waits_after_a_server_side_close(netns: int, closing: list[socket.socket]) -> None:
    srv = _listener(closing)
    port = srv.getsockname()[1]
    for _ in range(5):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        a.close()  # the server closes first: its end goes to TIME_WAIT
        c.close()
    srv.close()
    deadline = time.monotonic() + 10
    while len(_iterated(port)) < 5:
        assert time.monotonic() < deadline, "the TIME_WAITs never showed"
        time.sleep(0.01)
    b = _buckets(port)
    assert b.exists and b.owners == 5 and not b.connect_made
    owners = _same_as_iterator(port)
    assert len(owners.sockets) == 5 and {s.state for s in owners.sockets} == {State.TIME_WAIT}
    cut = read_port_owners(port, 2)
    assert isinstance(cut, PortOwners) and cut.truncated and len(cut.sockets) == 2


def test_a_port_nobody_holds(netns: int, closing: list[socket.socket]) -> None:
    s = _tcp(closing)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # never listened nor connected: the bucket goes with it
    b = _buckets(port)
    assert not b.exists and b.known and b.bind_bucket(port) is None
    assert _iterated(port) == []
    got = _owners(port)
    assert got.sockets == () and (got.buckets, got.bind2) == (0, 0)


def test_another_namespaces_sockets_are_not_reported(netns: int, closing: list[socket.socket]) -> None:
    """All namespaces share the bind hash (hashinfo is global unless tcp_child_ehash_entries
    is set): the program must match the bucket's net, not only the port."""
    with nsmod.private_netns() as other:
        assert other != netns
        far = _listener(closing)
        port = far.getsockname()[1]
        here = _buckets(port)
        assert here.exists
    assert not _buckets(port).exists and _owners(port).sockets == ()
    assert isinstance(read_port_buckets([port], netns=other), Unavailable)  # not this thread's
    assert isinstance(read_port_owners(port, 10, netns=other), Unavailable)
    assert not isinstance(read_port_buckets([port], netns=netns), Unavailable)
    near = _listener(closing, port=port)
    owners = _same_as_iterator(port)
    assert {s.cookie for s in owners.sockets} == {_cookie(near)} and owners.buckets == 1
    assert all(s.netns == netns for s in owners.sockets)


def test_the_owners_program_loads_ahead_and_answers_at_once(netns: int, closing: list[socket.socket]) -> None:
    assert prepare_port_owners(LIMIT) is None
    srv = _listener(closing)
    port = srv.getsockname()[1]
    t0 = time.perf_counter()
    got = _owners(port)
    took = time.perf_counter() - t0
    assert took < 0.5  # no program load: a run and a decode (generous for a loaded CI host)
    # the cookie as the socket holds it: none until something asks (sock_gen_cookie)
    assert [s.cookie for s in got.sockets] == [0]
    made = _cookie(srv)  # SO_COOKIE makes it
    assert [s.cookie for s in _owners(port).sockets] == [made]


def test_ipv6_and_ipv4_sockets_share_the_ports_bucket(netns: int, closing: list[socket.socket]) -> None:
    six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    closing.append(six)
    six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    six.bind(("::1", 0))
    six.listen()
    port = six.getsockname()[1]
    four = _listener(closing, port=port)  # v6only: 127.0.0.1 does not conflict with ::1
    c = socket.create_connection(("::1", port))
    closing.append(c)
    b = _buckets(port)
    # one bucket a port, one bind2 an address; the child in ::1's accept queue inherited the port
    assert (b.buckets, b.bind2, b.owners) == (1, 2, 3)
    owners = _same_as_iterator(port)
    assert {s.cookie for s in owners.sockets} >= {_cookie(six), _cookie(four)}
    assert sorted(str(s.local.addr) for s in owners.sockets) == ["127.0.0.1", "::1", "::1"]
    cport = c.getsockname()[1]
    assert _buckets(cport).connect_made and [s.cookie for s in _same_as_iterator(cport).sockets] == [
        _cookie(c)
    ]
