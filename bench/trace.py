"""Benchmark `rebind trace`: what it costs everyone else, and how soon a failure is printed.

    sudo .venv/bin/python bench/trace.py                    # 3 rounds of 20,000 connects, 50 failures
    sudo .venv/bin/python bench/trace.py --connects 50000 --rounds 5 --failures 200

1. Overhead: a loop of successful TCP connect()s on loopback (connect, accept, close with
   SO_LINGER 0 so no TIME_WAIT piles up), in a private network namespace, timed with no trace
   running and with `rebind trace` running (system-wide; it sees no failure from the loop).
   Rounds are interleaved (off, on, off, ...); best and median per second are printed, and
   the ratio of the medians. The trace program runs at every syscall's exit on the machine,
   so this loop (5 syscalls per connection) pays it five times per connection.
2. Event to line: one failing bind() (EADDRINUSE, a listener on the port) at a time; the time
   from the call's return to the moment its line (with the blocker snapshot) is read from
   `rebind trace --json`'s stdout, with the owner scan and without (--no-owners); also the
   snapshot's own ``after_ms``. Idle namespace only: the 211k-socket table of the issue's
   budget is not built here (bench/mkload.py can build it; not measured yet).

Not a test: it asserts no time.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

from rebind.kernel.netns import private_netns

LINGER0 = struct.pack("ii", 1, 0)


def connect_loop(n: int, port: int) -> float:
    """Connections per second over n connect/accept/close rounds."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    t0 = time.perf_counter()
    for _ in range(n):
        c = socket.socket()
        c.connect(("127.0.0.1", port))
        a, _ = srv.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        c.close()
        a.close()
    dt = time.perf_counter() - t0
    srv.close()
    return n / dt


def start_trace(netns: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "rebind", "trace", "--json", "--netns", str(netns), *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert p.stderr is not None
    line = p.stderr.readline().decode()
    if "tracing" not in line:
        raise SystemExit(f"rebind trace did not start: {line}{p.stderr.read().decode()}")
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    p.wait(30)


def overhead(netns: int, n: int, rounds: int) -> None:
    off: list[float] = []
    on: list[float] = []
    port = 20000
    for _ in range(rounds):
        port += 1
        off.append(connect_loop(n, port))
        p = start_trace(netns)
        try:
            port += 1
            on.append(connect_loop(n, port))
        finally:
            stop(p)
    ratio = statistics.median(on) / statistics.median(off)
    print(f"connect loop, {n} connections x {rounds} rounds (connections/s):")
    print(f"  without trace: best {max(off):,.0f}  median {statistics.median(off):,.0f}")
    print(f"  with trace:    best {max(on):,.0f}  median {statistics.median(on):,.0f}")
    print(f"  ratio of medians (with/without): {ratio:.3f}  -> overhead {100 * (1 - ratio):.1f}%")


def latency(netns: int, failures: int, *extra: str) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 30000))
    lst.listen()
    p = start_trace(netns, *extra)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    lat: list[float] = []
    after: list[float] = []
    try:
        buf = b""
        for _ in range(failures):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", 30000))
            except OSError:
                t_fail = time.monotonic()
            s.close()
            while b"\n" not in buf:
                if not select.select([fd], [], [], 30)[0]:
                    raise SystemExit("no line within 30 s")
                buf += os.read(fd, 1 << 16)
            line, _, buf = buf.partition(b"\n")
            lat.append((time.monotonic() - t_fail) * 1000)
            doc = json.loads(line)
            if doc["snapshot"] and doc["snapshot"]["after_ms"] is not None:
                after.append(doc["snapshot"]["after_ms"])
            time.sleep(0.12)  # past the 100 ms sharing window: every failure gets its own snapshot
    finally:
        stop(p)
        lst.close()
    what = " ".join(extra) or "(owners on)"
    print(f"event -> line, {failures} failing binds, {what}:")
    print(f"  line read after:    median {statistics.median(lat):.1f} ms  max {max(lat):.1f} ms")
    if after:
        print(f"  snapshot after_ms:  median {statistics.median(after):.1f} ms  max {max(after):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connects", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--failures", type=int, default=50)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with private_netns() as netns:
        overhead(netns, args.connects, args.rounds)
        latency(netns, args.failures)
        latency(netns, args.failures, "--no-owners")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
