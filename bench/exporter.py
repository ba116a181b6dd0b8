"""Benchmark one `rebind exporter` scrape on a large socket table (issue 12). Not a test.

    sudo .venv/bin/python bench/exporter.py                     # ~1 min
    sudo .venv/bin/python bench/exporter.py --runs 50 --rss-scrapes 1000 --json /tmp/exporter.json

Builds /work/shared/bench/mkload.py's load (211k TCP sockets) in a fresh named network namespace
with bench/ls.py's helpers, enters it (setns), and scrapes in-process through the real
collector and prometheus-client's text rendering -- what one HTTP scrape costs the exporter,
without the HTTP client's CPU. CPU is time.process_time() (user + system: the kernel's
inet_diag walk runs in our recvmsg() and is counted). Watched: 10 ports (8080, 8081, 9000 with
~11k TIME_WAIT, 10000-10006 with 500 connections each); 5 destinations (127.0.0.(2+i):(10000+i),
500 connections each). Then: the same scrape in an idle namespace, and RSS over many scrapes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from ls import Namespace, socket_count, start_load, stop_load  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from rebind.exporter.collector import RebindCollector  # noqa: E402
from rebind.exporter.facts import Dest, Watch  # noqa: E402
from rebind.exporter.serve import registry_with  # noqa: E402

WATCH = [Watch(p) for p in (8080, 8081, 9000, *range(10000, 10007))]
DESTS = [Dest(IPv4Address(f"127.0.0.{2 + i}"), 10000 + i) for i in range(5)]


def scrape_costs(runs: int) -> dict[str, object]:
    reg = registry_with(RebindCollector(WATCH, DESTS, interval=0.0), process=False)
    generate_latest(reg)  # warm: imports, first-use allocations
    cpu, wall = [], []
    body = b""
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        body = generate_latest(reg)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "runs": runs,
        "cpu_ms_median": statistics.median(cpu) * 1000,
        "cpu_ms_best": min(cpu) * 1000,
        "cpu_ms_max": max(cpu) * 1000,
        "wall_ms_median": statistics.median(wall) * 1000,
        "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        "bytes": len(body),
    }


def _cpu_ms(fn: object, runs: int) -> dict[str, float]:
    assert callable(fn)
    fn()  # warm: imports, the BPF layout, first-use allocations
    cpu = []
    for _ in range(runs):
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
    return {"cpu_ms_median": statistics.median(cpu) * 1000, "cpu_ms_best": min(cpu) * 1000}


def side_by_side(runs: int) -> dict[str, dict[str, float]]:
    """Issue 17: one scrape's facts (exporter.gather.Gatherer, no rendering) with the kernel
    state read as `why` reads it (iterator_plan + read_kernel_ports), without it (before), and
    the count mode of the BPF socket iterator (count_socket_states: sockets per port and state
    counted in the kernel) for the same watched ports, which the scrape's counts would need."""
    from rebind.exporter.gather import Gatherer
    from rebind.kernel.bpf.sockiter import count_socket_states
    from rebind.model.records import Proto

    with_kernel = Gatherer(WATCH, DESTS)
    without = Gatherer(WATCH, DESTS, read_kernel=False)
    ports = sorted({w.port for w in WATCH})
    return {
        "gather_with_kernel_state": _cpu_ms(with_kernel, runs),
        "gather_without_kernel_state": _cpu_ms(without, runs),
        "count_socket_states": _cpu_ms(lambda: count_socket_states(ports, [Proto.TCP]), runs),
    }


