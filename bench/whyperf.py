"""`rebind why PORT` against `rebind ls PORT`, side by side in one run (issue 17 budget: ≤ 1.1×).

    sudo .venv/bin/python bench/whyperf.py [--runs 7]
    sudo .venv/bin/python bench/whyperf.py --use-existing NAME   # a netns already loaded with
                                                                 # mkload.py --reuseport 4

Builds bench/mkload.py's default layout plus a SO_REUSEPORT group (``--reuseport 4``: four
listeners on 0.0.0.0:8443) in a throwaway namespace (~211k sockets), enters it, and times, for

  8080  a plain listener owned by visible processes (201 share it);
  9000  ~11k server-side TIME_WAITs, no listener (made afresh just before: they expire in 60 s);
  8443  a SO_REUSEPORT group of four listeners;

`rebind ls PORT` and `rebind why PORT` alternately (pairs, so both see the same machine load:
this host has 2 cores shared with other jobs, so only the ratios of one run mean anything), wall
and CPU (user + system of the child, from wait4), best and median of --runs. Then, in-process,
what kernel/sockstates.iterator_plan decides for each port and what the BPF socket iterator costs
walked whole and stopped after the listening hash (read_socket_states(listeners_only=True)).

Then (``--connect-runs``, default 3) `rebind why --connect 127.0.0.2:10000` against
`rebind ls 10000` (issue 17 budget: ≤ 1.2×): 500 connections to that destination, ~100k in the
ephemeral range, all of which --connect accounts for.

Not a test: it asserts no time. It prints why's exit statuses (1, busy, for every port; 0 for
--connect).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

from ls import REBIND, Namespace, start_load, stop_load  # noqa: E402

from rebind.kernel.bpf.sockiter import read_socket_states  # noqa: E402
from rebind.kernel.facts import _read_flags  # noqa: E402
from rebind.kernel.sockstates import iterator_plan  # noqa: E402
from rebind.model.records import Proto  # noqa: E402
from rebind.model.request import BindRequest  # noqa: E402
from rebind.model.sockstate import Unavailable  # noqa: E402
from rebind.sockets import socket_table  # noqa: E402

PORTS = {8080: "plain listener", 9000: "TIME_WAITs", 8443: "SO_REUSEPORT group (4)"}
#: `why --connect DEST` against `ls PORT` of the destination (budget <= 1.2x): mkload's first
#: child holds 500 connections to 127.0.0.2:10000; the ephemeral range holds ~100k more.
CONNECT = {"127.0.0.2:10000": 10000}
TIMEWAITS = 11_000


def make_timewaits(port: int, n: int) -> None:
    """n server-side TIME_WAITs on 127.0.0.1:port (the server closes first), as mkload.py does."""
    srv = socket.create_server(("127.0.0.1", port), backlog=4096)
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = srv.accept()
        s.close()
        c.close()
    srv.close()


def run(argv: list[str]) -> tuple[float, float, int]:
    """(wall ms, cpu ms of the child, exit status)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    wall = (time.perf_counter() - t0) * 1e3
    return wall, (usage.ru_utime + usage.ru_stime) * 1e3, os.waitstatus_to_exitcode(status)


def pairs(
    port: int, runs: int, baseline: str | None, why: list[str] | None = None
) -> dict[str, list[tuple[float, float, int]]]:
    """``why``: the why arguments (default: the port itself)."""
    args = why or [str(port)]
    argvs = {"ls": [REBIND, "ls", str(port)], "why": [REBIND, "why", *args]}
    if baseline:
        argvs["base"] = [baseline, "why", *args]
    out: dict[str, list[tuple[float, float, int]]] = {key: [] for key in argvs}
    for argv in argvs.values():
        run(argv)  # warm-up
    for _ in range(runs):
        for key, argv in argvs.items():
            out[key].append(run(argv))
    return out


def cpu_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    got = []
    for _ in range(runs):
        c0 = time.process_time()
        fn()
        got.append((time.process_time() - c0) * 1e3)
    return min(got), statistics.median(got)


def scope_of(port: int) -> str:
    """What why decides for the port (the default request: TCP 0.0.0.0, listen)."""
    req = BindRequest(Proto.TCP, IPv4Address("0.0.0.0"), port)
    table = socket_table(ports=[port], protos=[Proto.TCP], owners=True)
    read = {i: _read_flags(e) for i, e in enumerate(table.entries) if e.owners}
    plan = iterator_plan(req, table.entries, read)
    how = [w for w, on in (("listening hash", plan.listeners), ("whole walk", plan.walk)) if on]
    how += [f"{len(plan.lookup)} lookups"] if plan.lookup else []
    return f"{' + '.join(how) or 'no BPF'} ({plan.why})"


