"""One process's scrapes for bench/exporter.py --compare: rebind imported from ``--src`` (main's
code or this checkout's), run in the namespace its parent entered. Prints one JSON object.

    python bench/scrape_child.py --src DIR --runs 10 [--rss 10,100] [--parts]

CPU is time.process_time() per scrape (the kernel's walks in our recvmsg/bpf() counted), one
warm-up scrape first (imports, the BPF programs' loading). ``--parts``: the scrape's pieces
timed separately (this checkout's Gatherer only: its methods are wrapped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rss", default="")
    ap.add_argument("--parts", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    from prometheus_client import generate_latest

    from rebind.exporter.collector import RebindCollector
    from rebind.exporter.facts import Dest, Watch
    from rebind.exporter.serve import registry_with

    watch = [Watch(p) for p in (8080, 8081, 9000, *range(10000, 10007))]
    dests = [Dest(IPv4Address(f"127.0.0.{2 + i}"), 10000 + i) for i in range(5)]
    parts: dict[str, list[float]] = {}
    if args.parts:
        _wrap_parts(parts)
    reg = registry_with(RebindCollector(watch, dests, interval=0.0), process=False)
    generate_latest(reg)
    parts.clear()
    cpu, wall = [], []
    body = b""
    for _ in range(args.runs):
        c0, w0 = time.process_time(), time.perf_counter()
        body = generate_latest(reg)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    out: dict[str, Any] = {
        "src": args.src,
        "cpu_ms": [c * 1000 for c in cpu],
        "cpu_ms_median": statistics.median(cpu) * 1000,
        "cpu_ms_best": min(cpu) * 1000,
        "wall_ms_median": statistics.median(wall) * 1000,
        "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        "body": body.decode(),
    }
    if parts:
        out["parts_ms_median"] = {k: statistics.median(v) * 1000 for k, v in parts.items()}
    marks = sorted({int(x) for x in args.rss.split(",") if x})
    if marks:
        rss: dict[str, int] = {}
        for i in range(1, marks[-1] + 1):
            generate_latest(reg)
            if i in marks:
                rss[str(i)] = _rss_kib()
        out["rss_kib"] = rss
    print(json.dumps(out))


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _timed(parts: dict[str, list[float]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*a: Any, **kw: Any) -> Any:
        c0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            parts.setdefault(name, []).append(time.process_time() - c0)

    return run


def _wrap_parts(parts: dict[str, list[float]]) -> None:
    """Time the Gatherer's pieces and the metric families (the text rendering: the rest)."""
    import rebind.exporter.collector as coll
    from rebind.exporter.gather import Gatherer

    for name in ("__call__", "_servers", "_bound_inactive", "_range_origins", "_connections", "_kernel",
                 "_remember", "_sources", "_client_reps", "_origins"):  # fmt: skip
        if hasattr(Gatherer, name):
            setattr(Gatherer, name, _timed(parts, name.strip("_") or "call", getattr(Gatherer, name)))
    coll.families = _timed(parts, "families", coll.families)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
