"""`rebind trace`'s snapshot of a failing bind() on a port of TIME_WAITs, in-process (issue 19).

    sudo PYTHONPATH=$PWD/src .venv/bin/python bench/trace_timewait.py --timewaits 8000 \
        --base-src /path/to/baseline/src --rounds 3

In a private network namespace: ``--timewaits`` server-side TIME_WAITs on 127.0.0.1:PORT (the
server closes first, no listener left), then a plain bind() to it that fails with EADDRINUSE,
its event built as the tracer decodes it. Child processes (in the namespace) take the snapshot
``--repeat`` times each (``kernel/trace_snapshot.snapshot``, owners on and ``--no-owners``):
this tree's, then the baseline's (``--base-src``), alternating for ``--rounds`` rounds on the
same state; best and median per tree. Each child also prints a digest of the answer (the whole
``Diagnosis`` of ``trace_bindhash.diagnose`` on the bind hash's records as read once by the
parent and replayed, so the TIME_WAITs' time left is the same for both trees): the trees must
print the same digest. ``--profile``: cProfile of this tree's snapshots, by cumulative time.

TIME_WAITs last 60 s (TCP_TIMEWAIT_LEN): they are rebuilt (on a fresh port) when the last were
made more than ``--max-age`` seconds ago. Not a test: it asserts no time.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from ipaddress import ip_address
from typing import Any


def make_time_waits(port: int, n: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    pairs = []
    for k in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        pairs.append((a, c))
        if len(pairs) == 4096 or k == n - 1:  # in batches: two fds a pair until it is closed
            for a, c in pairs:
                a.close()
                c.close()
            pairs = []
    srv.close()


def failing_event(port: int) -> tuple[Any, socket.socket]:
    from rebind.model.records import Proto
    from rebind.model.trace import AF_INET, Kind, TraceEvent

    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE, exc
    else:
        raise SystemExit(f"bind to {port} worked: no TIME_WAIT left")
    ev = TraceEvent(
        kind=Kind.BIND,
        errno=errno.EADDRINUSE,
        pid=os.getpid(),
        tid=threading.get_native_id(),
        comm="bench",
        cgroup_id=0,
        netns=os.stat("/proc/thread-self/ns/net").st_ino,
        family=AF_INET,
        proto=Proto.TCP,
        fd=s.fileno(),
        addr=ip_address("127.0.0.1"),
        port=port,
        reuseaddr=False,
        reuseport=False,
        v6only=False,
        bound_dev_if=0,
        uid=os.geteuid(),
        inode=os.fstat(s.fileno()).st_ino,
        mono_ns=time.monotonic_ns(),
    )
    return ev, s


#: (module, function) timed by --stages where the tree has them (nested ones included)
STAGES = (
    ("rebind.kernel.bindhash_table", "read_port_sockets"),
    ("rebind.kernel.bindhash_table", "to_records"),
    ("rebind.kernel.bindhash_table", "table_order"),
    ("rebind.kernel.bindhash_table", "port_records"),
    ("rebind.kernel.trace_bindhash", "_table"),
    ("rebind.kernel.facts", "gather"),
    ("rebind.model.advice", "assess"),
    ("rebind.model.advice", "blocker_infos"),
    ("rebind.model.advice", "advise"),
    ("rebind.kernel.trace_snapshot", "_bind_snapshot"),
)


def stage_times(ev: Any, repeat: int) -> dict[str, tuple[float, float]]:
    """Best and median ms per call of each stage over ``repeat`` snapshots without owners."""
    import importlib

    from rebind.kernel.trace_snapshot import snapshot

    spent: dict[str, list[float]] = {}
    for mod_name, name in STAGES:
        mod = importlib.import_module(mod_name)
        real = getattr(mod, name, None)
        if real is None:
            continue

        def timed(
            *a: Any, _real: Any = real, _key: str = f"{mod_name.rsplit('.', 1)[1]}.{name}", **k: Any
        ) -> Any:
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                spent.setdefault(_key, []).append((time.perf_counter() - t) * 1000)

        setattr(mod, name, timed)
    for _ in range(repeat):
        snapshot(ev, owners=False)
    return {k: (min(v), statistics.median(v)) for k, v in spent.items()}


def child(port: int, repeat: int, replay: str, profile: bool, stages: bool) -> None:
    from rebind.kernel import bindhash_table, trace_bindhash
    from rebind.kernel.bpf import bindhash as bh
    from rebind.kernel.sysctl import kernel_settings
    from rebind.kernel.trace_snapshot import bind_request, prepare, snapshot

    assert prepare() is None
    ev, s = failing_event(port)
    out: dict[str, Any] = {}
    for owners in (True, False):
        snapshot(ev, owners=owners)  # warm
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            snap = snapshot(ev, owners=owners)
            times.append((time.perf_counter() - t) * 1000)
        assert snap.error is None and snap.blockers, snap
        out["owners" if owners else "no-owners"] = times
    out["reason"] = snap.reason
    if stages:
        out["stages"] = stage_times(ev, repeat)
    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            snapshot(ev, owners=False)
        pr.disable()
        pstats.Stats(pr, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    # the answer on replayed records (the same for every tree)
    with open(replay, "rb") as f:
        state, data, hz = pickle.load(f)
    bh._run_owners = lambda *a, **k: (state, data)  # type: ignore[assignment]
    bindhash_table._HZ["hz"] = hz
    req = bind_request(ev)
    assert req is not None
    settings = kernel_settings()
    for owners in (True, False):
        d = trace_bindhash.diagnose(ev, req, settings, owners)
        assert d is not None
        # a frozenset of addresses prints in an order of their hashes (IPv6Address: per process)
        shown = sorted(d.settings.local_addresses or (), key=str)
        text = repr(replace(d, settings=replace(d.settings, local_addresses=shown)))
        out[f"digest-{owners}"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        if os.environ.get("TW_DUMP"):
            with open(f"{os.environ['TW_DUMP']}-{os.getpid()}-{owners}.txt", "w") as f:
                f.write(text.replace("), ", "),\n"))
        out[f"blockers-{owners}"] = len(d.blockers)
    s.close()
    print(json.dumps(out))


def record(port: int, path: str) -> None:
    """The owners program's output for the port, once (replayed by the children)."""
    from rebind.kernel import bindhash_table
    from rebind.kernel.bpf import bindhash as bh
    from rebind.kernel.bpf.sockiter import load_sock_layout

    hz = bindhash_table.calibrate_hz()
    state, data = bh._run_owners(bh.load_layout(), load_sock_layout(), port, 1 << 16)
    with open(path, "wb") as f:
        pickle.dump((state, data, hz), f)


