"""Idle-connection floods on the metrics endpoints (issue 18 items 2 and 3; audit H1, H2).

A hostile local user (uid 65534, a script that does not import rebind) keeps 300 connections
open to the metrics port, each having sent half a request, and reopens every one the server
closes. The process under test runs with RLIMIT_NOFILE 256 (set with prlimit on its pid): before
the bounded server, the flood took every fd -- `/metrics` stopped answering and `rebind run` could
no longer start a generation. Now /metrics still answers, the server's fds stay within its cap,
and `rebind run` reloads and restarts a crashed generation under the flood.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rebind.exporter.serve import MAX_CONNECTIONS
from tests.conftest import Procs
from tests.kernel.test_supervisor import HTTP_APP, Supervised, get

NOFILE = 256
FLOOD = 300

# Opens N connections, sends half a request on each, keeps them; reopens any the server closes.
# Prints "ready" once N connections were made at least once.
FLOODER = r"""
import select, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, made, told = [], 0, False
def one():
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        s.setblocking(False)
        return s
    except OSError:
        s.close()
        return None
while True:
    while len(socks) < n:
        s = one()
        if s is None:
            time.sleep(0.01)
            break
        socks.append(s)
        made += 1
    if made >= n and not told:
        print("ready", flush=True)
        told = True
    r, _, _ = select.select(socks[:1000], [], [], 0.05)
    for s in r:  # the server closed it (EOF or reset): reopen
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            socks.remove(s)
            s.close()
"""


def _hostile(procs: Procs, port: int) -> subprocess.Popen[str]:
    if not Path("/usr/bin/setpriv").exists() and not Path("/bin/setpriv").exists():
        pytest.skip("setpriv (util-linux) is not installed")
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    p = procs.start([*argv, "/usr/bin/python3", "-u", "-c", FLOODER, str(port), str(FLOOD)])
    assert procs.wait_line(p, timeout=60) == "ready"
    return p


def _limit_fds(pid: int) -> None:
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={NOFILE}:{NOFILE}"], check=True)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _scrape(port: int, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        body: str = resp.read().decode()
        return body


def _wait_scrape(port: int, deadline: float) -> str:
    while True:
        try:
            return _scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_exporter_answers_under_an_idle_connection_flood(netns: int, procs: Procs) -> None:
    exp = procs.start(
        [sys.executable, "-m", "rebind", "exporter", "--listen", "127.0.0.1:19821", "--watch", "8080"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_scrape(19821, time.monotonic() + 30)
    _limit_fds(exp.pid)
    base = _fds(exp.pid)
    flood = _hostile(procs, 19821)
    for _ in range(3):
        assert "rebind_port_bindable" in _scrape(19821)
    # The flood costs at most the connection cap (plus the scrape in flight), never the fd table.
    assert _fds(exp.pid) <= base + MAX_CONNECTIONS + 1
    assert exp.poll() is None and flood.poll() is None


def test_run_metrics_flood_does_not_stop_reloads_or_crash_restarts(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    sup = Supervised(procs, tmp_path, 8091, HTTP_APP, "--metrics", "127.0.0.1:9474")
    _wait_scrape(9474, time.monotonic() + 30)
    _limit_fds(sup.proc.pid)
    flood = _hostile(procs, 9474)
    assert "rebind_run_generation" in _scrape(9474)
    assert sup.fd_count() < NOFILE - 64
    # A reload still spawns a generation (pipes, fork) and the control socket still accepts.
    assert sup.reload().startswith("ok: generation 2")
    # A crashed generation is restarted and the served port answers again.
    log = sup.wait_log("generation 2 (pid")
    pid = int(re.findall(r"generation 2 \(pid (\d+)", log)[-1])
    os.kill(pid, signal.SIGKILL)
    sup.wait_log("restart after crash")
    sup.wait_log("ready after", count=3)
    assert get(8091)
    assert "rebind_run_generation 3.0" in _scrape(9474)
    assert flood.poll() is None
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(30) == 0
