"""Every network namespace: processes' namespaces and nsfs mounts, read through setns (root) or
/proc/PID/net (unprivileged). Each test makes its own namespaces and removes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rebind.kernel.namespaces import list_namespaces, nsfs_mounts, records_per_netns
from rebind.model.records import State
from tests.conftest import Procs

LISTENER = """
import socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
b = socket.socket()
b.bind(('127.0.0.1', {port} + 1))
print('ready', flush=True)
time.sleep(600)
"""


@pytest.fixture
def named_netns(netns: int) -> Iterator[str]:
    """An `ip netns add` namespace (an nsfs mount under /run/netns) with lo up, removed after."""
    from tests.toolcheck import need_tool

    need_tool("ip")
    name = f"rebind-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_mounted_and_process_namespaces_are_listed_and_read(
    netns: int, named_netns: str, procs: Procs
) -> None:
    # One listener in the test's private namespace (held by a process), one in the named
    # namespace (entered with `ip netns exec`): both must be found, each with its own inode.
    p1 = procs.python(LISTENER.format(port=41000))
    p2 = procs.start(
        ["ip", "netns", "exec", named_netns, sys.executable, "-u", "-c", LISTENER.format(port=41000)]
    )
    assert procs.wait_line(p1) == "ready" and procs.wait_line(p2) == "ready"
    named_ino = os.stat(f"/run/netns/{named_netns}").st_ino

    scan = list_namespaces()
    by_ino = {n.inode: n for n in scan.namespaces}
    assert netns in by_ino and named_ino in by_ino
    assert by_ino[named_ino].name == named_netns
    assert by_ino[named_ino].pid is None  # reached through the mount, no pid to be reused
    assert by_ino[netns].processes >= 1

    got = {r.netns.inode: r for r in records_per_netns(scan, ports=[41000, 41001])}
    for ino in (netns, named_ino):
        assert got[ino].source == "netlink"
        states = sorted((rec.local.port, rec.state) for rec in got[ino].records)
        assert (41000, State.LISTEN) in states and (41001, State.BOUND_INACTIVE) in states
        assert all(rec.netns == ino for rec in got[ino].records)


def test_a_namespace_kept_only_by_a_mount_is_listed(netns: int, named_netns: str) -> None:
    scan = list_namespaces()
    ns = next(n for n in scan.namespaces if n.name == named_netns)
    assert ns.processes == 0
    (only,) = [r for r in records_per_netns(scan, ports=[1]) if r.netns.name == named_netns]
    assert only.records == () and only.source == "netlink"


def test_unprivileged_sees_its_own_and_says_what_is_hidden(netns: int, procs: Procs) -> None:
    """As uid 65534 setns is refused: the /proc view of its own processes is used, and the
    namespaces of other users' processes are counted as unreadable."""
    code = (
        "import json; from rebind.kernel.namespaces import list_namespaces, records_per_netns\n"
        "scan = list_namespaces()\n"
        "rows = [(r.netns.inode, r.source, len(r.records)) for r in records_per_netns(scan, ports=[41010])]\n"
        "print(json.dumps({'unreadable': scan.unreadable, 'rows': rows}))\n"
    )
    holder = procs.start(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            sys.executable,
            "-u",
            "-c",
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',41010))\ns.listen()\nprint('ready',flush=True)\ntime.sleep(600)",
        ]
    )
    assert procs.wait_line(holder) == "ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    import json

    doc = json.loads(out.stdout)
    assert doc["unreadable"] > 0  # root's processes (at least this test runner)
    rows = {ino: (source, n) for ino, source, n in doc["rows"]}
    assert rows[netns][1] == 1  # its own listener, seen in its own namespace


def test_nsfs_mounts_parse_escapes() -> None:
    text = (
        "36 25 0:4 net:[4026532801] /run/netns/a\\040b rw,nosuid - nsfs nsfs rw\n"
        "37 25 0:22 / /run rw - tmpfs tmpfs rw\n"
        "38 25 0:4 net:[4026532900] /run/docker/netns/3d6a8c0 rw shared:5 - nsfs nsfs rw\n"
    )
    assert nsfs_mounts(text) == ["/run/netns/a b", "/run/docker/netns/3d6a8c0"]


