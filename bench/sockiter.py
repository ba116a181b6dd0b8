"""The BPF socket iterator vs the inet_diag dump, for one port on bench/mkload.py's table.

    sudo .venv/bin/python bench/sockiter.py [--runs 7]

Builds the load (bench/mkload.py: ~200k established sockets, ~11-20k TIME_WAIT on 9000, a
listener on 8080) in a throwaway namespace, enters it, and times, best and median of --runs:

  diag   rebind.sockets.socket_table(ports=[P], owners=False): the inet_diag dump with the
         kernel-side port filter (bytecode), decoded -- what `ls P` / `why P` read first;
  iter   rebind.kernel.bpf.sockiter.read_socket_states([P], [tcp]): the iterator walks every
         TCP socket of the namespace in the kernel and copies the port's (layout already read);
  first  the same, first call in a fresh process (BTF layout read included);
  count  count_socket_states(ports): the exporter's question (sockets per port and state),
         counted in the kernel, vs counting the diag dump's records in Python.

CPU is time.process_time() (user + system of this process: the iterator's work runs in the
read() syscall, so it is counted). Ports: 8080 (one listener), 9000 (the TIME_WAITs), 10000
(established). Not a test: it asserts no time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

from ls import Namespace, start_load, stop_load  # noqa: E402

from rebind.kernel.bpf.sockiter import count_socket_states, read_socket_states  # noqa: E402
from rebind.model.records import Proto, State  # noqa: E402
from rebind.model.sockstate import Unavailable  # noqa: E402
from rebind.sockets import socket_table  # noqa: E402

PORTS = (8080, 9000, 10000)


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, float, float, object]:
    """(best wall, median wall, best cpu, median cpu) in ms, and the last result."""
    walls, cpus = [], []
    out: object = None
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append((time.perf_counter() - w0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    return min(walls), statistics.median(walls), min(cpus), statistics.median(cpus), out


def diag(port: int) -> int:
    return len(socket_table(ports=[port], protos=[Proto.TCP], owners=False).entries)


def iterate(port: int) -> int:
    got = read_socket_states([port], [Proto.TCP])
    if isinstance(got, Unavailable):
        raise SystemExit(f"iterator unavailable: {got.reason}")
    return len(got.sockets)


def count_kernel() -> dict[tuple[int, State], int]:
    got = count_socket_states(PORTS, [Proto.TCP])
    if isinstance(got, Unavailable):
        raise SystemExit(f"iterator unavailable: {got.reason}")
    return {(port, state): n for _, port, state, n in got.counts}


def count_diag() -> dict[tuple[int, State], int]:
    out: dict[tuple[int, State], int] = {}
    for e in socket_table(ports=list(PORTS), protos=[Proto.TCP], owners=False).entries:
        key = (e.socket.local.port, e.socket.state)
        out[key] = out.get(key, 0) + 1
    return out


def first_call_ms(port: int) -> float:
    """A fresh process that reads the BTF layout (as on the first run after a boot; later runs
    read the per-boot cache in /run)."""
    code = (
        f"import sys,time; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        "from rebind.kernel.bpf import sockiter\n"
        "from rebind.model.records import Proto\n"
        "t=time.perf_counter(); sockiter.load_sock_layout(use_cache=False)\n"
        f"sockiter.read_socket_states([{port}],[Proto.TCP]); print((time.perf_counter()-t)*1e3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--build-timeout", type=float, default=1200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns, BPF)")
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-sockiter-"))
    tmp.chmod(0o711)
    ns = Namespace(f"rebind-bench-sockiter-{os.getpid()}", create=True)
    load = None
    try:
        load, built = start_load(ns, [], tmp, args.build_timeout)
        ns.enter()
        print(f"# {platform.release()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        print(f"# load built in {built:.0f}s; runs: best and median of {args.runs}")
        print("| port | sockets | diag wall ms | iter wall ms | iter/diag | diag cpu ms | iter cpu ms |")
        print("|---|---|---|---|---|---|---|")
        for port in PORTS:
            dw, dm, dc, dcm, n_diag = timed(lambda p=port: diag(p), args.runs)
            iw, im, ic, icm, n_iter = timed(lambda p=port: iterate(p), args.runs)
            assert n_diag == n_iter, (port, n_diag, n_iter)
            print(
                f"| {port} | {n_diag} | {dw:.1f} (med {dm:.1f}) | {iw:.1f} (med {im:.1f}) | "
                f"{iw / dw:.2f} | {dc:.1f} (med {dcm:.1f}) | {ic:.1f} (med {icm:.1f}) |"
            )
        print(f"# first call in a fresh process (BTF layout read): {first_call_ms(9000):.1f} ms wall")
        kw, km, kc, kcm, by_kernel = timed(count_kernel, args.runs)
        pw, pm, pc, pcm, by_diag = timed(count_diag, args.runs)
        assert by_kernel == by_diag, (by_kernel, by_diag)
        print(f"# count per (port, state) for ports {PORTS}: {len(by_kernel)} series, same numbers both ways")
        print(f"#   in-kernel count: wall {kw:.1f} ms (med {km:.1f}), cpu {kc:.1f} ms (med {kcm:.1f})")
        print(
            f"#   diag dump + Python count: wall {pw:.1f} ms (med {pm:.1f}), cpu {pc:.1f} ms (med {pcm:.1f})"
        )
        print(f"#   ratio kernel/diag cpu: {kc / pc:.2f}")
    finally:
        if load is not None:
            stop_load(load)
        ns.delete()


if __name__ == "__main__":
    main()
