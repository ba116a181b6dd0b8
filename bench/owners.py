"""Benchmark the owner lookup for one port: the BPF fd-table program against the /proc scan.

    sudo .venv/bin/python bench/owners.py                       # every load, best of 5 (~5 min)
    sudo .venv/bin/python bench/owners.py --loads fds --procs 60 --fds 17000 --runs 3

Issue 9 asks whether the BPF owner lookup (src/rebind/kernel/bpf/) pays for itself. This times,
in one run and in-process, ``rebind.kernel.owners.find_owners()`` for the sockets of one port --
what `rebind ls PORT`, `why` and `free` pay for owners -- two ways:

  full    the ``bpf_iter_task`` program (fd tables read as arrays of file addresses, bpf_loop)
  proc    the /proc/PID/fd scan (REBIND_NO_BPF=1), as every non-root user gets it

(Up to commit fb0c92c a third variant, ``simple``, timed the ``bpf_iter_task_file`` program;
its numbers, in docs/benchmarks.md, are why that program was removed.)

on these loads, each built in a fresh named network namespace (`ip netns add`) that this script
then enters (setns) for the measurement:

  mkload  bench/mkload.py defaults: ~211k TCP sockets, 202 processes, the 8080
          listener shared by 201 of them (the load of docs/benchmarks.md "rebind ls");
  fds     --procs processes x --fds open files each (~1M fds; the per-process hard limit here
          is 20000), UDP sockets by default (--fd-kind devnull: separate opens of /dev/null),
          plus one more process, started last (highest pid), holding a listener on 8080:
          the fd-table program reads every file's inode before it meets the listener's;
  fds-first the same with the listener's process started first (lowest pid): the usual
          case of a long-running server, whose file address is learnt at once;
  idle    one process holding a listener on 8080, nothing else in the namespace;
  idle-busy-host  the same while the fds load runs in another namespace: a container host.
          The BPF programs visit every task on the machine, the /proc scan only the
          processes in the sockets' namespace.

Runs are interleaved (full, proc, full, ...) so that load from elsewhere on the machine
hits every variant alike; best and median of --runs are printed with the load average. Each
variant's owners are checked against the others (same pids and fds). Also printed: what
describing the holders (psutil) costs, paid alike by every variant. Loads are killed by their
process group (the group this script started) and namespaces deleted.
Not a test: it asserts no time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

from ls import Namespace, start_load, stop_load  # noqa: E402

from rebind.kernel import owners  # noqa: E402
from rebind.model.records import Owner, SocketRecord  # noqa: E402
from rebind.sockets import iter_records  # noqa: E402

PORT = 8080
PY = sys.executable
LOADS = "mkload, fds, fds-first, idle, idle-busy-host"

#: The fds load: each child raises its soft fd limit to the hard one, opens its share, says ready.
FDLOAD = r"""
import os, resource, socket, sys, time
procs, per, kind, where, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def hold():
    if kind == "socket":
        return [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(per)]
    return [os.open("/dev/null", os.O_RDONLY) for _ in range(per)]
def child(name, work):
    if os.fork() == 0:
        kept = work()
        open(ready + "." + name, "w").close()
        time.sleep(10**6)
        os._exit(0)
    while not os.path.exists(ready + "." + name):
        time.sleep(0.01)
listener = lambda: socket.create_server(("0.0.0.0", %(port)d))
# "first": the holder has the lowest pid, visited first by the task iterators; "last": the highest
if where == "first":
    child("listener", listener)
for i in range(procs):
    child(str(i), hold)
if where == "last":
    child("listener", listener)
open(ready, "w").close()
time.sleep(10**6)
""".replace("%(port)d", str(PORT))

#: The idle load: one process holding a listener on 8080, nothing else in the namespace.
IDLE = r"""
import os, socket, sys, time
lst = socket.create_server(("0.0.0.0", %(port)d))
open(sys.argv[1], "w").close()
time.sleep(10**6)
""".replace("%(port)d", str(PORT))


@dataclass(frozen=True)
class Timing:
    variant: str
    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


Found = dict[int, tuple[Owner, ...]]


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Make owners.find_owners() take the path called ``name``."""
    saved_env = os.environ.get("REBIND_NO_BPF")
    try:
        if name == "proc":
            os.environ["REBIND_NO_BPF"] = "1"
        else:
            os.environ.pop("REBIND_NO_BPF", None)
        yield
    finally:
        if saved_env is None:
            os.environ.pop("REBIND_NO_BPF", None)
        else:
            os.environ["REBIND_NO_BPF"] = saved_env


