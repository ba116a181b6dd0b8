"""Benchmark `rebind trace`: what it costs everyone else, and how soon a failure is printed.

    sudo .venv/bin/python bench/trace.py                    # 3 rounds of 20,000 connects, 50 failures
    sudo .venv/bin/python bench/trace.py --connects 50000 --rounds 5 --failures 200
    sudo .venv/bin/python bench/trace.py --only misses,births --big   # and the big table
    sudo PYTHONPATH=$PWD/src .venv/bin/python bench/trace.py --only latency,big --failures 30 \
        --base-src /path/to/baseline/src     # event -> line, this tree then a baseline's

1. Overhead: a loop of successful TCP connect()s on loopback (connect, accept, close with
   SO_LINGER 0 so no TIME_WAIT piles up), in a private network namespace, timed with no trace
   running and with `rebind trace` running (system-wide; it sees no failure from the loop).
   Rounds are interleaved (off, on, off, ...); best and median per second are printed, and
   the ratio of the medians. The trace program runs at every syscall's exit on the machine,
   so this loop (5 syscalls per connection) pays it five times per connection.
   ``--only overhead-c``: the same at the issue's rate, with bench/connect_loop.c (compiled
   here) running one loop per core, ~220k connections/s in all on this machine;
   ``--only overhead-null``: the same with an empty program on sys_exit instead of the tracer
   (what the attach point alone costs).
2. Event to line: one failing bind() (EADDRINUSE, a listener on the port) at a time -- and one
   failing connect() (EADDRNOTAVAIL: a 64-port range, every port connected to the
   destination); the time
   from the call's return to the moment its line (with the blocker snapshot) is read from
   `rebind trace --json`'s stdout, with the owner scan and without (--no-owners); also the
   snapshot's own ``after_ms``. In an idle namespace, and with ``--big`` in one holding
   bench/mkload.py's table (built in a named namespace as bench/ls.py does; ``--mkload`` passes
   it smaller sizes where the fd limit does not allow its defaults).
3. Missed events: --misses failing binds in a tight loop, `rebind trace --count N` must print
   a line for each (and its summary says how many the ring dropped).
4. Birth certificates: a loop of bind(127.0.0.1:0)s, the connect loop of 1. (the sock_ops
   program runs at every TCP callback, the connect hook at each connect()), a loop of UDP
   socket + sendto + close (the create hook, an autobind, the send hook) and one of sendto()s
   on a bound socket (the send hook alone), with and without `rebind trace --install` (pinned
   in a private BPF filesystem, removed after each round).

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


#: ``--base-src``: the source tree of the baseline rebind, run side by side (latency only)
BASE_SRC: str | None = None


def start_trace(netns: int, *extra: str, src: str | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "rebind", "trace", "--json", "--netns", str(netns), *extra]
    env = dict(os.environ, PYTHONPATH=src) if src else None
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)
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


def c_loops(n: int, base_port: int, binary: str) -> float:
    """Connections/s of all cores together: one bench/connect_loop.c per core, each its own
    port (a SO_REUSEPORT group would hand one loop's connection to another's accept())."""
    cores = os.cpu_count() or 1
    procs = [
        subprocess.Popen([binary, str(n), str(base_port + i)], stdout=subprocess.PIPE) for i in range(cores)
    ]
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"connect_loop failed ({p.returncode})")
        rates.append(float(out))
    return sum(rates)


#: An empty program (r0 = 0; exit) on the same attach point as `rebind trace`'s (the sys_exit
#: raw tracepoint), held until SIGTERM: what attaching there costs every syscall before any
#: instruction of ours runs (the syscall slow path the tracepoint turns on for every task).
NULL_PROGRAM = """
import signal, sys
sys.path.insert(0, {src!r})
from rebind.kernel.bpf import asm
from rebind.kernel.bpf.syscall import RAW_TRACEPOINT, load_program
from rebind.kernel.trace import _attach
p = asm.Program(); p.mov_imm(asm.R0, 0); p.exit()
link = _attach(load_program(p.assemble(), prog=RAW_TRACEPOINT))
print("ready", flush=True)
signal.sigwait([signal.SIGTERM])
"""


def start_null() -> subprocess.Popen[bytes]:
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    p = subprocess.Popen([sys.executable, "-c", NULL_PROGRAM.format(src=src)], stdout=subprocess.PIPE)
    assert p.stdout is not None
    if p.stdout.readline().strip() != b"ready":
        raise SystemExit("the empty program could not be attached")
    return p


def overhead_c(netns: int, n: int, rounds: int, *, null: bool = False) -> None:
    """overhead() at the issue's rate: bench/connect_loop.c, compiled here with the system's cc,
    one per core (2 x ~110k connections/s on this machine). ``null``: the empty program of
    :data:`NULL_PROGRAM` instead of `rebind trace` (the attach point's own cost)."""
    import shutil
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("overhead-c: no C compiler here, skipped")
        return
    tmp = tempfile.mkdtemp(prefix="rebind-connect-loop-")
    binary = os.path.join(tmp, "connect_loop")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "connect_loop.c")
    subprocess.run([cc, "-O2", "-o", binary, src], check=True)
    off: list[float] = []
    on: list[float] = []
    port = 21000
    try:
        for _ in range(rounds):
            port += 16
            off.append(c_loops(n, port, binary))
            p = start_null() if null else start_trace(netns)
            try:
                port += 16
                on.append(c_loops(n, port, binary))
            finally:
                stop(p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = statistics.median(on) / statistics.median(off)
    cores = os.cpu_count() or 1
    what = "an empty sys_exit program" if null else "trace"
    print(f"C connect loops, {cores} x {n} connections x {rounds} rounds (connections/s, all loops):")
    print(f"  without: best {max(off):,.0f}  median {statistics.median(off):,.0f}")
    print(f"  with {what}: best {max(on):,.0f}  median {statistics.median(on):,.0f}")
    print(f"  ratio of medians (with/without): {ratio:.3f}  -> overhead {100 * (1 - ratio):.1f}%")


def latency(netns: int, failures: int, *extra: str, call: str = "bind") -> None:
    """Event -> line with this checkout, then (``--base-src``) with the baseline, one after the
    other on the same state. ``call``: failing binds (a listener holds the port) or failing
    connects (a 64-port range, every port connected to the destination by this process)."""
    latency_of(netns, failures, None, *extra, call=call)
    if BASE_SRC:
        latency_of(netns, failures, BASE_SRC, *extra, call=call)


#: The failing connects' range (outside bench/mkload.py's, which keeps the default) and port.
CONNECT_RANGE, CONNECT_PORT = (61000, 61063), 30002
RANGE_SYSCTL = "/proc/sys/net/ipv4/ip_local_port_range"


def _fail_once(call: str) -> float:
    """One failing call; CLOCK_MONOTONIC right after it failed."""
    s = socket.socket()
    try:
        if call == "bind":
            s.bind(("127.0.0.1", 30000))
        else:
            s.connect(("127.0.0.1", CONNECT_PORT))
    except OSError:
        return time.monotonic()
    finally:
        s.close()
    raise SystemExit(f"the {call} did not fail")


def latency_of(netns: int, failures: int, src: str | None, *extra: str, call: str = "bind") -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 30000 if call == "bind" else CONNECT_PORT))
    lst.listen(128)
    held: list[socket.socket] = []
    with open(RANGE_SYSCTL) as f:
        old_range = f.read()
    if call == "connect":
        with open(RANGE_SYSCTL, "w") as f:
            f.write(f"{CONNECT_RANGE[0]} {CONNECT_RANGE[1]}")
        for _ in range(CONNECT_RANGE[1] - CONNECT_RANGE[0] + 1):
            held.append(socket.create_connection(("127.0.0.1", CONNECT_PORT)))
    p = start_trace(netns, *extra, src=src)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    lat: list[float] = []
    after: list[float] = []
    try:
        buf = b""
        for _ in range(failures):
            t_fail = _fail_once(call)
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
        for h in held:
            h.close()
        lst.close()
        with open(RANGE_SYSCTL, "w") as f:
            f.write(old_range)
    what = " ".join(extra) or "(owners on)"
    which = f" [baseline {src}]" if src else ""
    print(f"event -> line, {failures} failing {call}s, {what}{which}:")
    print(f"  line read after:    median {statistics.median(lat):.1f} ms  max {max(lat):.1f} ms")
    if after:
        print(f"  snapshot after_ms:  median {statistics.median(after):.1f} ms  max {max(after):.1f} ms")