def run_child(src: str, port: int, repeat: int, replay: str, profile: bool, stages: bool) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(port), "--repeat", str(repeat)]
    cmd += ["--replay", replay] + (["--profile"] if profile else []) + (["--stages"] if stages else [])
    got = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE)
    return json.loads(got.stdout)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timewaits", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-src", help="also the rebind of this src/ (a baseline), alternating")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--stages", action="store_true", help="time each stage of the snapshot (no owners)")
    ap.add_argument("--max-age", type=float, default=25)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--replay", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.repeat, args.replay, args.profile, args.stages)
        return
    from rebind.kernel.netns import private_netns

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    trees = [("this", os.environ.get("PYTHONPATH") or here)]
    if args.base_src:
        trees.append(("base", args.base_src))
    results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in trees}
    digests: dict[str, set[str]] = {name: set() for name, _ in trees}
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="rebind-bench-tw-") as tmp, private_netns():
        port, built = 20000, 0.0
        for rnd in range(args.rounds):
            if time.monotonic() - built > args.max_age:
                port += 1
                t = time.monotonic()
                make_time_waits(port, args.timewaits)
                built = time.monotonic()
                print(f"{args.timewaits} TIME_WAITs on 127.0.0.1:{port} in {built - t:.1f} s")
                replay = os.path.join(tmp, f"owners-{port}.pickle")
                record(port, replay)
            for name, src in trees if rnd % 2 == 0 else trees[::-1]:
                got = run_child(src, port, args.repeat, replay, args.profile and name == "this", args.stages)
                for k in ("owners", "no-owners"):
                    results[name].setdefault(k, []).extend(got[k])
                for k, (best, med) in got.get("stages", {}).items():
                    print(f"    {name} {k:32} best {best:6.1f}  median {med:6.1f} ms")
                digests[name].add(f"{port}:{got['digest-True']}/{got['digest-False']}")
                print(f"  round {rnd} {name}: owners median {statistics.median(got['owners']):.1f} ms, "
                      f"no-owners median {statistics.median(got['no-owners']):.1f} ms; "
                      f"{got['blockers-True']} blockers; {got['reason'][:100]}")  # fmt: skip
    for name, _ in trees:
        for k, v in results[name].items():
            print(f"{name:5} {k:10} best {min(v):6.1f}  median {statistics.median(v):6.1f}  ms  (n={len(v)})")
    if args.base_src:
        same = digests["this"] == digests["base"]
        print(f"answers (replayed records) {'IDENTICAL' if same else 'DIFFER'}: {sorted(digests['this'])}")
        if not same:
            print(f"  base: {sorted(digests['base'])}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
