"""`rebind trace`'s snapshot of a failing TCP bind()/listen() from the port's bind buckets
(kernel/trace_bindhash.py) says what the inet_diag snapshot says, field by field, on the same
state: for each scenario of the bind oracle's kind, made here by real socket calls in this
test's own network namespace, the failing call is made, its event built as the tracer decodes
it, and both snapshots are taken one after the other (the bind hash first: inet_diag makes the
cookies it then reads as held). Time left may differ by the time between the two reads.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from typing import Any

import pytest

from rebind.kernel import trace_bindhash
from rebind.kernel.trace_snapshot import prepare, snapshot
from rebind.model.records import Proto
from rebind.model.trace import AF_INET, AF_INET6, Kind, Snapshot, TraceEvent

#: ms the two snapshots' time left may differ by (they are read one after the other)
LEFT_SLACK = 2000
SO_BINDTODEVICE = 25


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    out: list[socket.socket] = []
    try:
        yield out
    finally:
        for s in out:
            s.close()


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each bind-hash diagnosis answered (True) or fell back (False)."""
    calls: list[bool] = []
    real = trace_bindhash.diagnose

    def spy(*args: Any, **kw: Any) -> Any:
        got = real(*args, **kw)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(trace_bindhash, "diagnose", spy)
    return calls


def _sock(
    held: list[socket.socket],
    family: int = socket.AF_INET,
    *,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
    device: bytes | None = None,
) -> socket.socket:
    s = socket.socket(family)
    held.append(s)
    if reuseaddr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    if device is not None:
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device)
    return s


def _event(s: socket.socket, kind: Kind, err: int, netns: int, addr: str, port: int) -> TraceEvent:
    """The event the tracer would decode for this failing call on ``s``."""
    opt = s.getsockopt
    v6 = s.family == socket.AF_INET6
    return TraceEvent(
        kind=kind,
        errno=err,
        pid=os.getpid(),
        tid=threading.get_native_id(),
        comm="pytest",
        cgroup_id=0,
        netns=netns,
        family=AF_INET6 if v6 else AF_INET,
        proto=Proto.TCP,
        fd=s.fileno(),
        addr=ip_address(addr),
        port=port,
        reuseaddr=bool(opt(socket.SOL_SOCKET, socket.SO_REUSEADDR)),
        reuseport=bool(opt(socket.SOL_SOCKET, socket.SO_REUSEPORT)),
        v6only=bool(opt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)) if v6 else False,
        bound_dev_if=opt(socket.SOL_SOCKET, socket.SO_BINDTOIFINDEX)
        if hasattr(socket, "SO_BINDTOIFINDEX")
        else 0,
        uid=os.geteuid(),
        inode=os.fstat(s.fileno()).st_ino,
        mono_ns=time.monotonic_ns(),
    )


def _fail_bind(s: socket.socket, netns: int, addr: str, port: int) -> TraceEvent:
    with pytest.raises(OSError) as got:
        s.bind((addr, port))
    assert got.value.errno == errno.EADDRINUSE
    return _event(s, Kind.BIND, errno.EADDRINUSE, netns, addr, port)


def _no_seconds(text: str) -> str:
    return re.sub(r"\d+(\.\d+)? ?(s|ms|min)\b", "N", text)


def _compare(ev: TraceEvent, used: list[bool], *, owners: bool = True) -> Snapshot:
    assert prepare() is None
    fast = snapshot(ev, owners=owners)
    assert used == [True], "the bind-hash path fell back"
    slow = snapshot(ev, owners=owners, bindhash=False)
    assert fast.error is None and slow.error is None, (fast.error, slow.error)
    assert (fast.verdict, _no_seconds(fast.reason), _no_seconds(fast.headline)) == (
        slow.verdict,
        _no_seconds(slow.reason),
        _no_seconds(slow.headline),
    )
    assert len(fast.blockers) == len(slow.blockers) > 0, (fast, slow)
    for a, b in zip(fast.blockers, slow.blockers, strict=True):
        assert (a.kind, _no_seconds(a.text), a.state, a.local, a.remote, a.pids, a.group) == (
            b.kind,
            _no_seconds(b.text),
            b.state,
            b.local,
            b.remote,
            b.pids,
            b.group,
        )
        assert (a.left_ms is None) == (b.left_ms is None)
        if a.left_ms is not None and b.left_ms is not None:
            assert abs(a.left_ms - b.left_ms) <= LEFT_SLACK, (a.left_ms, b.left_ms)
    return fast


