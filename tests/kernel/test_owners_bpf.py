"""The BPF owner lookup agrees with the /proc scan, on real sockets in a throwaway netns.

One Python process builds the sockets and the holders (each child says it is ready on a pipe):
  * a TCP listener and a UDP socket on the same port, held by the parent and a thread of it;
  * a forked worker sharing both;
  * a child that dropped to uid 65534 after the fork (fork-before-setuid: another uid's
    process holding root's sockets);
  * a child holding only a dup of the listener at fd 1000 (a grown fd table);
  * a child of uid 65534 that never had the sockets by fork and got the UDP one through
    SCM_RIGHTS.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from rebind.kernel import bpf, owners
from rebind.kernel.bpf import scan
from rebind.model.records import Proto
from rebind.sockets import iter_records

HOLDERS = r"""
import os, socket, sys, threading, time

def child(setup, wait=True):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        setup()
        os.write(w, b"x")
        time.sleep(3600)
        os._exit(0)
    os.close(w)
    if wait:
        ready(r)
    return pid, r

def ready(r):
    assert os.read(r, 1) == b"x"
    os.close(r)

def nobody():
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
got = {}

def receiver():
    nobody()
    a.close()
    _, fds, _, _ = socket.recv_fds(b, 16, 1)
    got["fd"] = fds[0]