def misses(netns: int, n: int) -> None:
    """n failing binds in a tight loop by one process; `rebind trace --count n` must print n lines."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 30001))
    lst.listen()
    p = start_trace(netns, "--count", str(n))
    assert p.stdout is not None and p.stderr is not None
    t0 = time.monotonic()
    failed = 0
    for _ in range(n):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 30001))
            except OSError:
                failed += 1
    loop_s = time.monotonic() - t0
    out, err = p.communicate(timeout=600)
    lst.close()
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    mine = sum(1 for d in lines if d["port"] == 30001 and d["errno"] == "EADDRINUSE")
    summary = err.decode().strip().splitlines()[-1]
    print(f"{n} failing binds ({failed} failed, in {loop_s:.2f} s: {failed / loop_s:,.0f}/s):")
    print(f"  lines printed for them: {mine}; missed: {failed - mine}")
    print(f"  {summary}")


def bind_loop(n: int) -> float:
    """bind()s per second: socket, bind 127.0.0.1:0, close (the post-bind hook runs each time)."""
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    return n / (time.perf_counter() - t0)


def udp_new_loop(n: int) -> float:
    """UDP socket + sendto (autobind) + close per second: the create, connect-less send hooks."""
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", 9))
    return n / (time.perf_counter() - t0)


def udp_send_loop(n: int) -> float:
    """sendto()s per second on one bound, unconnected UDP socket (the send hook's lookup)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        t0 = time.perf_counter()
        for _ in range(n):
            s.sendto(b"x", ("127.0.0.1", 9))
        return n / (time.perf_counter() - t0)


def births(n: int, rounds: int) -> None:
    """What birth certificates cost a bind(): the loop with and without `rebind trace --install`
    (pinned in a private BPF filesystem, removed after each round)."""
    import ctypes
    import tempfile

    from rebind.kernel import birth

    libc = ctypes.CDLL(None, use_errno=True)
    fs = tempfile.mkdtemp(prefix="rebind-bench-bpffs-")
    if libc.mount(b"bpf", fs.encode(), b"bpf", 0, b"mode=0700") != 0:
        raise SystemExit(f"cannot mount bpffs: {os.strerror(ctypes.get_errno())}")
    pins = os.path.join(fs, "rebind")
    loops = {
        "bind": lambda: bind_loop(n),
        "connect": lambda: connect_loop(n, 20100),
        "udp socket+sendto": lambda: udp_new_loop(n),
        "udp sendto": lambda: udp_send_loop(n),
    }
    off: dict[str, list[float]] = {k: [] for k in loops}
    on: dict[str, list[float]] = {k: [] for k in loops}
    try:
        for _ in range(rounds):
            for name, loop in loops.items():
                off[name].append(loop())
            birth.install(pins)
            try:
                for name, loop in loops.items():
                    on[name].append(loop())
            finally:
                birth.uninstall(pins)
    finally:
        libc.umount2(fs.encode(), 0)
        os.rmdir(fs)
    for name in loops:
        ratio = statistics.median(on[name]) / statistics.median(off[name])
        print(f"{name} loop, {n} calls x {rounds} rounds (per second), birth certificates:")
        print(f"  without: best {max(off[name]):,.0f}  median {statistics.median(off[name]):,.0f}")
        print(f"  with:    best {max(on[name]):,.0f}  median {statistics.median(on[name]):,.0f}")
        print(f"  ratio of medians (with/without): {ratio:.3f}  -> overhead {100 * (1 - ratio):.1f}%")


def big_table(failures: int, build_timeout: float, extra: list[str]) -> None:
    """Event to line with bench/mkload.py's table in the namespace (bench/ls.py builds it)."""
    import tempfile
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ls import Namespace, start_load, stop_load

    from rebind.kernel.diag import current_netns

    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-trace-"))
    tmp.chmod(0o711)
    ns = Namespace(f"rebind-bench-trace-{os.getpid()}", create=True)
    load = None
    try:
        load, built = start_load(ns, extra, tmp, build_timeout)
        ns.enter()
        ino = current_netns()
        assert ino is not None
        tcp = sum(Path(f"/proc/net/{t}").read_text().count("\n") - 1 for t in ("tcp", "tcp6"))
        print(f"big table ({tcp:,} TCP sockets in the namespace, built in {built:.0f} s, mkload {extra}):")
        for call in ("bind", "connect"):
            latency(ino, failures, call=call)
            latency(ino, failures, "--no-owners", call=call)
    finally:
        if load is not None:
            stop_load(load)
        ns.delete()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connects", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--c-connects", type=int, default=200000, help="connections per C loop (overhead-c)")
    ap.add_argument("--failures", type=int, default=50)
    ap.add_argument("--misses", type=int, default=10000, help="failing binds for the missed-events count")
    ap.add_argument("--binds", type=int, default=20000, help="binds per round for the certificate cost")
    ap.add_argument("--big", action="store_true", help="also event -> line at bench/mkload.py's table")
    ap.add_argument("--mkload", default="", help="arguments for mkload.py (default: its own defaults)")
    ap.add_argument("--build-timeout", type=float, default=1200)
    ap.add_argument("--base-src", help="event -> line also with the rebind of this src/ (a baseline)")
    ap.add_argument(
        "--only", default="overhead,latency,misses,births", help="comma-separated parts to run (and 'big')"
    )
    args = ap.parse_args()
    global BASE_SRC
    BASE_SRC = args.base_src
    parts = set(args.only.split(",")) | ({"big"} if args.big else set())
    print(f"load average before: {os.getloadavg()}")
    with private_netns() as netns:
        if "overhead" in parts:
            overhead(netns, args.connects, args.rounds)
        if "overhead-c" in parts:
            overhead_c(netns, args.c_connects, args.rounds)
        if "overhead-null" in parts:
            overhead_c(netns, args.c_connects, args.rounds, null=True)
        if "latency" in parts:
            for call in ("bind", "connect"):
                latency(netns, args.failures, call=call)
                latency(netns, args.failures, "--no-owners", call=call)
        if "misses" in parts:
            misses(netns, args.misses)
        if "births" in parts:
            births(args.binds, args.rounds)
    if "big" in parts:
        big_table(args.failures, args.build_timeout, args.mkload.split())
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
