"""A port's bind bucket read from the kernel's bind hash, against the socket walks (issues 17, 19).

    sudo .venv/bin/python bench/bindhash.py [--runs 7]
    sudo .venv/bin/python bench/bindhash.py --use-existing NAME   # a netns already loaded

Builds bench/mkload.py's load with a SO_REUSEPORT group (``--reuseport 4``: ~211k sockets, as
bench/whyperf.py) in a throwaway namespace, enters it, makes ~11k server-side TIME_WAITs on
127.0.0.1:9000 afresh (they expire in 60 s), and times, best and median of --runs, wall and CPU
(time.process_time: the programs run in the bpf() syscall, so their kernel time is counted):

  buckets   kernel/bpf/bindhash.read_port_buckets(every port of ip_local_port_range): one chain
            walk per port, no socket visited;
  client    what the exporter does today for the range (exporter/gather.py _client_filter and
            read_connect_only): the inet_diag dump of the range's autobound client sockets,
            one per port (fastdiag.first_per_port), then one bpf_skc_lookup_tcp per port
            (socklookup.lookup_port_buckets) -- and whether both agree on connect()-made;
  owners    bindhash.read_port_owners(P, limit) for 8080 (one listener) and 9000 (the
            TIME_WAITs), with the program kept loaded (as after prepare_port_owners) and loaded
            afresh each call, against the BPF iterator (sockiter.read_socket_states([P], [tcp]):
            a walk of every TCP socket) and the inet_diag dump of the port
            (rebind.sockets.socket_table(ports=[P], owners=False)), with the socket counts.

Not a test: it asserts no time (it does check that the readers agree on the sockets).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

from ls import Namespace, start_load, stop_load  # noqa: E402
from sockiter import timed  # noqa: E402  (bench/sockiter.py)
from whyperf import make_timewaits  # noqa: E402  (bench/whyperf.py)

from rebind.exporter import bytecode as bc  # noqa: E402
from rebind.exporter import fastdiag  # noqa: E402
from rebind.exporter.gather import _CLIENT_STATES  # noqa: E402
from rebind.kernel import diag_codec as codec  # noqa: E402
from rebind.kernel.bpf.bindhash import _forget, read_port_buckets, read_port_owners  # noqa: E402
from rebind.kernel.bpf.sockiter import load_sock_layout, read_socket_states  # noqa: E402
from rebind.kernel.bpf.socklookup import lookup_port_buckets  # noqa: E402
from rebind.kernel.diag import DiagSocket, states_mask  # noqa: E402
from rebind.model.records import Proto  # noqa: E402
from rebind.model.sockstate import Unavailable, connect_made  # noqa: E402
from rebind.sockets import socket_table  # noqa: E402

TIMEWAITS = 11_000
OWNER_PORTS = {8080: "one listener", 9000: "TIME_WAITs"}
LIMIT = 1 << 16


def port_range() -> tuple[int, int]:
    lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(lo), int(hi)


def buckets(lo: int, hi: int, owners: bool = False) -> dict[int, bool]:
    """port -> connect()-made, for the held ports of the range (bind hash)."""
    got = read_port_buckets(range(lo, hi + 1), owners=owners)
    if isinstance(got, Unavailable):
        raise SystemExit(f"bind hash read unavailable: {got.reason}")
    return {p: b.connect_made for p, b in got.items() if b.exists and b.known}


def client_walk(lo: int, hi: int) -> dict[int, bool]:
    """port -> connect()-made, the exporter's way: the autobound client sockets of the range,
    one per port (inet_diag), then one socket lookup per port."""
    code = bc.program([bc.Group((), ((bc.sport_ge(lo), bc.sport_le(hi), bc.port_autobound()),))])
    req = codec.dump_request_tcp_any_family(states_mask(_CLIENT_STATES), bytecode=code)
    with DiagSocket() as sock:
        reps = fastdiag.first_per_port(sock, req, set())
    ports = list(reps)
    found = lookup_port_buckets(load_sock_layout(), [(p, *reps[p][:3]) for p in ports])
    if isinstance(found, Unavailable):
        raise SystemExit(f"socket lookup unavailable: {found.reason}")
    return {p: connect_made(*got) for p, got in zip(ports, found, strict=True) if got is not None}


def owners(port: int) -> set[int]:
    got = read_port_owners(port, LIMIT)
    if isinstance(got, Unavailable):
        raise SystemExit(f"bind hash read unavailable: {got.reason}")
    return {s.cookie for s in got.sockets}


def iterate(port: int) -> set[int]:
    got = read_socket_states([port], [Proto.TCP])
    if isinstance(got, Unavailable):
        raise SystemExit(f"iterator unavailable: {got.reason}")
    return {s.cookie for s in got.sockets}


def diag(port: int) -> set[int]:
    return {
        e.socket.cookie or 0 for e in socket_table(ports=[port], protos=[Proto.TCP], owners=False).entries
    }


def row(label: str, t: tuple[float, float, float, float, object], base: float | None = None) -> str:
    w, wm, c, cm, _ = t
    ratio = f"{w / base:.3f}" if base else "1"
    return f"| {label} | {w:.1f} (med {wm:.1f}) | {c:.1f} (med {cm:.1f}) | {ratio} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--build-timeout", type=float, default=1200)
    ap.add_argument(
        "--use-existing", metavar="NETNS", help="a namespace already loaded (mkload --reuseport 4)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns, setns, BPF)")
    tmp = Path(tempfile.mkdtemp(prefix="rebind-bench-bindhash-"))
    tmp.chmod(0o711)
    ns = Namespace(args.use_existing or f"rebind-bench-bindhash-{os.getpid()}", create=not args.use_existing)
    load = None
    try:
        built = 0.0
        if not args.use_existing:
            load, built = start_load(ns, ["--reuseport", "4"], tmp, args.build_timeout)
        ns.enter()
        make_timewaits(9000, TIMEWAITS)
        lo, hi = port_range()
        out = subprocess.run(["ss", "-s"], capture_output=True, text=True).stdout
        total = next((line.strip() for line in out.splitlines() if line.startswith("TCP:")), "?")
        print(f"# {platform.release()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        print(f"# load built in {built:.0f}s; {total}; runs: best (and median) of {args.runs}")
        print()
        print(f"## every port of ip_local_port_range ({lo}-{hi}: {hi - lo + 1} ports)")
        print("| reader | wall ms | CPU ms | wall / bind hash |")
        print("|---|---|---|---|")
        tb = timed(lambda: buckets(lo, hi), args.runs)
        tn = timed(lambda: buckets(lo, hi, owners=True), args.runs)
        tc = timed(lambda: client_walk(lo, hi), args.runs)
        print(row("bindhash.read_port_buckets", tb))
        print(row("read_port_buckets(owners=True): the owners counted too", tn, tb[0]))
        print(row("first_per_port + lookup_port_buckets", tc, tb[0]))
        by_hash, by_walk = tb[4], tc[4]
        assert isinstance(by_hash, dict) and isinstance(by_walk, dict)
        same = sum(1 for p, v in by_walk.items() if by_hash.get(p) == v)
        print(
            f"# held ports: {len(by_hash)} by the bind hash; {len(by_walk)} through a client socket, "
            f"{same} of them with the same connect()-made answer"
        )
        print()
        print("## one port's sockets")
        print("| port | sockets | reader | wall ms | CPU ms | wall / bind hash |")
        print("|---|---|---|---|---|---|")
        for port, what in OWNER_PORTS.items():
            diag(port)  # inet_diag makes every cookie (sock_gen_cookie): the owners' are read as held
            cold = timed(lambda p=port: (_forget("owners"), owners(p))[1], 3)
            to = timed(lambda p=port: owners(p), args.runs)
            ti = timed(lambda p=port: iterate(p), args.runs)
            td = timed(lambda p=port: diag(p), args.runs)
            n = len(to[4]) if isinstance(to[4], set) else 0
            readers = (
                ("read_port_owners", to),
                ("read_port_owners, program loaded afresh", cold),
                ("read_socket_states", ti),
                ("inet_diag dump", td),
            )
            for label, t in readers:
                print(f"| {port} ({what}) | {n} {row(label, t, to[0])}")
            assert to[4] == ti[4], (port, len(to[4]), len(ti[4]))  # type: ignore[arg-type]
        print("# read_port_owners and the iterator report the same cookies for both ports")
    finally:
        if load is not None:
            stop_load(load)
        ns.delete()


if __name__ == "__main__":
    main()