def walk_floor(runs: int) -> dict[str, float]:
    """The kernel's share: CPU of one connection-table walk that matches nothing (what any
    inet_diag reader pays for a filtered dump of this table), and of the bound-inactive walk."""
    from rebind.exporter import bytecode as bc
    from rebind.exporter import fastdiag
    from rebind.kernel import diag_codec as codec
    from rebind.kernel.diag import DiagSocket, states_mask
    from rebind.model.records import Proto, State

    conn = frozenset(State) - {State.LISTEN, State.BOUND_INACTIVE}
    nothing = bc.any_of([[bc.sport_eq(1)]])
    out: dict[str, float] = {}
    with DiagSocket() as sock:
        req = codec.dump_request_tcp_any_family(states_mask(conn), bytecode=nothing)
        cpu = []
        for _ in range(runs):
            c0 = time.process_time()
            for _ in fastdiag.dump(sock, req):
                pass
            cpu.append(time.process_time() - c0)
        out["conn_walk_ms_median"] = statistics.median(cpu) * 1000
        cpu = []
        for _ in range(max(3, runs // 5)):
            c0 = time.process_time()
            list(sock.dump(None, Proto.TCP, [State.BOUND_INACTIVE], bytecode=nothing))
            cpu.append(time.process_time() - c0)
        out["bound_inactive_walk_ms_median"] = statistics.median(cpu) * 1000
    return out


def host_tcp_sockets() -> str:
    """/proc/net/sockstat's TCP line: `inuse` is this namespace's, `alloc` the whole host's. The
    kernel's TCP hash tables are host-wide, so every namespace's dump walks every socket of the
    host: other namespaces' loads (other benchmarks on a shared machine) slow an "idle" scrape."""
    with open("/proc/net/sockstat") as f:
        return next((line.strip() for line in f if line.startswith("TCP:")), "")


def ss_reference(runs: int) -> dict[str, float]:
    """`ss -tan` with the same filter (watched ports or destinations): CPU of the child
    (user + system from wait4), the reference cost of asking the kernel this question."""
    ports = " or ".join(f"sport = :{w.port}" for w in WATCH)
    dests = " or ".join(f"dst {d.addr}:{d.port}" for d in DESTS)
    argv = ["ss", "-tanH", f"( {ports} or {dests} )"]
    cpu = []
    for _ in range(runs):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, _, ru = os.wait4(p.pid, 0)
        cpu.append(ru.ru_utime + ru.ru_stime)
    return {"cpu_ms_median": statistics.median(cpu) * 1000, "argv": " ".join(argv)}  # type: ignore[dict-item]


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def rss_over(scrapes: int) -> dict[str, int]:
    reg = registry_with(RebindCollector(WATCH, DESTS, interval=0.0), process=False)
    marks = sorted({10, 100, scrapes // 2, scrapes})
    out: dict[str, int] = {}
    for i in range(1, scrapes + 1):
        generate_latest(reg)
        if i in marks:
            out[str(i)] = rss_kib()
    return out


def idle_phase(runs: int, base_src: str = "", rounds: int = 0) -> dict[str, object]:
    """A fresh namespace with one listener on 8080: the same flags, nothing to find."""
    out: dict[str, object] = {}
    idle = Namespace(f"rebind-bench-{os.getpid()}-idle", create=True)
    try:
        idle.enter()
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket,time; s=socket.create_server(('0.0.0.0',8080)); print(1,flush=True); time.sleep(3600)",
            ],
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None
        holder.stdout.readline()
        try:
            out["idle_sockstat"] = host_tcp_sockets()
            if base_src:
                out["idle"] = compare(base_src, rounds, runs, "")
                return out
            out["idle"] = scrape_costs(runs)
            out["idle_floor"] = walk_floor(runs)
            out["idle_ss"] = ss_reference(runs)
        finally:
            holder.kill()
            holder.wait()
    finally:
        idle.delete()
    return out


def compare(base_src: str, rounds: int, runs: int, rss: str) -> dict[str, object]:
    """Before/after in one run, on the table this process's namespace holds: scrapes by child
    processes (bench/scrape_child.py) importing rebind from ``base_src`` (a copy of main's src)
    or this checkout's, alternately (which goes first alternates too), ``runs`` scrapes each
    per round; then RSS over scrapes and (this checkout) the scrape's parts."""
    child = [sys.executable, str(ROOT / "bench" / "scrape_child.py")]
    srcs = {"before": base_src, "after": str(ROOT / "src")}
    cpu: dict[str, list[float]] = {k: [] for k in srcs}
    bodies: dict[str, str] = {}
    for i in range(rounds):
        for label in sorted(srcs, reverse=bool(i % 2)):
            got = _child([*child, "--src", srcs[label], "--runs", str(runs)])
            cpu[label] += got["cpu_ms"]
            bodies[label] = got["body"]
    out: dict[str, object] = {
        k: {"cpu_ms_median": statistics.median(v), "cpu_ms_best": min(v), "n": len(v)} for k, v in cpu.items()
    }
    out["same_series"] = _series(bodies["before"]) == _series(bodies["after"])
    if not out["same_series"]:
        out["series_diff"] = sorted(_series(bodies["before"]) ^ _series(bodies["after"]))[:40]
    out["sockstat_after_rounds"] = host_tcp_sockets()
    out["parts_after"] = _child([*child, "--src", srcs["after"], "--runs", str(runs), "--parts"])[
        "parts_ms_median"
    ]
    if rss:
        for label, src in srcs.items():
            out[f"rss_{label}"] = _child([*child, "--src", src, "--runs", "1", "--rss", rss])["rss_kib"]
    return out


def _child(argv: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    got = json.loads(res.stdout)
    assert isinstance(got, dict)
    return got


def _series(body: str) -> frozenset[str]:
    """The samples of a scrape but the duration and the TIME_WAITs' time left (their values
    differ with the moment of the scrape)."""
    skip = ("#", "rebind_scrape_duration", "rebind_port_frees_in_seconds")
    return frozenset(line for line in body.splitlines() if line and not line.startswith(skip))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rss-scrapes", type=int, default=1000)
    ap.add_argument("--build-timeout", type=float, default=1200)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="big table only: the scrape's facts with/without the kernel state, and the in-kernel count",
    )
    ap.add_argument(
        "--idle-only",
        action="store_true",
        help="only the idle namespace (the host's TCP hash is shared: run it when no other load exists)",
    )
    ap.add_argument(
        "--compare",
        metavar="BASE_SRC",
        help="before/after in one run: scrapes by child processes importing rebind from BASE_SRC "
        "(a copy of main's src) and from this checkout, alternately (--rounds rounds of --runs)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-exporter-"))
    tmp.chmod(0o711)
    started = datetime.datetime.now().astimezone()
    result: dict[str, object] = {}
    if args.idle_only:
        result["idle_sockstat"] = host_tcp_sockets()
        result.update(idle_phase(args.runs))
        print(
            f"`{sys.executable} bench/exporter.py --idle-only --runs {args.runs}`; {result['idle_sockstat']}"
        )
        idle, fl, ss = result["idle"], result["idle_floor"], result["idle_ss"]
        assert isinstance(idle, dict) and isinstance(fl, dict) and isinstance(ss, dict)
        print(
            f"idle scrape CPU median {idle['cpu_ms_median']:.2f} ms (best {idle['cpu_ms_best']:.2f}, max "
            f"{idle['cpu_ms_max']:.2f}); empty walk {fl['conn_walk_ms_median']:.2f} ms; "
            f"ss {ss['cpu_ms_median']:.2f} ms; target ≤ 5: {'met' if idle['cpu_ms_median'] <= 5 else 'MISSED'}"
        )
        return
    ns = Namespace(f"rebind-bench-{os.getpid()}-exporter", create=True)
    load = None
    try:
        load, built = start_load(ns, [], tmp, args.build_timeout)
        ns.enter()
        result["sockets"] = socket_count()
        result["build_s"] = built
        result["big_sockstat"] = host_tcp_sockets()
        if args.compare:
            print(f"Socket table: {result['sockets']}; `{result['big_sockstat']}`", flush=True)
            result["compare"] = compare(args.compare, args.rounds, args.runs, "10,100")
            result["compare_floor"] = walk_floor(args.runs)
            result["compare_sockstat_end"] = host_tcp_sockets()
            keys = ("compare", "compare_floor", "compare_sockstat_end")
            print(json.dumps({k: result[k] for k in keys}, indent=1), flush=True)
        elif args.side_by_side:
            print(f"Socket table: {result['sockets']}; `{result['big_sockstat']}`")
            print("| measured (CPU, process_time) | median ms | best ms |\n|---|---:|---:|")
            for name, d in side_by_side(args.runs).items():
                print(f"| {name} | {d['cpu_ms_median']:.1f} | {d['cpu_ms_best']:.1f} |")
            return
        else:
            result["big"] = scrape_costs(args.runs)
            result["floor"] = walk_floor(args.runs)
            result["ss"] = ss_reference(args.runs)
            print("# big table: done", file=sys.stderr, flush=True)
            result["rss_kib"] = rss_over(args.rss_scrapes)
    finally:
        ns.leave()
        if load is not None:
            stop_load(load)
        ns.delete()
    if args.compare:
        result["idle_compare"] = idle_phase(args.runs, args.compare, args.rounds)
        print(json.dumps(result["idle_compare"], indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    result.update(idle_phase(args.runs))
    report(result, args, started)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def report(r: dict[str, object], args: argparse.Namespace, started: datetime.datetime) -> None:
    big, idle, rss = r["big"], r["idle"], r["rss_kib"]
    assert isinstance(big, dict) and isinstance(idle, dict) and isinstance(rss, dict)
    print(
        f"Measured {started:%Y-%m-%d %H:%M %Z} on Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"`{sys.executable} bench/exporter.py --runs {args.runs} --rss-scrapes {args.rss_scrapes}`\n"
    )
    print(f"Socket table: {r['sockets']}; load built in {r['build_s']:.0f} s.\n")
    print(f"/proc/net/sockstat during the big run: `{r['big_sockstat']}`; idle run: `{r['idle_sockstat']}`\n")
    print("| scrape | CPU median (ms) | CPU best | CPU max | wall median (ms) | series | bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, d in (("211k sockets, 10 ports, 5 dests", big), ("idle netns, same flags", idle)):
        print(
            f"| {name} | {d['cpu_ms_median']:.1f} | {d['cpu_ms_best']:.1f} | {d['cpu_ms_max']:.1f} | "
            f"{d['wall_ms_median']:.1f} | {d['series']} | {d['bytes']} |"
        )
    print()
    fl, ifl = r["floor"], r["idle_floor"]
    assert isinstance(fl, dict) and isinstance(ifl, dict)
    print(
        f"Kernel floor (a dump matching nothing, CPU median): connection-table walk "
        f"{fl['conn_walk_ms_median']:.1f} ms big / {ifl['conn_walk_ms_median']:.2f} ms idle; "
        f"bound-inactive (bhash2) walk {fl['bound_inactive_walk_ms_median']:.1f} ms big / "
        f"{ifl['bound_inactive_walk_ms_median']:.2f} ms idle (the exporter repeats that walk every "
        f"scrape only while it costs < 5 ms, else once a minute).\n"
    )
    ss, iss = r["ss"], r["idle_ss"]
    assert isinstance(ss, dict) and isinstance(iss, dict)
    print(
        f"Reference: `{ss['argv']}` (the same question, as a process) costs {ss['cpu_ms_median']:.1f} ms "
        f"of CPU on the big table, {iss['cpu_ms_median']:.1f} ms idle (median, wait4 user + system).\n"
    )
    try:
        print(f"Load average during the run: {os.getloadavg()}\n")
    except OSError:
        pass
    print("RSS (KiB) after N scrapes on the big table: " + ", ".join(f"{k}: {v}" for k, v in rss.items()))
    print()
    print(
        f"- big scrape CPU {big['cpu_ms_median']:.1f} ms (target ≤ 50): "
        f"{'met' if big['cpu_ms_median'] <= 50 else 'MISSED'}"
    )
    print(
        f"- idle scrape CPU {idle['cpu_ms_median']:.2f} ms (target ≤ 5): "
        f"{'met' if idle['cpu_ms_median'] <= 5 else 'MISSED'}"
    )
    vals = list(rss.values())
    grew = vals[-1] - vals[1] if len(vals) > 1 else 0
    print(f"- RSS from scrape 100 to {list(rss)[-1]}: {grew:+d} KiB (target: flat)")


if __name__ == "__main__":
    main()
