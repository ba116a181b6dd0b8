"""Differential test: `rebind ls --json` against `ss -tanuepH` and `lsof -nP -i` on one namespace.

Every socket ss or lsof shows must appear in rebind with the same state and the same set of
pids. rebind may show more, but only bound-inactive sockets (ss 6.1, lsof and /proc/net cannot see
them), and it must show those with their owner.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import defaultdict
from ipaddress import IPv6Address, ip_address
from typing import Any

import pytest

from tests.kernel.helpers import BOUND_ONLY, ORPHAN_CHILD, OTHER_UID, SHARED, ls_json

# One process holding many kinds of sockets; prints 'ready' when all exist.
ZOO = """
import socket, time
keep = []
def srv(addr, port, fam=socket.AF_INET, v6only=None, reuseport=False):
    s = socket.socket(fam)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((addr, port)); s.listen(); keep.append(s); return s
srv('0.0.0.0', 18600)
dual = srv('::', 18610, socket.AF_INET6, v6only=0)
srv('::', 18614, socket.AF_INET6, v6only=1)
srv('::1', 18609, socket.AF_INET6)
srv('127.0.0.1', 18616, reuseport=True)
c = socket.create_connection(('127.0.0.1', 18610)); a, _ = dual.accept(); keep += [c, a]   # v4-mapped ESTAB
c6 = socket.create_connection(('::1', 18609)); keep.append(c6)                            # ESTAB + SYN_RECV/ESTAB child
# Orphan FIN_WAIT2 on the server side (18607), CLOSE_WAIT on the client (explicitly bound to 18608).
l = srv('127.0.0.1', 18607)
cw = socket.socket(); cw.bind(('127.0.0.1', 18608)); cw.connect(('127.0.0.1', 18607)); keep.append(cw)
x, _ = l.accept(); x.close()
# Server-side TIME_WAIT on 18606.
t = socket.create_server(('127.0.0.1', 18606)); tc = socket.create_connection(('127.0.0.1', 18606))
ta, _ = t.accept(); ta.close(); time.sleep(0.05); tc.close(); t.close()
for fam, addr, port, peer in [(socket.AF_INET, '127.0.0.1', 18611, None), (socket.AF_INET, '127.0.0.1', 18612, 18611),
                              (socket.AF_INET6, '::', 18613, None), (socket.AF_INET6, '::1', 18617, None)]:
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((addr, port)); keep.append(u)
    if peer:
        u.connect((addr, peer))
time.sleep(0.1)
print('ready', flush=True)
time.sleep(600)
"""

REUSE_PEER = """
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(('127.0.0.1', 18616)); s.listen()
print('ready', flush=True)
time.sleep(600)
"""

SS_STATE = {
    "ESTAB": "ESTABLISHED",
    "SYN-RECV": "SYN_RECV",
    "TIME-WAIT": "TIME_WAIT",
    "FIN-WAIT-1": "FIN_WAIT1",
    "FIN-WAIT-2": "FIN_WAIT2",
    "CLOSE-WAIT": "CLOSE_WAIT",
    "LAST-ACK": "LAST_ACK",
}


def _addr(text: str) -> tuple[str, int]:
    """'127.0.0.1:80', '[::1]:80', '*:80', '[::ffff:127.0.0.1]:80' -> (normalised address, port)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]").split("%")[0]
    if host == "*":
        return "*", int(port) if port != "*" else 0
    ip = ip_address(host)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(port) if port != "*" else 0


def _ours(ep: dict[str, Any]) -> tuple[str, int]:
    return _addr(f"[{ep['addr']}]:{ep['port']}")


def _same_addr(theirs: tuple[str, int], ours: tuple[str, int]) -> bool:
    if theirs[0] == "*":  # ss and lsof print '*' for a wildcard of either family
        return ours[0] in ("0.0.0.0", "::") and theirs[1] == ours[1]
    return theirs == ours


