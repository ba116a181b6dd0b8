"""Benchmark `rebind why --connect` against `rebind ls PORT` on mkload's table (issue 10).

    sudo .venv/bin/python bench/connect.py --runs 5

Builds /work/shared/bench/mkload.py's default load (211k TCP sockets: 100k established pairs from
127.0.0.1 to 127.0.0.2-201:10000+, 11k TIME_WAIT on 9000, a listener on 8080 shared by 201
processes) in a fresh named namespace, enters it, and times, best of --runs, in the same run:

* `rebind ls 8080` (the reference: one kernel walk with a port filter, owners by BPF);
* `rebind why --connect 127.0.0.2:10000` (a destination with 500 connections from the range: the
  kernel filters on the destination, D_COND with the port, and on the range's peerless sockets);
* `rebind why --connect 127.0.0.1:8080` (a destination with no clients);
* the same with --json, and `ss -tan dst 127.0.0.2:10000` for scale.

Target: `why --connect` <= 1.2x `rebind ls 8080`, memory flat (peak RSS against an idle namespace).
Not a test: nothing asserts a time. Reuses bench/ls.py's namespace, load and timing helpers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ls as lsb

DST = "127.0.0.2:10000"


def commands() -> list[tuple[str, list[str]]]:
    r = lsb.REBIND
    return [
        ("rebind ls 8080", [r, "ls", "8080"]),
        (f"rebind why --connect {DST}", [r, "why", "--connect", DST]),
        (f"rebind why --connect {DST} --json", [r, "why", "--connect", DST, "--json"]),
        ("rebind why --connect 127.0.0.1:8080", [r, "why", "--connect", "127.0.0.1:8080"]),
        (f"ss -tan dst {DST}", ["ss", "-tan", "dst", DST]),
    ]


def measure(runs: int, tmp: Path) -> list[lsb.Timing]:
    for _, argv in commands()[:4]:
        lsb.run_once(argv, tmp / "warm.txt")
    # Interleave the commands run by run, so load from elsewhere on the machine hits all alike.
    per: dict[str, list[float]] = {name: [] for name, _ in commands()}
    last: dict[str, tuple[int, int]] = {}
    for _ in range(runs):
        for name, argv in commands():
            t, _rss, rc = lsb.run_once(argv, tmp / f"out-{len(last)}.txt")
            per[name].append(t)
            last[name] = (rc, len((tmp / f"out-{len(last)}.txt").read_bytes().splitlines()))
    out = []
    for name, argv in commands():
        rc, lines = last[name]
        out.append(lsb.Timing(name, argv, min(per[name]), per[name], lsb.peak_rss_kb(argv, tmp), lines, rc))
    return out


def check(tmp: Path) -> dict[str, object]:
    """What `why --connect --json` found, against ss's count of connections to the destination."""
    res = subprocess.run([lsb.REBIND, "why", "--connect", DST, "--json"], capture_output=True, text=True)
    doc = json.loads(res.stdout)
    ss = subprocess.run(["ss", "-tanH", "dst", DST], capture_output=True, text=True).stdout.splitlines()
    return {
        "in_use_to_destination": doc["range"]["by_reason"].get("in-use-to-destination", 0),
        "ss_connections_to_destination": len(ss),
        "usable": doc["range"]["usable"],
        "total": doc["range"]["total"],
        "verdict": doc["verdict"],
        "consumers": len(doc["consumers"]),
    }


def table(rows: list[lsb.Timing], ref: float) -> str:
    out = ["| command | best of N (s) | all runs (s) | × rebind ls 8080 | peak RSS (MiB) | lines | rc |"]
    out.append("|---|---:|---|---:|---:|---:|---:|")
    for t in rows:
        runs = " ".join(f"{x:.3f}" for x in t.runs)
        out.append(
            f"| `{t.name}` | {t.best:.3f} | {runs} | {t.best / ref:.2f} | {t.maxrss_kb / 1024:.1f} | {t.lines} | {t.rc} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--build-timeout", type=float, default=1200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-connect-"))
    tmp.chmod(0o711)
    started = datetime.datetime.now().astimezone()
    try:
        ns = lsb.Namespace(f"rebind-bench-connect-{os.getpid()}", create=True)
        load = None
        try:
            load, built = lsb.start_load(ns, [], tmp, args.build_timeout)
            ns.enter()
            sockets = lsb.socket_count()
            found = check(tmp)
            big = measure(args.runs, tmp)
        finally:
            if load is not None:
                ns.leave()
                lsb.stop_load(load)
            ns.delete()
        idle_ns = lsb.Namespace(f"rebind-bench-connect-{os.getpid()}-idle", create=True)
        try:
            idle_ns.enter()
            idle = {name: lsb.peak_rss_kb(argv, tmp) for name, argv in commands()[:4]}
        finally:
            idle_ns.delete()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = subprocess.run(
        ["git", "-C", str(lsb.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(f"Code: commit {head.stdout.strip()}\n")
    print(
        f"Measured {started:%Y-%m-%d %H:%M %Z} on Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"`{lsb.shell([sys.executable, *sys.argv])}`; load built in {built:.0f} s\n"
    )
    print(f"Socket table: {sockets}. `why --connect {DST} --json` found: {found}\n")
    ref = big[0].best
    print(table(big, ref) + "\n")
    for t in big[1:4]:
        print(
            f"- `{t.name}` = {t.best / ref:.2f}× `rebind ls 8080` (target ≤ 1.2): {'met' if t.best <= 1.2 * ref else 'MISSED'}"
        )
    for name, kb in idle.items():
        t = next(x for x in big if x.name == name)
        print(
            f"- memory: `{name}` peak RSS {t.maxrss_kb / 1024:.1f} MiB on the big table vs {kb / 1024:.1f} MiB idle"
        )


if __name__ == "__main__":
    main()
