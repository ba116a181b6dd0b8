"""model/localhost.py: which listener 127.0.0.1 and ::1 reach, and who reaches what (issue 20).

The kernel half (a real connect to each address in a namespace) is
tests/kernel/test_localhost_kernel.py; here the table-driven rules, without root.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from rebind.model.localhost import (
    V4_LOOPBACK,
    V6_LOOPBACK,
    HostsLine,
    LocalhostResolution,
    SplitKind,
    find_split,
    find_splits,
    loopback_only,
    reach,
)
from rebind.model.records import Endpoint, Family, Owner, Proto, SocketEntry, SocketRecord, State
from rebind.render.findings import finding_json

V4_FIRST = LocalhostResolution(order=(Family.INET, Family.INET6))
V6_FIRST = LocalhostResolution(
    order=(Family.INET6, Family.INET),
    hosts=(HostsLine(1, "::1", ("localhost", "ip6-localhost")), HostsLine(2, "127.0.0.1", ("localhost",))),
)
V4_ONLY_HOSTS = LocalhostResolution(order=(Family.INET,))
NO_IPV6 = LocalhostResolution(order=(Family.INET,), ipv6_loopback=False)


def listener(
    addr: str, pid: int | None, port: int = 5173, v6only: bool | None = None, ifindex: int = 0
) -> SocketEntry:
    a = ip_address(addr)
    fam = Family.INET if a.version == 4 else Family.INET6
    rec = SocketRecord(
        proto=Proto.TCP,
        family=fam,
        state=State.LISTEN,
        local=Endpoint(a, port),
        remote=Endpoint(ip_address("0.0.0.0" if a.version == 4 else "::"), 0),
        uid=1000,
        inode=hash((addr, pid, port)) & 0xFFFFFF,
        cookie=hash((addr, pid, port, 1)) & 0xFFFFFF,
        v6only=v6only,
        ifindex=ifindex,
    )
    owners = () if pid is None else (Owner(pid=pid, fd=3, name=f"srv{pid}"),)
    return SocketEntry(rec, owners)


# (listeners, which one 127.0.0.1 reaches, which one ::1 reaches) -- by listener index, None: refused
REACH_CASES = [
    ([listener("127.0.0.1", 1)], 0, None),
    ([listener("::1", 1)], None, 0),
    ([listener("0.0.0.0", 1)], 0, None),
    ([listener("::", 1, v6only=False)], 0, 0),  # dual-stack
    ([listener("::", 1, v6only=True)], None, 0),
    ([listener("::ffff:127.0.0.1", 1, v6only=False)], 0, None),  # v4-mapped: IPv4 only
    # exact address beats the wildcard (the lookup's first hash2 pass)
    ([listener("0.0.0.0", 1), listener("127.0.0.1", 2)], 1, None),
    ([listener("::", 1, v6only=True), listener("::1", 2)], None, 1),
    # an AF_INET wildcard beats a dual-stack AF_INET6 one (compute_score: +1 for PF_INET)
    ([listener("::", 1, v6only=False), listener("0.0.0.0", 2)], 1, 0),
    # bound to another device: never reached over loopback
    ([listener("0.0.0.0", 1, ifindex=7)], None, None),
    ([listener("0.0.0.0", 1, ifindex=1)], 0, None),
]


@pytest.mark.parametrize(("entries", "v4", "v6"), REACH_CASES)
def test_reach(entries: list[SocketEntry], v4: int | None, v6: int | None) -> None:
    r4, r6 = reach(entries, V4_LOOPBACK), reach(entries, V6_LOOPBACK)
    assert r4.listeners == (() if v4 is None else (entries[v4],))
    assert r6.listeners == (() if v6 is None else (entries[v6],))


def test_reach_ignores_other_ports_states_and_udp() -> None:
    e = listener("127.0.0.1", 1)
    tw = SocketEntry(
        SocketRecord(
            Proto.TCP, Family.INET, State.TIME_WAIT, e.socket.local, Endpoint(V4_LOOPBACK, 4), None, None
        )
    )
    udp = SocketEntry(
        SocketRecord(Proto.UDP, Family.INET, State.CLOSE, e.socket.local, Endpoint(V4_LOOPBACK, 0), 0, 9)
    )
    assert reach([tw, udp], V4_LOOPBACK).refused


def test_split_different_processes() -> None:
    f = find_split(5173, [listener("127.0.0.1", 10), listener("::1", 20)], V6_FIRST)
    assert f is not None and f.kind is SplitKind.SPLIT
    assert f.v4.pids == {10} and f.v6.pids == {20}
    reaches = {a.client.split(" ")[0]: a.reaches for a in f.audiences}
    assert reaches["curl,"] is Family.INET6  # resolver gives ::1 first here
    assert reaches["Node"] is Family.INET6
    assert reaches["browsers"] is Family.INET6
    text = "\n".join(f.lines())
    assert "localhost:5173 is split" in text and "srv10[10]" in text and "srv20[20]" in text
    assert "line 1: ::1 localhost ip6-localhost" in text
    assert loopback_only(f)


def test_split_with_v4_first_resolver() -> None:
    """The docker-on-0.0.0.0 + vite-on-::1 case with /etc/hosts listing 127.0.0.1 first: curl
    gets docker, browsers get vite."""
    f = find_split(5173, [listener("0.0.0.0", 10), listener("::1", 20)], V4_FIRST)
    assert f is not None and f.kind is SplitKind.SPLIT
    reaches = [a.reaches for a in f.audiences]
    assert reaches == [Family.INET, Family.INET, Family.INET6]


def test_same_process_is_not_split() -> None:
    assert find_split(5173, [listener("127.0.0.1", 10), listener("::1", 10)], V6_FIRST) is None
    assert find_split(5173, [listener("::", 10, v6only=False)], V6_FIRST) is None  # one dual-stack socket
    # 0.0.0.0 and [::] v6only from one process (nginx's "listen 80; listen [::]:80;")
    assert find_split(80, [listener("0.0.0.0", 1, 80), listener("::", 1, 80, v6only=True)], V6_FIRST) is None


def test_unknown_owners_are_never_accused() -> None:
    assert find_split(5173, [listener("127.0.0.1", None), listener("::1", None)], V6_FIRST) is None


def test_ipv6_only_server() -> None:
    f = find_split(5173, [listener("::1", 20)], V4_ONLY_HOSTS)
    assert f is not None and f.kind is SplitKind.V6_ONLY
    assert "via IPv6 only; 127.0.0.1:5173 gets ECONNREFUSED" in f.headline()
    curl, node, browsers = (a.reaches for a in f.audiences)
    assert curl is None and node is None and browsers is Family.INET6
    assert f.kind.marker == "lh:v6-only" and loopback_only(f)


def test_ipv4_only_server_node_17_fails_when_resolver_gives_v6_first() -> None:
    f = find_split(3000, [listener("127.0.0.1", 20, 3000)], V6_FIRST)
    assert f is not None and f.kind is SplitKind.V4_ONLY
    curl, node, browsers = (a.reaches for a in f.audiences)
    assert curl is Family.INET and node is None and browsers is Family.INET
    assert "--dns-result-order=ipv4first" in f.fix()


def test_wildcard_one_family_is_noted_but_not_marked() -> None:
    f = find_split(22, [listener("0.0.0.0", 1, 22)], V4_FIRST)
    assert f is not None and f.kind is SplitKind.V4_ONLY and not loopback_only(f)


def test_no_ipv6_loopback_means_no_finding() -> None:
    assert find_split(5173, [listener("127.0.0.1", 1)], NO_IPV6) is None


def test_find_splits_and_json() -> None:
    entries = [listener("127.0.0.1", 10), listener("::1", 20), listener("::", 30, 8080, v6only=False)]
    found = find_splits(entries, V6_FIRST)
    assert set(found) == {5173}
    doc = finding_json(found[5173])
    assert doc["kind"] == "split" and doc["resolver_order"] == ["::1", "127.0.0.1"]
    assert doc["ipv4"] == {
        "addr": "127.0.0.1",
        "refused": False,
        "listeners": ["127.0.0.1:5173"],
        "pids": [10],
    }
    assert [c["reaches"] for c in doc["clients"]] == ["::1", "::1", "::1"]


def test_hostile_owner_name_is_escaped() -> None:
    e = listener("127.0.0.1", 10)
    bad = SocketEntry(e.socket, (Owner(pid=10, fd=3, name="x\x1b[2J"),))
    f = find_split(5173, [bad, listener("::1", 20)], V6_FIRST)
    assert f is not None and "\x1b" not in "".join(f.lines()) and "\\x1b" in f.headline()
