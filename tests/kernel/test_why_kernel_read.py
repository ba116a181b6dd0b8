"""`why` reads from the kernel only what the cheaper paths cannot give exactly, the cheapest way
(facts.iterator_plan: the listening hash, lookups by 4-tuple, or no BPF at all), and what it
reads is what the kernel holds (model == kernel, checked against the whole walk of the BPF
iterator and a real bind on whatever kernel runs this)."""

from __future__ import annotations

import errno
import socket
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest

from rebind.kernel.bpf.sockiter import read_socket_states
from rebind.kernel.facts import gather
from rebind.model.advice import Provenance, advise
from rebind.model.records import Proto, State
from rebind.model.request import BindRequest
from rebind.model.sockstate import SockKind, SockStates, Unavailable
from tests.kernel.helpers import LISTEN, TIME_WAIT

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)


def _states(port: int, *, listeners_only: bool) -> SockStates:
    got = read_socket_states([port], [Proto.TCP], listeners_only=listeners_only)
    assert not isinstance(got, Unavailable), got.reason
    return got


def _real_bind(port: int, *, reuseaddr: bool = False, reuseport: bool = False) -> int:
    """errno of a real bind()+listen() on 0.0.0.0:port with these flags (0: it worked)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, int(reuseport))
        s.bind(("0.0.0.0", port))
        s.listen()
    except OSError as exc:
        return exc.errno or -1
    finally:
        s.close()
    return 0


@pytest.mark.parametrize("reuseport", [False, True])
def test_a_visible_listener_is_read_from_its_owner_and_the_iterator_agrees(
    netns: int, procs: object, reuseport: bool
) -> None:
    port = 18301 + reuseport
    opts = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    if reuseport:
        opts += f"s.setsockopt(socket.SOL_SOCKET, {SO_REUSEPORT}, 1)\n"
    p = procs.python(LISTEN.format(opts=opts, addr="0.0.0.0", port=port))  # type: ignore[attr-defined]
    procs.wait_line(p)  # type: ignore[attr-defined]
    c: socket.socket | None = None
    try:
        req = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), port)
        facts = gather(req, trials=False)
        assert isinstance(facts.kernel, SockStates) and facts.kernel.listeners_only
        [listener] = [h for h in facts.holders if h.entry.socket.state is State.LISTEN]
        assert listener.provenance is Provenance.READ
        # What getsockopt read is the kernel's own sk_reuse/sk_reuseport/ipv6only ...
        whole = {s.cookie: s for s in _states(port, listeners_only=False).sockets}
        k = whole[listener.entry.socket.cookie]
        assert (listener.opts.reuseaddr, listener.opts.reuseport) == (k.reuseaddr, k.reuseport)
        assert listener.entry.socket.ifindex == k.bound_dev_if and listener.entry.socket.uid == k.uid
        # ... and the listening-hash walk gave the same socket, bucket included, as the whole walk.
        assert listener.kernel is not None and listener.kernel.bucket == k.bucket
        assert listener.kernel.reuse == k.reuse and listener.kernel.userlocks == k.userlocks
        assert {s.state for s in facts.kernel.sockets} == {State.LISTEN}
        # model == kernel: the answer for each flag combination is what a real bind gets.
        for ra, rp in ((False, False), (True, False), (False, True), (True, True)):
            r = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), port, reuseaddr=ra, reuseport=rp)
            d = advise(gather(r, trials=False))
            got = _real_bind(port, reuseaddr=ra, reuseport=rp)
            assert d.verdict.bindable == (got == 0), (ra, rp, d.headline, got)
        # A connection not yet accept()ed has no owner: its flags are the kernel's alone, found
        # by its 4-tuple (it inherited the listener's), and the same as the whole walk reads.
        c = socket.create_connection(("127.0.0.1", port))
        facts = gather(req, trials=False)
        assert isinstance(facts.kernel, SockStates) and facts.kernel.listeners_only
        [child] = [h for h in facts.holders if h.entry.socket.state is State.ESTABLISHED]
        assert child.provenance is Provenance.KERNEL and child.opts.reuseport is reuseport
        whole = {s.cookie: s for s in _states(port, listeners_only=False).sockets}
        assert child.kernel == replace(whole[child.entry.socket.cookie], seq=0)
    finally:
        if c is not None:
            c.close()


def test_time_wait_flags_come_from_the_kernel(netns: int, procs: object) -> None:
    port = 18303
    opts = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    p = procs.python(TIME_WAIT.format(opts=opts, port=port))  # type: ignore[attr-defined]
    procs.wait_line(p)  # type: ignore[attr-defined]
    req = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), port)
    facts = gather(req, trials=False)
    assert isinstance(facts.kernel, SockStates)
    [tw] = [h for h in facts.holders if h.entry.socket.state is State.TIME_WAIT]
    assert tw.provenance is Provenance.KERNEL
    assert tw.kernel is not None and tw.kernel.kind is SockKind.TIMEWAIT
    assert tw.opts.reuseaddr is True and tw.opts.reuseport is False
    # Found by its 4-tuple: every field (bucket included) as the whole walk reads it.
    [walked] = [s for s in _states(port, listeners_only=False).sockets if s.cookie == tw.entry.socket.cookie]
    assert tw.kernel == replace(walked, seq=0)
    for ra in (False, True):
        r = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), port, reuseaddr=ra)
        d = advise(gather(r, trials=False))
        got = _real_bind(port, reuseaddr=ra)
        assert d.verdict.bindable == (got == 0), (ra, d.headline, got)
        assert got in (0, errno.EADDRINUSE)


def test_a_free_port_walks_nothing(netns: int) -> None:
    facts = gather(BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), 18304), trials=False)
    assert facts.kernel is None


def test_the_listening_walk_stops_before_the_connections(netns: int) -> None:
    """listeners_only: every listener of the port, nothing else, and the same records as the
    whole walk (the program stops at the first established-hash socket)."""
    listeners = []
    for addr in ("127.0.0.1", "127.0.0.2"):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 18305))
        s.listen()
        listeners.append(s)
    conns = [socket.create_connection(("127.0.0.1", 18305)) for _ in range(20)]
    try:
        only = _states(18305, listeners_only=True)
        whole = _states(18305, listeners_only=False)
        assert len(only.sockets) == 2 and {s.state for s in only.sockets} == {State.LISTEN}
        assert len(whole.sockets) == 2 + 20  # the accepted ends (the clients' ports are others)
        strip = lambda s: s.__class__(**{f: getattr(s, f) for f in s.__slots__ if f != "seq"})  # noqa: E731
        listening = {s.cookie: strip(s) for s in whole.sockets if s.state is State.LISTEN}
        assert {s.cookie: strip(s) for s in only.sockets} == listening
    finally:
        for s in conns + listeners:
            s.close()


def test_a_dual_stack_child_talking_ipv4_is_found_by_its_ipv4_tuple(netns: int) -> None:
    """A child of a [::] listener accepted from an IPv4 peer is hashed by its IPv4 addresses:
    its lookup must be IPv4 (inet_diag shows ::ffff:127.0.0.1)."""
    lst = socket.socket(socket.AF_INET6)
    lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind(("::", 18306))
    lst.listen()
    c = socket.create_connection(("127.0.0.1", 18306))  # never accept()ed: no owner
    try:
        facts = gather(BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), 18306), trials=False)
        [child] = [h for h in facts.holders if h.entry.socket.state is State.ESTABLISHED]
        assert child.entry.socket.local.addr == IPv6Address("::ffff:127.0.0.1")
        assert child.provenance is Provenance.KERNEL and child.kernel is not None
        whole = {s.cookie: s for s in _states(18306, listeners_only=False).sockets}
        assert child.kernel == replace(whole[child.entry.socket.cookie], seq=0)
    finally:
        c.close()
        lst.close()


def test_rebind_no_bpf_turns_the_lookups_off_too(
    netns: int, procs: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = 18307
    p = procs.python(TIME_WAIT.format(opts="", port=port))  # type: ignore[attr-defined]
    procs.wait_line(p)  # type: ignore[attr-defined]
    monkeypatch.setenv("REBIND_NO_BPF", "1")
    facts = gather(BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), port), trials=False)
    assert isinstance(facts.kernel, Unavailable) and "REBIND_NO_BPF" in facts.kernel.reason
    [tw] = [h for h in facts.holders if h.entry.socket.state is State.TIME_WAIT]
    assert tw.provenance is not Provenance.KERNEL and tw.kernel is None


@pytest.mark.parametrize("v6only", [False, True])
def test_what_getsockopt_and_inet_diag_give_is_the_kernels_own(netns: int, v6only: bool) -> None:
    """The cheaper paths are exact, not inferred: getsockopt's SO_REUSEADDR/SO_REUSEPORT/
    IPV6_V6ONLY are sk_reuse/sk_reuseport/sk_ipv6only, inet_diag's idiag_if is sk_bound_dev_if
    and its uid the socket's (checked against the iterator's whole walk)."""
    s = socket.socket(socket.AF_INET6)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, int(v6only))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        s.bind(("::", 18308))
        s.listen()
        facts = gather(BindRequest(Proto.TCP, IPv6Address("::"), 18308), trials=False)
        [h] = [h for h in facts.holders if h.entry.socket.state is State.LISTEN]
        assert h.provenance is Provenance.READ  # this test's own process owns it
        [k] = [x for x in _states(18308, listeners_only=False).sockets if x.cookie == h.entry.socket.cookie]
        assert (h.opts.reuseaddr, h.opts.reuseport, h.opts.v6only) == (k.reuseaddr, k.reuseport, k.ipv6only)
        assert h.entry.socket.ifindex == k.bound_dev_if == socket.if_nametoindex("lo")
        assert h.entry.socket.uid == k.uid and h.opts.v6only is v6only
    finally:
        s.close()
