"""`rebind exporter --trace`: the failure counters equal the failing calls a test made.

The trace program is system-wide; the exporter counts only its own network namespace (this
test's) and only the watched ports and destinations, so other tests' failures do not count.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

from tests.conftest import Procs

METRICS_PORT = 19811
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def _scrape() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        text: str = r.read().decode()
        return text


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return None


def _settled(name: str, want: float, **labels: str) -> str:
    """Scrape until the series reaches ``want`` (the reader thread drains the ring every 250 ms)."""
    deadline = time.monotonic() + 30
    while True:
        text = _scrape()
        if _value(text, name, **labels) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _start_exporter(procs: Procs, *args: str) -> subprocess.Popen[str]:
    p = procs.start(
        [sys.executable, "-m", "rebind", "exporter", "--listen", f"127.0.0.1:{METRICS_PORT}", *args]
    )
    assert p.stderr is not None
    line = p.stderr.readline()
    assert "serving" in line, line + (p.stderr.read() if p.poll() is not None else "")
    return p


def _failing_binds(n: int, port: int) -> int:
    made = 0
    for _ in range(n):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                assert exc.errno == errno.EADDRINUSE
                made += 1
    return made


def test_bind_and_connect_counters_equal_the_failures_made(netns: int, procs: Procs) -> None:
    _start_exporter(procs, "--watch", "8190", "--dest", "127.0.0.1:8191", "--trace")
    holders = []
    for port in (8190, 8192, 8191):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen(64)
        holders.append(s)
    made = _failing_binds(37, 8190)
    unwatched = _failing_binds(5, 8192)
    assert (made, unwatched) == (37, 5)
    # connect() with no local port left: one usable port, taken by the first connection
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("40000 40000")
    first = socket.create_connection(("127.0.0.1", 8191))
    refused = 0
    for _ in range(4):
        with socket.socket() as c:
            try:
                c.connect(("127.0.0.1", 8191))
            except OSError as exc:
                assert exc.errno == errno.EADDRNOTAVAIL
                refused += 1
    assert refused == 4
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("32768 60999")  # back: the scrapes need ports too
    text = _settled("rebind_bind_failures_total", made, port="8190", proto="tcp", errno="EADDRINUSE")
    assert _value(text, "rebind_bind_failures_total", port="8190", proto="tcp", errno="EADDRINUSE") == 37
    assert _value(text, "rebind_bind_failures_total", port="8190", proto="tcp", errno="EACCES") == 0
    assert "8192" not in text  # labels only from --watch
    text = _settled("rebind_connect_failures_total", 4, dst="127.0.0.1", dport="8191", errno="EADDRNOTAVAIL")
    assert (
        _value(text, "rebind_connect_failures_total", dst="127.0.0.1", dport="8191", errno="EADDRNOTAVAIL")
        == 4
    )
    assert (
        _value(text, "rebind_trace_events_dropped_total") is None
        or "rebind_trace_events_dropped_total 0.0" in text
    )
    # and it stays exact: nothing counted twice on a later scrape
    assert _value(_scrape(), "rebind_bind_failures_total", port="8190", proto="tcp", errno="EADDRINUSE") == 37
    first.close()
    for s in holders:
        s.close()


def test_without_trace_there_are_no_failure_counters(netns: int, procs: Procs) -> None:
    _start_exporter(procs, "--watch", "8190")
    text = _scrape()
    assert "rebind_bind_failures_total" not in text


def test_unprivileged_explicit_trace_says_what_is_missing(netns: int) -> None:
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PATH": os.environ.get("PATH", "")}
    args = ["exporter", "--listen", f"127.0.0.1:{METRICS_PORT}", "--watch", "8190", "--trace"]
    res = subprocess.run(
        [*NOBODY, sys.executable, "-m", "rebind", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 3, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_BPF" in lines[0]