def parse_ss(out: str) -> list[dict[str, Any]]:
    rows = []
    for line in out.splitlines():
        f = line.split()
        extra = line
        rows.append(
            {
                "proto": f[0],
                "state": SS_STATE.get(f[1], f[1]),
                "local": _addr(f[4]),
                "remote": _addr(f[5]),
                "inode": int(m.group(1)) if (m := re.search(r"\bino:(\d+)", extra)) else 0,
                "uid": int(m.group(1)) if (m := re.search(r"\buid:(\d+)", extra)) else 0,
                "v6only": bool(int(m.group(1))) if (m := re.search(r"\bv6only:(\d)", extra)) else None,
                "pids": {int(p) for p in re.findall(r"pid=(\d+)", extra)},
                "timer_s": int(m.group(1)) if (m := re.search(r"timer:\(timewait,(\d+)sec", extra)) else None,
            }
        )
    return rows


def parse_lsof(out: str) -> dict[int, dict[str, Any]]:
    """lsof -nP -i (plain): one row per pid and fd; grouped by socket inode (the DEVICE column)."""
    socks: dict[int, dict[str, Any]] = {}
    for line in out.splitlines()[1:]:
        f = line.split()
        pid, inode, proto, name = int(f[1]), int(f[5]), f[7].lower(), f[8]
        local, _, remote = name.partition("->")
        state = f[9].strip("()") if len(f) > 9 else ("ESTABLISHED" if remote else "UNCONN")
        s = socks.setdefault(
            inode,
            {
                "proto": proto,
                "state": state,
                "local": _addr(local),
                "remote": _addr(remote) if remote else None,
                "pids": set(),
            },
        )
        s["pids"].add(pid)
    return socks


@pytest.fixture
def zoo(netns, procs):
    """A varied socket table: returns (pid sets by role, bound-inactive port)."""
    with open("/proc/sys/net/ipv4/tcp_fin_timeout", "w") as f:
        f.write("50\n")  # per namespace: the orphan FIN_WAIT2 must outlive the test
    started = {}
    z = procs.python(ZOO)
    started["zoo"] = {z.pid}
    shared = procs.python(SHARED.format(port=18601))
    kids = {int(k) for k in procs.wait_line(shared).split()}
    for k in kids:
        procs.adopt(k)
    started["shared"] = kids | {shared.pid}
    orphan = procs.python(ORPHAN_CHILD.format(port=18602))
    child = int(procs.wait_line(orphan))
    procs.adopt(child)
    orphan.wait(5)
    started["orphan"] = {child}
    other = procs.python(OTHER_UID.format(port=18603))
    bound = procs.python(BOUND_ONLY.format(port=18604))
    peer = procs.python(REUSE_PEER)
    for p in (z, other, bound, peer):
        assert procs.wait_line(p) == "ready"
    started["other_uid"] = {other.pid}
    started["bound"] = {bound.pid}
    started["reuse_peer"] = {peer.pid}
    return started