# forked before the sockets exist: it can only get one by SCM_RIGHTS
scm, scm_ready = child(lambda: (receiver(), b.send(b"%d" % got["fd"])), wait=False)
lst = socket.create_server(("127.0.0.1", 0))
port = lst.getsockname()[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", port))
socket.send_fds(a, [b"u"], [udp.fileno()])
scm_fd = int(a.recv(16))
ready(scm_ready)
worker, _ = child(lambda: None)
dropped, _ = child(nobody)
def only_dup():
    os.dup2(lst.fileno(), 1000)
    lst.close()
    udp.close()
high, _ = child(only_dup)
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
print("ready", port, os.getpid(), worker, dropped, high, scm, lst.fileno(), udp.fileno(), scm_fd, flush=True)
time.sleep(3600)
"""


def _start(procs: Any) -> tuple[int, dict[str, int], dict[str, int]]:
    p = procs.python(HOLDERS)
    line = procs.wait_line(p)
    assert line.startswith("ready"), line
    port, parent, worker, dropped, high, scm, lst_fd, udp_fd, scm_fd = map(int, line.split()[1:])
    for pid in (worker, dropped, high, scm):
        procs.adopt(pid)
    pids = dict(parent=parent, worker=worker, dropped=dropped, high=high, scm=scm)
    return port, pids, dict(lst=lst_fd, udp=udp_fd, scm=scm_fd)


def _holders(found: dict[int, tuple[owners.Owner, ...]]) -> dict[int, set[tuple[int, int]]]:
    return {ino: {(o.pid, o.fd) for o in os_} for ino, os_ in found.items()}


@pytest.fixture
def bpf_ready() -> None:
    try:
        bpf.find_socket_holders([1])  # an inode nobody holds: loads and runs everything
    except bpf.BPFUnavailable as exc:
        pytest.skip(f"BPF iterators unavailable here: {exc}")


def test_bpf_and_proc_scans_agree(
    netns: int, procs: Any, bpf_ready: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, pids, fds = _start(procs)
    records = list(iter_records(ports=[port])[0])
    tcp = next(r for r in records if r.proto is Proto.TCP)
    udp = next(r for r in records if r.proto is Proto.UDP)

    via_bpf, report = owners.find_owners(records)
    assert owners.bpf_fallback_reason is None
    monkeypatch.setenv("REBIND_NO_BPF", "1")
    via_proc, proc_report = owners.find_owners(records)
    assert owners.bpf_fallback_reason is None  # not tried, not failed

    # identical owners, details included (same processes described the same way)
    assert via_bpf == via_proc
    got = _holders(via_bpf)
    p = pids
    assert got[tcp.inode] == {
        (p["parent"], fds["lst"]),
        (p["worker"], fds["lst"]),
        (p["dropped"], fds["lst"]),
        (p["high"], 1000),
    }
    assert got[udp.inode] == {
        (p["parent"], fds["udp"]),
        (p["worker"], fds["udp"]),
        (p["dropped"], fds["udp"]),
        (p["scm"], fds["scm"]),
    }
    # the BPF scan visits every fd table on the machine; nothing was unreadable
    assert report.inaccessible == 0 and report.other_netns == 0
    assert report.scanned >= proc_report.scanned


@pytest.mark.parametrize(
    "hints",
    [
        pytest.param({"uids": [0], "netns": None}, id="likely-first"),
        pytest.param({}, id="no-hints"),  # learns every address while scanning everyone
        pytest.param({"uids": [4242], "netns": 1}, id="misleading-hints"),
    ],
)
def test_every_pass_finds_the_same_holders(
    netns: int, procs: Any, bpf_ready: None, hints: dict[str, object]
) -> None:
    port, pids, _ = _start(procs)
    records = list(iter_records(ports=[port])[0])
    inodes = [r.inode for r in records if r.inode]
    if hints.get("netns") is None and "uids" in hints:
        hints = {**hints, "netns": netns}
    result = bpf.find_socket_holders(inodes, **hints)  # type: ignore[arg-type]
    baseline = bpf.find_socket_holders(inodes)
    key = sorted((h.pid, h.fd, h.inode) for h in result.hits)
    assert key == sorted((h.pid, h.fd, h.inode) for h in baseline.hits)
    assert {h.pid for h in result.hits} == set(pids.values())
    # start times agree with /proc/PID/stat field 22
    for h in result.hits:
        assert h.start_ticks == owners.read_start_ticks(h.pid), h
        assert h.tid == h.pid


def test_more_records_than_the_array_holds_scan_again_with_room(
    netns: int, procs: Any, bpf_ready: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 records (two sockets, four holders each) and an array sized for 4: the program counts
    what did not fit, and the scan runs again with room for it, finding the same holders."""
    port, _, _ = _start(procs)
    inodes = [r.inode for r in iter_records(ports=[port])[0] if r.inode]
    assert len(inodes) == 2
    full = bpf.find_socket_holders(inodes)
    assert len(full.hits) == 8
    monkeypatch.setattr(scan, "SPARE_RECORDS", 0)
    runs = []
    real_scan = scan._scan

    def counted(*args: Any, **kw: Any) -> tuple[bytes, bytes]:
        runs.append(args[-1])  # the capacity
        return real_scan(*args, **kw)

    monkeypatch.setattr(scan, "_scan", counted)
    again = bpf.find_socket_holders(inodes)
    assert runs == [4, 10]  # 2 per socket, then 8 + 8 // 4
    assert sorted(again.hits) == sorted(full.hits)
    monkeypatch.setattr(scan, "ATTEMPTS", 1)
    with pytest.raises(bpf.BPFUnavailable, match="8 records did not fit"):
        bpf.find_socket_holders(inodes)


def test_a_socket_nobody_holds_costs_a_full_scan_and_finds_nothing(netns: int, bpf_ready: None) -> None:
    result = bpf.find_socket_holders([0xFFFFFFF0])
    assert result.hits == () and result.tables > 0


def test_switches_and_fallbacks(
    netns: int, procs: Any, bpf_ready: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _, _ = _start(procs)
    records = list(iter_records(ports=[port])[0])
    # a /proc root of our own (tests, containers) means the /proc scan: BPF sees the live kernel
    assert owners.bpf_wanted("/proc")
    assert not owners.bpf_wanted("/somewhere/proc")
    monkeypatch.setenv("REBIND_NO_BPF", "1")
    assert not owners.bpf_wanted("/proc")
    monkeypatch.setenv("REBIND_NO_BPF", "0")
    assert owners.bpf_wanted("/proc")
    # a verifier that refuses falls back to the /proc scan, with the reason kept
    monkeypatch.setattr(scan, "_check_environment", _refuse)
    found, report = owners.find_owners(records)
    assert owners.bpf_fallback_reason == "no, said the test"
    assert found and report.scanned > 0


def _refuse() -> None:
    raise bpf.BPFUnavailable("no, said the test")


def test_without_privileges_it_says_so(netns: int) -> None:
    code = (
        "import os\n"
        "from rebind.kernel import bpf\n"  # imported as root: nobody cannot read ~root
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n    bpf.find_socket_holders([1])\n"
        "except bpf.BPFUnavailable as e:\n    print('unavailable:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "unavailable: no CAP_BPF" in out.stdout, out.stderr


def test_a_hit_whose_pid_now_names_another_process_is_dropped(
    netns: int, procs: Any, bpf_ready: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel saw the process that started at hit.start_ticks; a different start time now
    means the pid was reused after the scan: not an owner (and never a target for `free`)."""
    port, _, _ = _start(procs)
    records = list(iter_records(ports=[port])[0])
    real = bpf.find_socket_holders

    def stale(*args: Any, **kw: Any) -> bpf.ScanResult:
        res = real(*args, **kw)
        return res._replace(hits=tuple(h._replace(start_ticks=h.start_ticks - 1) for h in res.hits))

    monkeypatch.setattr(bpf, "find_socket_holders", stale)
    found, report = owners.find_owners(records)
    assert owners.bpf_fallback_reason is None
    assert found == {} and report.vanished == 5  # the five holders of _start, each dropped once


MANY = """
import socket, time
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(1500)]
for i, s in enumerate(socks):
    s.bind(('127.0.0.1', 30000 + i))
print('ready', flush=True)
time.sleep(600)
"""


def test_one_process_holding_more_than_a_seq_buffer_of_sockets(
    netns: int, procs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,500 wanted sockets in one process: more records than one iterator show() could write
    to the 32 KiB seq_file buffer (E2BIG); the records go to an array instead, in one scan."""
    p = procs.python(MANY)
    assert procs.wait_line(p, timeout=60) == "ready"
    records = [r for r in iter_records(ports=range(30000, 31500), protos=[Proto.UDP])[0]]
    assert len(records) == 1500
    scans = []
    real_scan = scan._scan
    monkeypatch.setattr(scan, "_scan", lambda *a, **kw: scans.append(a[-1]) or real_scan(*a, **kw))
    found, _ = owners.find_owners(records)
    assert owners.bpf_fallback_reason is None
    assert len(scans) == 1
    assert {o.pid for v in found.values() for o in v} == {p.pid} and len(found) == 1500


def test_a_file_hint_finds_every_holder_and_a_wrong_one_none(netns: int, procs: Any, bpf_ready: None) -> None:
    """find_owners(files=...): the TCP listener's struct file read from the bind hash (the
    owners program's EXTRA_FILE) gives the scan a head start -- and the same holders, a forked
    worker, a dropped-uid child and a dup at fd 1000 included. A hint pointing at another
    socket's file finds nothing for the hinted inode (each match is checked against its
    inode), and a wanted inode without a hint is still found beside hinted ones."""
    from rebind.kernel.bindhash_table import read_port_sockets

    port, _pids, _fds = _start(procs)
    records = list(iter_records(ports=[port])[0])
    tcp = next(r for r in records if r.proto is Proto.TCP)
    udp = next(r for r in records if r.proto is Proto.UDP)
    got = read_port_sockets(port, 16)
    assert not isinstance(got, str) and not hasattr(got, "reason"), got
    hints = got.file_hints()  # type: ignore[union-attr]
    assert set(hints) == {tcp.inode} and hints[tcp.inode] > 1 << 47  # a kernel address
    plain, _ = owners.find_owners(records)
    hinted, _ = owners.find_owners(records, files=hints)
    assert hinted == plain and len(plain[tcp.inode]) == 4 and len(plain[udp.inode]) == 4
    # the listener's file named as the UDP socket's: no holder is taken for it on the hint
    wrong, _ = owners.find_owners([udp], files={udp.inode: hints[tcp.inode]})
    assert udp.inode not in wrong
    # ... which is the hint's only effect: without it the UDP socket's holders are found
    assert owners.find_owners([udp])[0] == {udp.inode: plain[udp.inode]}