def lookup(records: list[SocketRecord], name: str) -> tuple[float, Found]:
    with variant(name):
        t0 = time.perf_counter()
        found, _report = owners.find_owners(records)
        elapsed = time.perf_counter() - t0
        if name != "proc" and owners.bpf_fallback_reason is not None:
            raise SystemExit(f"BPF did not run ({name}): {owners.bpf_fallback_reason}")
    return elapsed, found


def describe_cost(found: Found, runs: int) -> float:
    """Best time to describe the holders once (psutil): paid equally by every variant."""
    pids = sorted({o.pid for os_ in found.values() for o in os_})
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for pid in pids:
            owners.describe_process(pid)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(runs: int) -> dict[str, object]:
    records = list(iter_records(ports=[PORT])[0])
    if not any(r.inode for r in records):
        raise SystemExit(f"no socket with an inode on port {PORT}")
    variants = ("full", "proc")
    answers: dict[str, set[tuple[int, int, int]]] = {}
    for name in variants:  # warm-up (dentries, BTF layout, page cache) and the answers to compare
        _, found = lookup(records, name)
        answers[name] = {(ino, o.pid, o.fd) for ino, os_ in found.items() for o in os_}
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(runs):  # interleaved, so a burst of load elsewhere hits every variant alike
        for name in variants:
            samples[name].append(lookup(records, name)[0])
    return {
        "sockets": len(records),
        "holders": len({pid for _, pid, _ in answers["proc"]}),
        "same": answers["full"] == answers["proc"],
        "timings": [Timing(v, tuple(samples[v])) for v in variants],
        "describe": describe_cost(found, runs),
        "fds": total_fds(),
        "host_files": host_files(),
    }


def host_files() -> int:
    """Open files on the whole machine, every namespace (the first field of fs.file-nr)."""
    with open("/proc/sys/fs/file-nr") as f:
        return int(f.read().split()[0])


def total_fds() -> int:
    """Open fds of the processes in this network namespace (st_size of /proc/PID/fd, Linux 6.2)."""
    here = os.stat("/proc/thread-self/ns/net").st_ino
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/net").st_ino == here:
                    n += os.stat(f"/proc/{name}/fd").st_size
            except OSError:
                pass
    return n


