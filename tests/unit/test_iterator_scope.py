"""facts.iterator_scope: when `why` walks the kernel's socket tables with the BPF iterator.

The iterator costs ~130 ms CPU on a 211k-socket namespace walked whole and ~2 ms for the
listening hash alone (bench/whyperf.py), so it runs only as far as a fact needs it.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from rebind.kernel.facts import IterScope, iterator_scope
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


def scope(req: BindRequest, entries: list[SocketEntry], **kw: object) -> IterScope:
    return iterator_scope(req, entries, read_of(entries, **kw))[0]  # type: ignore[arg-type]


def test_nobody_on_the_port_needs_nothing() -> None:
    assert scope(TCP, []) is IterScope.NONE
    assert scope(TCP, [entry(State.LISTEN, port=9999)]) is IterScope.NONE
    assert scope(TCP, [entry(State.CLOSE, proto=Proto.UDP)]) is IterScope.NONE


def test_a_plain_listener_read_from_its_owner_needs_only_the_listening_hash() -> None:
    # Its flags are read exactly; only the bind bucket's SO_REUSEPORT cache is left, and the
    # listener leads to it: the cheap walk.
    assert scope(TCP, [entry(State.LISTEN)]) is IterScope.LISTENERS
    # Accepted connections read from their owner, and request socks, change nothing.
    served = [entry(State.LISTEN), entry(State.ESTABLISHED, rport=5000), entry(State.SYN_RECV, owned=False)]
    assert scope(TCP, served) is IterScope.LISTENERS


def test_a_reuseport_group_needs_only_the_listening_hash() -> None:
    group = [entry(State.LISTEN) for _ in range(4)]
    assert scope(TCP, group, reuseport=True) is IterScope.LISTENERS


def test_a_listener_nobody_could_read_needs_only_the_listening_hash() -> None:
    assert scope(TCP, [entry(State.LISTEN, owned=False)]) is IterScope.LISTENERS
    assert scope(TCP, [entry(State.LISTEN)], failed=(0,)) is IterScope.LISTENERS


def test_time_waits_need_the_whole_walk() -> None:
    # tw_reuse / tw_reuseport are only in the kernel, with or without a listener beside them.
    assert scope(TCP, [entry(State.TIME_WAIT, rport=5000)]) is IterScope.ALL
    assert scope(TCP, [entry(State.LISTEN), entry(State.TIME_WAIT, rport=5000)]) is IterScope.ALL


def test_a_connection_without_owner_needs_the_whole_walk() -> None:
    # Not yet accepted, or held from another PID namespace: its flags are in the kernel only.
    assert (
        scope(TCP, [entry(State.LISTEN), entry(State.ESTABLISHED, rport=5000, owned=False)]) is IterScope.ALL
    )


def test_without_a_listener_only_connections_lead_to_the_bucket() -> None:
    assert scope(TCP, [entry(State.ESTABLISHED, rport=5000)]) is IterScope.ALL


def test_bound_only_sockets_are_in_no_table_the_iterator_walks() -> None:
    assert scope(TCP, [entry(State.BOUND_INACTIVE)]) is IterScope.NONE
    assert scope(TCP, [entry(State.BOUND_INACTIVE, owned=False)]) is IterScope.NONE
    assert scope(TCP, [entry(State.BOUND_INACTIVE), entry(State.LISTEN)]) is IterScope.LISTENERS


@pytest.mark.parametrize("reuseport", [False, True])
def test_udp_read_flags_need_the_walk_only_for_the_chain_order(reuseport: bool) -> None:
    # No bucket cache in UDP; the chain order matters only where a SO_REUSEPORT socket may end
    # udp_lib_lport_inuse's walk early.
    socks = [entry(State.CLOSE, proto=Proto.UDP), entry(State.CLOSE, proto=Proto.UDP)]
    assert scope(UDP, socks, reuseport=reuseport) is (IterScope.ALL if reuseport else IterScope.NONE)


def test_udp_unread_flags_need_the_walk() -> None:
    assert scope(UDP, [entry(State.CLOSE, proto=Proto.UDP, owned=False)]) is IterScope.ALL


def test_the_reason_names_the_socket() -> None:
    tw = entry(State.TIME_WAIT, rport=5000)
    _, why = iterator_scope(TCP, [tw], {})
    assert "TIME_WAIT 127.0.0.1:8080" in why