def test_rebind_agrees_with_ss_and_lsof(zoo, rebind_cli):
    from tests.toolcheck import need_tool

    need_tool("ss")
    need_tool("lsof")
    ss = subprocess.run(["ss", "-tanuepH"], capture_output=True, text=True, check=True).stdout
    ss_rows = parse_ss(ss)
    pids = sorted(set().union(*zoo.values()) | {os.getpid()})
    lsof = subprocess.run(
        ["lsof", "-nP", "-i", "-a", "-p", ",".join(map(str, pids))], capture_output=True, text=True
    ).stdout
    lsof_socks = parse_lsof(lsof)
    ports = sorted({r["local"][1] for r in ss_rows} | {18604})
    doc = ls_json(rebind_cli, *map(str, ports))
    assert doc["source"] == "netlink" and doc["warnings"] == []
    ours = doc["sockets"]
    by_inode = {s["inode"]: s for s in ours if s["inode"]}
    minis = defaultdict(list)
    for s in ours:
        if not s["inode"]:
            minis[(s["state"], _ours(s["local"]), _ours(s["remote"]))].append(s)

    # Sanity: the namespace really holds the variety this test is about.
    ss_states = {(r["proto"], r["state"]) for r in ss_rows}
    for want in [
        ("tcp", "LISTEN"),
        ("tcp", "ESTABLISHED"),
        ("tcp", "TIME_WAIT"),
        ("tcp", "FIN_WAIT2"),
        ("tcp", "CLOSE_WAIT"),
        ("udp", "UNCONN"),
        ("udp", "ESTABLISHED"),
    ]:
        assert want in ss_states, (want, ss)
    assert len(ss_rows) >= 20 and len(lsof_socks) >= 15, (ss, lsof)

    matched: set[int] = set()
    for r in ss_rows:
        if r["inode"]:
            s = by_inode.get(r["inode"])
            assert s is not None, f"rebind misses {r}"
        else:
            cands = minis[(r["state"], r["local"], r["remote"])]
            assert len(cands) == 1, f"rebind misses {r}"
            s = cands[0]
            if r["timer_s"] is not None:  # a timewait mini-socket; else e.g. a not yet accepted child
                assert 0 < s["expires_ms"] <= 1000 * (r["timer_s"] + 1), (s, r)
        matched.add(id(s))
        assert (s["proto"], s["state"]) == (r["proto"], r["state"]), (s, r)
        assert _same_addr(r["local"], _ours(s["local"])), (s, r)
        assert {o["pid"] for o in s["owners"] or []} == r["pids"], (s, r)
        if r["inode"]:
            assert s["uid"] == r["uid"] and (r["v6only"] is None or s["v6only"] is r["v6only"]), (s, r)

    for inode, r in lsof_socks.items():
        s = by_inode.get(inode)
        assert s is not None, f"rebind misses lsof's {r}"
        assert (s["proto"], s["state"]) == (r["proto"], r["state"]), (s, r)
        assert _same_addr(r["local"], _ours(s["local"])), (s, r)
        assert {o["pid"] for o in s["owners"]} == r["pids"], (s, r)

    # What only rebind sees: bound-inactive sockets, with their owner.
    extra = [s for s in ours if id(s) not in matched]
    assert extra and all(s["state"] == "BOUND_INACTIVE" for s in extra), extra
    [bound] = [s for s in extra if s["local"]["port"] == 18604]
    assert {o["pid"] for o in bound["owners"]} == zoo["bound"]
    assert bound["inode"] not in lsof_socks

    # The roles came out right, not just consistently with the other tools.
    def pids_on(port: int, state: str = "LISTEN") -> set[int]:
        return {
            o["pid"] for s in ours if s["local"]["port"] == port and s["state"] == state for o in s["owners"]
        }

    assert pids_on(18601) == zoo["shared"] and len(zoo["shared"]) == 3
    assert pids_on(18602) == zoo["orphan"]
    assert pids_on(18603) == zoo["other_uid"]
    assert pids_on(18616) == zoo["zoo"] | zoo["reuse_peer"]
    assert [s["uid"] for s in ours if s["local"]["port"] == 18603] == [65534]


def test_rebind_is_stable_over_repeated_reads(zoo, rebind_cli):
    """Two reads a moment apart see the same sockets (cookies) and owners: nothing is guessed."""
    ports = [str(p) for p in range(18600, 18618)]
    a = ls_json(rebind_cli, *ports)["sockets"]
    time.sleep(0.05)
    b = ls_json(rebind_cli, *ports)["sockets"]

    def ident(socks: list[dict[str, Any]]) -> set[tuple[object, ...]]:
        return {(s["cookie"], s["state"], tuple(sorted(o["pid"] for o in s["owners"]))) for s in socks}

    assert ident(a) == ident(b)
