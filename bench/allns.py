"""Benchmark `rebind ls --all-netns 8080` against the per-namespace `nsenter … ss -tanp` loop (issue 11).

    sudo .venv/bin/python bench/allns.py                       # 100 namespaces x 1,000 sockets
    sudo .venv/bin/python bench/allns.py --namespaces 20 --runs 3

It creates N uniquely named namespaces (`ip netns add rebind-an-<tag>-<i>`), each with lo up and
one holder process (started with `nsenter --net`) owning ~1,000 TCP sockets: a listener on 8080,
and connected pairs from 8080 plus bound-but-idle sockets. Then it times, best of --runs:

* `rebind ls --all-netns 8080 --json` (one process: every namespace by setns, owners found once);
* the loop users write today: for each namespace, `nsenter --net=… ss -tanp 'sport = :8080'`.

It checks that both found the same (namespace, owner pid) pairs, prints a Markdown report, and
at the end kills the holders by pid and deletes the namespaces. Not a test: it asserts no time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REBIND = str(VENV_BIN / "rebind")
PORT = 8080

HOLDER = r"""
import socket, sys, time
n = int(sys.argv[1])
keep = []
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", PORT_)); lst.listen(4096); keep.append(lst)
pairs = (n - 1) // 3
for _ in range(pairs):
    c = socket.create_connection(("127.0.0.1", PORT_)); a, _ = lst.accept(); keep += [c, a]
while len(keep) < n:
    b = socket.socket(); b.bind(("127.0.0.1", 0)); keep.append(b)
print("ready", flush=True)
time.sleep(3600)
""".replace("PORT_", str(PORT))


def build(count: int, sockets: int, tag: str) -> tuple[list[str], list[subprocess.Popen[str]]]:
    names, holders = [], []
    for i in range(count):
        name = f"rebind-an-{tag}-{i}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        names.append(name)
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{name}", sys.executable, "-c", HOLDER, str(sockets)],
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(p)
    for p in holders:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return names, holders


def teardown(names: list[str], holders: list[subprocess.Popen[str]]) -> None:
    for p in holders:
        p.kill()
    for p in holders:
        p.wait()
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False)


def best_of(runs: int, fn: object) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def rebind_pairs(names: list[str]) -> set[tuple[str, int]]:
    res = subprocess.run(
        [REBIND, "ls", "--all-netns", str(PORT), "--state", "listen", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    doc = json.loads(res.stdout)
    wanted = set(names)
    return {
        (s["netns_name"], o["pid"]) for s in doc["sockets"] if s["netns_name"] in wanted for o in s["owners"]
    }


def ss_pairs(names: list[str]) -> set[tuple[str, int]]:
    found = set()
    for name in names:
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{name}", "ss", "-tanpH", "state", "listening", f"sport = :{PORT}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        found |= {(name, int(pid)) for pid in re.findall(r"pid=(\d+)", out)}
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    names, holders = build(args.namespaces, args.sockets, tag)
    built = time.monotonic() - t0
    try:
        r_best, r_all, r_pairs = best_of(args.runs, lambda: rebind_pairs(names))
        s_best, s_all, s_pairs = best_of(args.runs, lambda: ss_pairs(names))
    finally:
        teardown(names, holders)
    same = r_pairs == s_pairs
    print(f"## rebind ls --all-netns: {args.namespaces} namespaces x {args.sockets} sockets\n")
    print(
        f"Command: `sudo .venv/bin/python bench/allns.py --namespaces {args.namespaces} "
        f"--sockets {args.sockets} --runs {args.runs}`; load built in {built:.1f} s; "
        f"{os.cpu_count()} CPUs; kernel {os.uname().release}.\n"
    )
    print("| command | best of N (s) | all runs (s) | ratio |")
    print("|---|---:|---|---:|")
    print(
        f"| `rebind ls --all-netns {PORT} --state listen --json` | {r_best:.3f} | "
        f"{' '.join(f'{t:.3f}' for t in r_all)} | {r_best / s_best:.2f} |"
    )
    print(
        f"| loop: `nsenter --net=… ss -tanp 'sport = :{PORT}'` x {args.namespaces} | {s_best:.3f} | "
        f"{' '.join(f'{t:.3f}' for t in s_all)} | 1.00 |"
    )
    print(
        f"\nSame (namespace, owner pid) pairs as the ss loop: {same} ({len(r_pairs)} pairs); "  # type: ignore[arg-type]
        f"target ≤ 0.5: {'met' if r_best / s_best <= 0.5 else 'MISSED'}."
    )


if __name__ == "__main__":
    main()
