"""Benchmark one `rebind top` refresh on mkload.py's big socket table (issue 14).

    sudo .venv/bin/python bench/top.py                 # ~2 min: builds the load, 2 x 30 refreshes
    sudo .venv/bin/python bench/top.py --refreshes 60

Builds /work/shared/bench/mkload.py's default load (211k TCP sockets, 202 processes sharing the
8080 listener) in a fresh named network namespace with bench/ls.py's helpers, enters it, and
drives rebind.top.sampler.Sampler exactly as the TUI does: one sample() per interval (1 s), for
10 watched ports, then for --all. CPU is the sampling thread's (time.thread_time: user + kernel
time of its syscalls, i.e. the kernel's table walks included). Targets: a refresh for 10
watched ports <= 50 ms CPU; with --all the 1 s interval holds (or the view says it slowed down).

Not a test: it asserts nothing. The load is killed by its process group and the namespace
deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import ls as bench_ls  # noqa: E402

from rebind.top.sampler import Sampler  # noqa: E402

#: 8080: the listener 201 processes share; 8081: a decoy listener; 9000: ~11k server-side
#: TIME_WAIT; 10000-10006: listeners with 500 accepted connections each.
WATCHED = [8080, 8081, 9000, *range(10000, 10007)]


def drive(sampler: Sampler, refreshes: int, interval: float) -> dict[str, object]:
    cpu: list[float] = []
    wall: list[float] = []
    slow_runs = 0
    next_at = time.monotonic()
    rows = 0
    for _ in range(refreshes):
        before = {k: j.last_run for k, j in sampler.cadence.jobs.items()}
        snap = sampler.sample()
        after = {k: j.last_run for k, j in sampler.cadence.jobs.items()}
        slow_runs += any(before[k] != after[k] for k in before) and bool(sampler.slowed())
        cpu.append(snap.cpu_s)
        wall.append(snap.wall_s)
        rows = sum(len(p.rows) for p in snap.ports)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    steady = cpu[1:]
    return {
        "ports": len(snap.ports),
        "rows": rows,
        "first_ms": cpu[0] * 1000,
        "median_ms": statistics.median(steady) * 1000,
        "mean_ms": statistics.fmean(steady) * 1000,
        "max_ms": max(steady) * 1000,
        "max_wall_ms": max(wall[1:]) * 1000,
        "slowed": {k: round(v, 1) for k, v in sampler.slowed().items()},
        "last_costs_ms": {k: round(j.last_cost * 1000, 1) for k, j in sampler.cadence.jobs.items()},
        "held_interval": max(wall[1:]) <= interval,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refreshes", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--use-existing", metavar="NETNS", help="an already loaded `ip netns` namespace")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns, owner scan)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-top-"))
    tmp.chmod(0o711)
    ns = bench_ls.Namespace(
        args.use_existing or f"rebind-bench-top-{os.getpid()}", create=not args.use_existing
    )
    load = None
    started = datetime.datetime.now().astimezone()
    try:
        if not args.use_existing:
            load, _ = bench_ls.start_load(ns, [], tmp, 1200)
        ns.enter()
        sockets = bench_ls.socket_count()
        results = {
            "10 watched ports": drive(
                Sampler(WATCHED, interval=args.interval), args.refreshes, args.interval
            ),
            "--all": drive(
                Sampler((), all_ports=True, interval=args.interval), args.refreshes, args.interval
            ),
        }
    finally:
        if load is not None:
            ns.leave()
            bench_ls.stop_load(load)
        ns.delete()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(f"Code: commit {head.stdout.strip()}\n")
    print(
        f"Measured {started:%Y-%m-%d %H:%M %Z} on Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"`{' '.join([sys.executable, *sys.argv])}`; socket table {sockets}; "
        f"{args.refreshes} refreshes every {args.interval:g} s; watched: {', '.join(map(str, WATCHED))}\n"
    )
    print(
        "| view | ports | rows | first refresh CPU (ms) | median (ms) | mean (ms) | max (ms) | max wall (ms) | slowed jobs (period s) | last job costs (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['ports']} | {r['rows']} | {r['first_ms']:.1f} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} "
            f"| {r['max_ms']:.1f} | {r['max_wall_ms']:.1f} | {r['slowed'] or 'none'} | {r['last_costs_ms']} |"
        )
    print()
    w, a = results["10 watched ports"], results["--all"]
    print(
        f"- 10 watched ports: median refresh {w['median_ms']:.1f} ms CPU, mean {w['mean_ms']:.1f} ms "
        f"(target <= 50 ms): {'met' if w['mean_ms'] <= 50 else 'MISSED'}"
    )
    print(
        f"- --all: slowest refresh {a['max_wall_ms']:.0f} ms wall vs the {args.interval:g} s interval: "
        f"{'holds' if a['held_interval'] else 'does not hold (the status line says SLOWED DOWN)'}"
    )


if __name__ == "__main__":
    main()