def iterator_costs(port: int, runs: int) -> str:
    def whole() -> None:
        got = read_socket_states([port], [Proto.TCP])
        if isinstance(got, Unavailable):
            raise SystemExit(f"iterator unavailable: {got.reason}")

    def listeners() -> None:
        got = read_socket_states([port], [Proto.TCP], listeners_only=True)
        if isinstance(got, Unavailable):
            raise SystemExit(f"iterator unavailable: {got.reason}")

    wb, wm = cpu_ms(whole, runs)
    lb, lm = cpu_ms(listeners, runs)
    return f"whole walk {wb:.1f} (med {wm:.1f}) ms CPU; listening hash only {lb:.1f} (med {lm:.1f}) ms CPU"


def report(port: int, label: str, got: dict[str, list[tuple[float, float, int]]]) -> str:
    ls_w = min(w for w, _, _ in got["ls"])
    why_w = min(w for w, _, _ in got["why"])
    ls_c = min(c for _, c, _ in got["ls"])
    why_c = min(c for _, c, _ in got["why"])
    ls_wm = statistics.median(w for w, _, _ in got["ls"])
    why_wm = statistics.median(w for w, _, _ in got["why"])
    ls_cm = statistics.median(c for _, c, _ in got["ls"])
    why_cm = statistics.median(c for _, c, _ in got["why"])
    rcs = sorted({rc for _, _, rc in got["why"]})
    base = ""
    if "base" in got:
        bw, bc = min(w for w, _, _ in got["base"]), min(c for _, c, _ in got["base"])
        bwm = statistics.median(w for w, _, _ in got["base"])
        bcm = statistics.median(c for _, c, _ in got["base"])
        base = f" {bw / ls_w:.2f} (med {bwm / ls_wm:.2f}) | {bc / ls_c:.2f} (med {bcm / ls_cm:.2f}) |"
    # ratios of the bests, and (med ...) of the medians
    return (
        f"| {port} | {label} | {ls_w:.0f} (med {ls_wm:.0f}) | {why_w:.0f} (med {why_wm:.0f}) | "
        f"**{why_w / ls_w:.2f}** (med {why_wm / ls_wm:.2f}) | {ls_c:.0f} (med {ls_cm:.0f}) | "
        f"{why_c:.0f} (med {why_cm:.0f}) | **{why_c / ls_c:.2f}** (med {why_cm / ls_cm:.2f}) | {rcs} |{base}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--build-timeout", type=float, default=1200)
    ap.add_argument(
        "--connect-runs",
        type=int,
        default=3,
        metavar="N",
        help="rounds of `why --connect 127.0.0.2:10000` against `ls 10000` (0: skip; each reads the whole range)",
    )
    ap.add_argument(
        "--use-existing", metavar="NETNS", help="a namespace already loaded (mkload --reuseport 4)"
    )
    ap.add_argument("--connect-only", action="store_true", help="only the `why --connect` rows")
    ap.add_argument(
        "--baseline",
        metavar="REBIND",
        help="another rebind executable whose `why` is timed in the same rounds (e.g. the checkout before)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns, BPF)")
    # Byte-compile first: with PYTHONDONTWRITEBYTECODE (set in some shells) a module edited since
    # install is compiled again on every run, and only `why` imports the BPF socket modules.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "rebind")], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-whyperf-"))
    tmp.chmod(0o711)
    ns = Namespace(args.use_existing or f"rebind-bench-whyperf-{os.getpid()}", create=not args.use_existing)
    load = None
    try:
        built = 0.0
        if not args.use_existing:
            load, built = start_load(ns, ["--reuseport", "4"], tmp, args.build_timeout)
        ns.enter()
        out = subprocess.run(["ss", "-s"], capture_output=True, text=True).stdout
        total = next((line for line in out.splitlines() if line.startswith("TCP:")), "?")
        print(f"# {platform.release()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        print(f"# load built in {built:.0f}s; {total.strip()}; runs: best (and median) of {args.runs}")
        head = "| port | holders | ls wall ms | why wall ms | why/ls wall | ls CPU ms | why CPU ms | why/ls CPU | why rc |"
        rule = "|---|---|---|---|---|---|---|---|---|"
        if args.baseline:
            head += " baseline why/ls wall | baseline why/ls CPU |"
            rule += "---|---|"
        print(head)
        print(rule)
        rows, notes = [], []
        for port, label in PORTS.items() if not args.connect_only else ():
            if port == 9000:
                make_timewaits(port, TIMEWAITS)
                tws = sum(1 for e in socket_table(ports=[port], protos=[Proto.TCP], owners=False).entries)
                label = f"{tws} TIME_WAITs"
            got = pairs(port, args.runs, args.baseline)
            rows.append(report(port, label, got))
            print(rows[-1], flush=True)
            notes.append(f"# {port}: why reads {scope_of(port)}; {iterator_costs(port, args.runs)}")
        if args.connect_runs:
            for dest, port in CONNECT.items():
                got = pairs(port, args.connect_runs, args.baseline, ["--connect", dest])
                label = f"`why --connect {dest}` vs `ls {port}`"
                rows.append(report(port, label, got))
                print(rows[-1], flush=True)
        for note in notes:
            print(note)
    finally:
        if load is not None:
            stop_load(load)
        ns.delete()


if __name__ == "__main__":
    main()