def start_script(
    ns: Namespace, code: str, args: list[str], tmp: Path, timeout: float
) -> subprocess.Popen[bytes]:
    """Run ``code`` in the namespace, in a process group of its own; wait for its ready file."""
    script = tmp / f"load-{ns.name}.py"
    script.write_text(code)
    ready = tmp / f"ready-{ns.name}"
    argv = ["ip", "netns", "exec", ns.name, PY, str(script), *args, str(ready)]
    log = open(tmp / f"{ns.name}.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    while not ready.exists():
        if p.poll() is not None or time.monotonic() - t0 > timeout:
            stop_load(p)
            raise SystemExit(f"load failed: {(tmp / f'{ns.name}.log').read_text()[-2000:]}")
        time.sleep(0.5)
    print(f"# {ns.name} ready after {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return p


Builder = Callable[[Namespace, ExitStack], subprocess.Popen[bytes]]


def run_load(name: str, build: Builder, runs: int) -> dict[str, object]:
    with ExitStack() as cleanup:  # undone in reverse: leave, stop the loads, delete namespaces
        ns = Namespace(f"rebind-bo-{os.getpid()}-{name}", create=True)
        cleanup.callback(ns.delete)
        load = build(ns, cleanup)
        cleanup.callback(stop_load, load)
        ns.enter()
        cleanup.callback(ns.leave)
        info = measure(runs)
        info["load"] = name
        return info


def noisy_neighbour(args: argparse.Namespace, tmp: Path, cleanup: ExitStack) -> None:
    """The fds load in a namespace of its own, for the busy-host case; undone by ``cleanup``."""
    ns = Namespace(f"rebind-bo-{os.getpid()}-neighbour", create=True)
    cleanup.callback(ns.delete)
    load = start_script(
        ns, FDLOAD, [str(args.procs), str(args.fds), args.fd_kind, "last"], tmp, args.build_timeout
    )
    cleanup.callback(stop_load, load)


def report(results: list[dict[str, object]], started: datetime.datetime, started_load: float) -> None:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--short", "src"], capture_output=True, text=True
    ).stdout.split()
    print(f"Code: commit {head.stdout.strip()}, uncommitted changes in: {' '.join(dirty[1::2]) or 'none'}\n")
    argv = " ".join([sys.executable, *sys.argv])
    print(
        f"Measured {started:%Y-%m-%d %H:%M %Z} on Linux {platform.release()}, {os.cpu_count()} CPUs, `{argv}`\n"
    )
    print(f"Load average (1 min) at the start: {started_load:.2f}, at the end: {os.getloadavg()[0]:.2f}\n")
    print("| load | variant | best (s) | median (s) | all runs (s) | × full | proc ÷ this |")
    print("|---|---|---:|---:|---|---:|---:|")
    for info in results:
        rows: list[Timing] = info["timings"]  # type: ignore[assignment]
        by = {t.variant: t for t in rows}
        for t in rows:
            all_runs = " ".join(f"{x:.3f}" for x in t.runs)
            print(
                f"| {info['load']} | {t.variant} | {t.best:.3f} | {t.median:.3f} | {all_runs} "
                f"| {t.best / by['full'].best:.2f} | {by['proc'].best / t.best:.2f} |"
            )
    print()
    for info in results:
        print(
            f"- {info['load']}: {info['sockets']} socket(s) on {PORT}, {info['holders']} holder process(es), "
            f"{info['fds']} open fds in the namespace, {info['host_files']} open files on the host; same owners from both: {info['same']}; "
            f"describing the holders (psutil, in every variant): {info['describe']:.3f} s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="best of N (default 5)")
    ap.add_argument(
        "--loads", default="mkload,fds,fds-first,idle,idle-busy-host", help="comma list of: " + LOADS
    )
    ap.add_argument("--procs", type=int, default=60, help="fds load: processes (default 60)")
    ap.add_argument("--fds", type=int, default=17000, help="fds load: open files each (default 17000)")
    ap.add_argument("--fd-kind", choices=("socket", "devnull"), default="socket")
    ap.add_argument("--build-timeout", type=float, default=1200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns, BPF)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-owners-"))
    tmp.chmod(0o711)
    started = datetime.datetime.now().astimezone()
    started_load = os.getloadavg()[0]

    def fds(where: str) -> Builder:
        def build(ns: Namespace, cleanup: ExitStack) -> subprocess.Popen[bytes]:
            fd_args = [str(args.procs), str(args.fds), args.fd_kind, where]
            return start_script(ns, FDLOAD, fd_args, tmp, args.build_timeout)

        return build

    def idle(ns: Namespace, cleanup: ExitStack) -> subprocess.Popen[bytes]:
        return start_script(ns, IDLE, [], tmp, args.build_timeout)

    def idle_busy_host(ns: Namespace, cleanup: ExitStack) -> subprocess.Popen[bytes]:
        noisy_neighbour(args, tmp, cleanup)
        return idle(ns, cleanup)

    builders: dict[str, Builder] = {
        "mkload": lambda ns, cleanup: start_load(ns, [], tmp, args.build_timeout)[0],
        "fds": fds("last"),
        "fds-first": fds("first"),
        "idle": idle,
        "idle-busy-host": idle_busy_host,
    }
    results = []
    try:
        for name in [x for x in args.loads.split(",") if x]:
            results.append(run_load(name, builders[name], args.runs))
            print(f"# {name}: done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, started, started_load)


if __name__ == "__main__":
    main()
