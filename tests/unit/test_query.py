"""model/query.py: SocketQuery, the one validated filter every walk of the socket table takes."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address

import pytest

from rebind.errors import UsageError
from rebind.model.query import SocketQuery
from rebind.model.records import LISTENING_STATES, Endpoint, Family, Proto, SocketRecord, State


def test_defaults_follow_the_ports() -> None:
    assert SocketQuery.create().states == LISTENING_STATES
    q = SocketQuery.create(ports=["80", 22, 80], protos=["UDP"], families=[socket.AF_INET6])
    assert (q.ports, q.protos, q.families, q.states) == (
        (22, 80),
        (Proto.UDP,),
        (Family.INET6,),
        frozenset(State),
    )
    q = SocketQuery.create(states=["time-wait"], addrs=["[::1]", "127.0.0.1"], port_range=("100", 200))
    assert q.states == {State.TIME_WAIT} and q.port_range == (100, 200)
    assert IPv4Address("127.0.0.1") in (q.addrs or ())


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"ports": 80}, "must be a list"),
        ({"ports": [70000]}, "out of range"),
        ({"protos": ["sctp"]}, "unknown protocol"),
        ({"protos": []}, "must not be empty"),
        ({"states": ["nope"]}, "state"),
        ({"addrs": ["localhost"]}, "not an IP address"),
        ({"port_range": (200, 100)}, "low > high"),
        ({"netns": "/proc/1/ns/net"}, "namespace inode"),
        ({"netns": True}, "namespace inode"),
    ],
)
def test_bad_filters_are_usage_errors(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        SocketQuery.create(**kw)  # type: ignore[arg-type]


def test_matches() -> None:
    r = SocketRecord(
        proto=Proto.TCP,
        family=Family.INET,
        state=State.LISTEN,
        local=Endpoint(IPv4Address("127.0.0.1"), 8080),
        remote=Endpoint(IPv4Address("0.0.0.0"), 0),
        uid=0,
        inode=1,
    )
    assert SocketQuery.create(ports=[8080], addrs=["127.0.0.1"]).matches(r)
    assert not SocketQuery.create(ports=[8080], addrs=["127.0.0.2"]).matches(r)
    assert SocketQuery.create(port_range=(8000, 8100)).matches(r)
    assert not SocketQuery.create(port_range=(1, 80)).matches(r)
    assert not SocketQuery.create(protos=["udp"]).matches(r)