def test_all_netns_table_has_owners_names_and_context(netns: int, named_netns: str, procs: Procs) -> None:
    from rebind.allns import socket_table_all_netns

    p1 = procs.python(LISTENER.format(port=41020))
    p2 = procs.start(
        ["ip", "netns", "exec", named_netns, sys.executable, "-u", "-c", LISTENER.format(port=41020)]
    )
    assert procs.wait_line(p1) == "ready" and procs.wait_line(p2) == "ready"
    named_ino = os.stat(f"/run/netns/{named_netns}").st_ino
    table = socket_table_all_netns(ports=[41020])
    listeners = {e.socket.netns: e for e in table.entries if e.socket.state is State.LISTEN}
    assert set(listeners) >= {netns, named_ino}
    assert {o.pid for o in listeners[netns].owners} == {p1.pid}
    assert {o.pid for o in listeners[named_ino].owners} == {p2.pid}
    assert listeners[named_ino].netns_name == named_netns
    assert listeners[netns].netns_name is None
    assert all(o.container is None and o.proxy is None for e in listeners.values() for o in e.owners)


def test_ls_all_netns_cli(netns: int, named_netns: str, procs: Procs, rebind_cli: Any) -> None:
    """`rebind ls --all-netns PORT --json`: every namespace's socket, with netns and names;
    without --all-netns the named namespace's listener is not shown (nothing changes)."""
    p1 = procs.python(LISTENER.format(port=41030))
    p2 = procs.start(
        ["ip", "netns", "exec", named_netns, sys.executable, "-u", "-c", LISTENER.format(port=41030)]
    )
    assert procs.wait_line(p1) == "ready" and procs.wait_line(p2) == "ready"
    named_ino = os.stat(f"/run/netns/{named_netns}").st_ino
    res = rebind_cli("ls", "--all-netns", "41030", "--state", "listen", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    rows = {(s["netns"], s["netns_name"]): [o["pid"] for o in s["owners"]] for s in doc["sockets"]}
    assert rows == {(netns, None): [p1.pid], (named_ino, named_netns): [p2.pid]}
    owner = doc["sockets"][0]["owners"][0]
    assert owner["container"] is None and owner["proxy"] is None and "unit" in owner
    plain = json.loads(rebind_cli("ls", "41030", "--state", "listen", "--json").stdout)
    assert [s["netns"] for s in plain["sockets"]] == [netns]
    table = rebind_cli("ls", "--all-netns", "41030", "--state", "listen")
    assert table.returncode == 0 and named_netns in table.stdout and f"net:{netns}" in table.stdout


def test_walk_reads_the_namespace_the_query_names(netns: int, named_netns: str, procs: Procs) -> None:
    """kernel/walk.py: SocketQuery(netns=INODE) is read inside that namespace, whichever
    namespace the caller is in; the address filter keeps only the asked local address."""
    from rebind.kernel.walk import records
    from rebind.model.query import SocketQuery

    p = procs.start(
        ["ip", "netns", "exec", named_netns, sys.executable, "-u", "-c", LISTENER.format(port=41020)]
    )
    assert procs.wait_line(p) == "ready"
    named_ino = os.stat(f"/run/netns/{named_netns}").st_ino
    assert records(SocketQuery.create(ports=[41020, 41021])) == []  # not in the test's namespace
    there = records(SocketQuery.create(ports=[41020, 41021], netns=named_ino))
    assert sorted((r.local.port, r.state) for r in there) == [
        (41020, State.LISTEN),
        (41021, State.BOUND_INACTIVE),
    ]
    assert all(r.netns == named_ino for r in there)
    assert records(SocketQuery.create(ports=[41020], addrs=["127.0.0.2"], netns=named_ino)) == []