def _port(held: list[socket.socket]) -> int:
    """A port nothing holds (bound and closed at once: no TIME_WAIT)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def _time_waits(port: int, n: int, *, reuseaddr: bool) -> None:
    """``n`` server-side TIME_WAITs on 127.0.0.1:port (the server closes first), no listener."""
    srv = socket.socket()
    if reuseaddr:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()
    pairs = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        pairs.append((a, c))
    for a, c in pairs:
        a.close()
        c.close()
    srv.close()


Scenario = Callable[[int, list[socket.socket], int], TraceEvent]


def _listener(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held).bind(("127.0.0.1", port))
    held[-1].listen()
    return _fail_bind(_sock(held), netns, "127.0.0.1", port)


def _reuseaddr_listener(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held, reuseaddr=True).bind(("127.0.0.1", port))
    held[-1].listen()
    return _fail_bind(_sock(held, reuseaddr=True), netns, "127.0.0.1", port)


def _reuseport_without(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held, reuseport=True).bind(("127.0.0.1", port))
    _sock(held, reuseport=True).bind(("127.0.0.1", port))
    return _fail_bind(_sock(held), netns, "127.0.0.1", port)


def _reuseport_vs_plain_listener(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held).bind(("0.0.0.0", port))
    held[-1].listen()
    return _fail_bind(_sock(held, reuseport=True), netns, "127.0.0.1", port)


def _time_wait_plain(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _time_waits(port, 3, reuseaddr=False)
    return _fail_bind(_sock(held, reuseaddr=True), netns, "127.0.0.1", port)


def _time_wait_reuseaddr(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _time_waits(port, 2, reuseaddr=True)
    return _fail_bind(_sock(held), netns, "127.0.0.1", port)


def _bound_inactive(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held).bind(("127.0.0.1", port))
    return _fail_bind(_sock(held), netns, "0.0.0.0", port)


def _v6_dual_stack_vs_v4(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held, socket.AF_INET6, v6only=False).bind(("::", port))
    held[-1].listen()
    return _fail_bind(_sock(held), netns, "0.0.0.0", port)


def _v4_wildcard_vs_v6(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held).bind(("0.0.0.0", port))
    held[-1].listen()
    _sock(held, socket.AF_INET6, v6only=True).bind(("::", port))  # v6only: no conflict
    return _fail_bind(_sock(held, socket.AF_INET6, v6only=False), netns, "::", port)


def _bound_to_device(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    _sock(held, device=b"lo").bind(("127.0.0.1", port))
    held[-1].listen()
    return _fail_bind(_sock(held), netns, "127.0.0.1", port)


def _failing_listen(netns: int, held: list[socket.socket], port: int) -> TraceEvent:
    a, b = _sock(held, reuseaddr=True), _sock(held, reuseaddr=True)
    a.bind(("127.0.0.1", port))
    b.bind(("127.0.0.1", port))
    a.listen()
    with pytest.raises(OSError) as got:
        b.listen()
    assert got.value.errno == errno.EADDRINUSE
    return _event(b, Kind.LISTEN, errno.EADDRINUSE, netns, "127.0.0.1", port)


SCENARIOS: dict[str, Scenario] = {
    "listener": _listener,
    "reuseaddr-listener": _reuseaddr_listener,
    "reuseport-pair-vs-plain": _reuseport_without,
    "reuseport-vs-plain-listener": _reuseport_vs_plain_listener,
    "time-wait-server-without-reuseaddr": _time_wait_plain,
    "time-wait-server-with-reuseaddr": _time_wait_reuseaddr,
    "bound-inactive": _bound_inactive,
    "v6-dual-stack-vs-v4-wildcard": _v6_dual_stack_vs_v4,
    "v4-wildcard-vs-v6-wildcard": _v4_wildcard_vs_v6,
    "so-bindtodevice": _bound_to_device,
    "failing-listen": _failing_listen,
}


@pytest.mark.parametrize("owners", [True, False], ids=["owners", "no-owners"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bindhash_snapshot_equals_inet_diag(
    name: str, owners: bool, netns: int, held: list[socket.socket], used: list[bool]
) -> None:
    ev = SCENARIOS[name](netns, held, _port(held))
    snap = _compare(ev, used, owners=owners)
    if owners and name in ("listener", "so-bindtodevice"):
        assert snap.blockers[0].pids == (os.getpid(),)


def test_time_left_is_the_kernel_timer(netns: int, held: list[socket.socket], used: list[bool]) -> None:
    port = _port(held)
    _time_waits(port, 1, reuseaddr=False)
    snap = _compare(_fail_bind(_sock(held), netns, "127.0.0.1", port), used)
    left = snap.blockers[0].left_ms
    assert left is not None and 50_000 < left <= 60_000  # TCP_TIMEWAIT_LEN: 60 s


def test_a_fault_or_truncation_falls_back(
    netns: int, held: list[socket.socket], used: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit the bind-hash read is truncated: the dumps answer (never less)."""
    port = _port(held)
    _time_waits(port, 3, reuseaddr=False)
    ev = _fail_bind(_sock(held), netns, "127.0.0.1", port)
    monkeypatch.setattr(trace_bindhash, "LIMIT", 2)
    snap = snapshot(ev)
    assert used == [False]
    assert snap.error is None and snap.blockers and snap.blockers[0].state == "TIME_WAIT"


