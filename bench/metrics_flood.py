"""An idle-connection flood on `rebind exporter`'s /metrics (issue 18 item 3, audit H2). Not a test.

    sudo .venv/bin/python bench/metrics_flood.py [--conns 1100] [--seconds 10] [--nofile 1024] [--src DIR]

In a private network namespace (re-executes itself under ``unshare -n``): starts the exporter
with RLIMIT_NOFILE ``--nofile`` (the audit's systemd-like 1024), then a flooder that keeps
``--conns`` connections open, each having sent half a request, and reopens every one the server
closes. For ``--seconds`` it scrapes /metrics once a second and reports: scrapes answered and
their latency, the exporter's CPU seconds per wall second (utime + stime from /proc/PID/stat)
during the flood, and its fd count. It asserts nothing (timed figures belong here, not in tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOODER = r"""
import select, socket, sys, threading, time, resource
port, n = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
socks, lock, told = set(), threading.Lock(), [False]
def work():  # as the audit's flood3.py: blocking connects from 64 threads
    while True:
        with lock:
            full = len(socks) >= n
        if full:
            time.sleep(0.01); continue
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
        except OSError:
            time.sleep(0.1); continue
        with lock:
            socks.add(s)
            if len(socks) >= n and not told[0]:
                told[0] = True; print("ready", flush=True)
for _ in range(64):
    threading.Thread(target=work, daemon=True).start()
while True:  # reopen what the server closes
    with lock:
        cur = list(socks)
    poll = select.poll()
    for s in cur: poll.register(s, select.POLLIN)
    by_fd = {s.fileno(): s for s in cur}
    for fd, _ev in poll.poll(100):
        s = by_fd[fd]
        try: data = s.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError: continue
        except OSError: data = b""
        if not data:
            with lock: socks.discard(s)
            s.close()
"""


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def _scrape(url: str) -> float | None:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            resp.read()
    except OSError:
        return None
    return time.monotonic() - t0


def run(conns: int, seconds: float, nofile: int, src: str) -> dict[str, object]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = 19851
    url = f"http://127.0.0.1:{port}/metrics"
    exp = subprocess.Popen(
        ["prlimit", f"--nofile={nofile}:{nofile}", "--", sys.executable, "-m", "rebind", "exporter",
         "--listen", f"127.0.0.1:{port}", "--watch", "8080"],
        stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=src),
    )  # fmt: skip
    flood = None
    try:
        deadline = time.monotonic() + 30
        while _scrape(url) is None:
            if time.monotonic() > deadline:
                raise SystemExit("the exporter did not start")
            time.sleep(0.1)
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(port), str(conns)], stdout=subprocess.PIPE, text=True
        )
        assert flood.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(flood.stdout, selectors.EVENT_READ)
        held_all = bool(sel.select(20))  # the old server never lets all connections in
        hz = os.sysconf("SC_CLK_TCK")
        c0, t0 = _cpu_ticks(exp.pid), time.monotonic()
        latencies: list[float | None] = []
        while time.monotonic() - t0 < seconds:
            latencies.append(_scrape(url))
            time.sleep(max(0.0, 1.0 - (latencies[-1] or 0.0)))
        wall = time.monotonic() - t0
        cpu = (_cpu_ticks(exp.pid) - c0) / hz
        ok = [x for x in latencies if x is not None]
        return {
            "conns": conns,
            "flood_held_all": held_all,
            "nofile": nofile,
            "seconds": round(wall, 1),
            "scrapes": len(latencies),
            "answered": len(ok),
            "latency_max_s": round(max(ok), 4) if ok else None,
            "latency_median_s": round(sorted(ok)[len(ok) // 2], 4) if ok else None,
            "exporter_cpu_per_wall_s": round(cpu / wall, 3),
            "exporter_fds": len(os.listdir(f"/proc/{exp.pid}/fd")),
            "exporter_threads": len(os.listdir(f"/proc/{exp.pid}/task")),
        }
    finally:
        for p in (flood, exp):
            if p is not None:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--nofile", type=int, default=1024)
    ap.add_argument(
        "--src", default=str(ROOT / "src"), help="rebind's source tree to run (compare a checkout)"
    )
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.in_netns:
        os.execvp("unshare", ["unshare", "-n", sys.executable, __file__, *sys.argv[1:], "--in-netns"])
    print(json.dumps(run(args.conns, args.seconds, args.nofile, args.src), indent=1))


if __name__ == "__main__":
    main()
