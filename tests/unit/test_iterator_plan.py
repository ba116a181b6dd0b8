"""sockstates.iterator_plan: what `why` reads from the kernel beyond inet_diag and getsockopt, and how.

The iterator costs ~130 ms CPU on a 211k-socket namespace walked whole, ~2 ms for the listening
hash alone, and a lookup by 4-tuple ~1 us a socket (bench/whyperf.py): each fact is read the
cheapest way that gives it exactly.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from rebind.kernel.sockstates import KernelRead, iterator_plan
from rebind.model.advice import Provenance
from rebind.model.conflict import SockOpts
from rebind.model.records import Endpoint, Family, Owner, Proto, SocketEntry, SocketRecord, State
from rebind.model.request import BindRequest

PORT = 8080
TCP = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), PORT)
UDP = BindRequest(Proto.UDP, IPv4Address("0.0.0.0"), PORT)
OWNER = (Owner(pid=100, fd=3, name="server"),)


def entry(
    state: State, *, proto: Proto = Proto.TCP, port: int = PORT, owned: bool = True, rport: int = 0
) -> SocketEntry:
    mini = state is State.TIME_WAIT
    rec = SocketRecord(
        proto,
        Family.INET,
        state,
        Endpoint(IPv4Address("127.0.0.1"), port),
        Endpoint(IPv4Address("127.0.0.2") if rport else IPv4Address("0.0.0.0"), rport),
        uid=None if mini else 0,
        inode=None if mini else 1000 + rport,
    )
    return SocketEntry(rec, OWNER if owned and not mini else ())


def read_of(entries: list[SocketEntry], *, reuseport: bool = False, failed: tuple[int, ...] = ()):
    """What pidfd_getfd + getsockopt gave for each owned entry (a failed read is UNKNOWN)."""
    return {
        i: (SockOpts(), Provenance.UNKNOWN) if i in failed else (SockOpts(True, reuseport), Provenance.READ)
        for i, e in enumerate(entries)
        if e.owners
    }


def plan(req: BindRequest, entries: list[SocketEntry], **kw: object) -> KernelRead:
    got = iterator_plan(req, entries, read_of(entries, **kw))  # type: ignore[arg-type]
    return KernelRead(got.listeners, got.lookup, got.walk)  # without the reason


NOTHING = KernelRead()
LISTENERS = KernelRead(listeners=True)
WALK = KernelRead(walk=True)


def test_nobody_on_the_port_needs_nothing() -> None:
    assert plan(TCP, []) == NOTHING
    assert plan(TCP, [entry(State.LISTEN, port=9999)]) == NOTHING
    assert plan(TCP, [entry(State.CLOSE, proto=Proto.UDP)]) == NOTHING


def test_a_plain_listener_read_from_its_owner_needs_only_the_listening_hash() -> None:
    # Its flags are read exactly; only the bind bucket's SO_REUSEPORT cache is left, and the
    # listener leads to it: the cheap walk.
    assert plan(TCP, [entry(State.LISTEN)]) == LISTENERS
    # Accepted connections read from their owner, and request socks, change nothing.
    served = [entry(State.LISTEN), entry(State.ESTABLISHED, rport=5000), entry(State.SYN_RECV, owned=False)]
    assert plan(TCP, served) == LISTENERS


def test_a_reuseport_group_needs_only_the_listening_hash() -> None:
    group = [entry(State.LISTEN) for _ in range(4)]
    assert plan(TCP, group, reuseport=True) == LISTENERS


def test_a_listener_nobody_could_read_needs_only_the_listening_hash() -> None:
    assert plan(TCP, [entry(State.LISTEN, owned=False)]) == LISTENERS
    assert plan(TCP, [entry(State.LISTEN)], failed=(0,)) == LISTENERS


def test_time_waits_are_looked_up_one_by_one() -> None:
    # tw_reuse / tw_reuseport are only in the kernel; each TIME_WAIT is found by its 4-tuple.
    tws = [entry(State.TIME_WAIT, rport=5000 + i) for i in range(3)]
    assert plan(TCP, tws) == KernelRead(lookup=(0, 1, 2))
    assert plan(TCP, [entry(State.LISTEN), *tws]) == KernelRead(listeners=True, lookup=(1, 2, 3))


def test_a_connection_without_owner_is_looked_up() -> None:
    # Not yet accepted, or held from another PID namespace: its flags are in the kernel only.
    got = plan(TCP, [entry(State.LISTEN), entry(State.ESTABLISHED, rport=5000, owned=False)])
    assert got == KernelRead(listeners=True, lookup=(1,))


def test_a_socket_bound_to_a_device_is_walked_for() -> None:
    # The lookup runs on loopback's skb: a socket bound to another device is not found by it.
    tw = entry(State.TIME_WAIT, rport=5000)
    on_eth = SocketEntry(replace(tw.socket, ifindex=2))
    assert plan(TCP, [SocketEntry(replace(tw.socket, ifindex=1))]) == KernelRead(lookup=(0,))
    assert plan(TCP, [tw, on_eth]) == WALK
    # for the bucket alone (every flag read), a connection the lookup can find is chosen
    conns = [entry(State.ESTABLISHED, rport=5000), entry(State.ESTABLISHED, rport=5001)]
    conns[0] = SocketEntry(replace(conns[0].socket, ifindex=2), OWNER)
    assert plan(TCP, conns) == KernelRead(lookup=(1,))


def test_without_a_listener_one_connection_leads_to_the_bucket() -> None:
    conns = [entry(State.ESTABLISHED, rport=5000), entry(State.ESTABLISHED, rport=5001)]
    assert plan(TCP, conns) == KernelRead(lookup=(0,))


def test_bound_only_sockets_are_in_no_table_the_kernel_reads_by() -> None:
    assert plan(TCP, [entry(State.BOUND_INACTIVE)]) == NOTHING
    assert plan(TCP, [entry(State.BOUND_INACTIVE, owned=False)]) == NOTHING
    assert plan(TCP, [entry(State.BOUND_INACTIVE), entry(State.LISTEN)]) == LISTENERS


@pytest.mark.parametrize("reuseport", [False, True])
def test_udp_read_flags_need_the_walk_only_for_the_chain_order(reuseport: bool) -> None:
    # No bucket cache in UDP; the chain order matters only where a SO_REUSEPORT socket may end
    # udp_lib_lport_inuse's walk early.
    socks = [entry(State.CLOSE, proto=Proto.UDP), entry(State.CLOSE, proto=Proto.UDP)]
    assert plan(UDP, socks, reuseport=reuseport) == (WALK if reuseport else NOTHING)


def test_udp_unread_flags_need_the_walk() -> None:
    assert plan(UDP, [entry(State.CLOSE, proto=Proto.UDP, owned=False)]) == WALK


def test_the_reason_names_the_socket() -> None:
    tw = entry(State.TIME_WAIT, rport=5000)
    assert "TIME_WAIT 127.0.0.1:8080" in iterator_plan(TCP, [tw], {}).why