def _time_waits_from(port: int, clients: list[tuple[str, int]], *, listener: bool) -> list[socket.socket]:
    """Server-side TIME_WAITs on 127.0.0.1:port from these client ends (their texts sort
    otherwise than their numbers: walk._order compares the remote end as text); with
    ``listener``, the listener stays (returned: the caller closes it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(len(clients))
    pairs = []
    for addr, cport in clients:
        c = socket.socket()
        c.bind((addr, cport))
        c.connect(("127.0.0.1", port))
        a, _ = srv.accept()
        pairs.append((a, c))
    for a, c in pairs:
        a.close()
        c.close()
    if listener:
        return [srv]
    srv.close()
    return []


@pytest.mark.parametrize("owners", [True, False], ids=["owners", "no-owners"])
@pytest.mark.parametrize("listener", [False, True], ids=["time-waits", "listener-and-its-time-waits"])
def test_many_time_waits_in_the_dumps_order(
    netns: int, held: list[socket.socket], used: list[bool], listener: bool, owners: bool
) -> None:
    """A port of many TIME_WAITs from two client addresses and ports of 3 to 5 digits (the
    bind hash's decoding sorts one string a socket, by the remote end, where the sockets share
    the rest of the key): the same table as the dump's, in the same order, and the same answer."""
    from rebind.kernel.sysctl import kernel_settings
    from rebind.kernel.trace_snapshot import _without, bind_request
    from rebind.kernel.walk import table as socket_table
    from rebind.model.query import SocketQuery

    port = _port(held)
    clients = [(f"127.0.0.{1 + k % 2}", p) for k, p in enumerate(range(900, 12000, 37))]
    held += _time_waits_from(port, clients, listener=listener)
    ev = _fail_bind(_sock(held), netns, "127.0.0.1", port)
    req = bind_request(ev)
    assert req is not None and prepare() is None
    d = trace_bindhash.diagnose(ev, req, kernel_settings(), False)
    assert d is not None
    used.clear()
    dumped = _without(
        socket_table(SocketQuery.create(ports=[port], protos=[Proto.TCP]), owners=False), ev.inode
    )
    ends = [(e.socket.state, e.socket.local, e.socket.remote, e.socket.timer) for e in d.table.entries]
    assert ends == [(e.socket.state, e.socket.local, e.socket.remote, e.socket.timer) for e in dumped.entries]
    assert len(ends) == len(clients) + listener
    assert [e.socket.inode for e in d.table.entries] == [e.socket.inode for e in dumped.entries]
    if not listener:  # every TIME_WAIT blocks, in the table's order
        assert [b.entry.socket for b in d.blockers] == [e.socket for e in d.table.entries]
    snap = _compare(ev, used, owners=owners)
    assert snap.blockers[0].group == (1 if listener else len(clients))
    if listener and owners:
        assert snap.blockers[0].pids == (os.getpid(),)
