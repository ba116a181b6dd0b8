"""Benchmark reading UDP sockets' birth certificates (the BPF UDP iterator, kernel/birth_udp.py).

    sudo .venv/bin/python bench/birth_udp.py                  # 0 and 3000 extra UDP sockets, 15 runs
    sudo .venv/bin/python bench/birth_udp.py --sockets 0,5000 --runs 25

In a private network namespace, with certificates pinned in a private BPF filesystem: for
each count of extra bound UDP sockets (made after the install, so each has a certificate),
the wall time of ``socket_table(protos=[udp], owners=False)`` (what `rebind ls --udp
--no-owners` reads) with no map pinned, and with the map pinned (the dump, then one iterator
walk of the namespace's UDP table matched by cookie); and the iterator read alone
(``birth_udp.read``). The sockiter layout comes from the per-boot cache (/run/rebind), as in
`ls`; what reading it from vmlinux BTF costs (the first `ls` or `why` after a boot) is printed
apart.

Not a test: it asserts no time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

from rebind.kernel.netns import private_netns


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(best, median) wall ms of ``runs`` calls, after one warm-up call."""
    fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return min(out), statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", default="0,3000", help="comma-separated counts of extra UDP sockets")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    counts = [int(x) for x in args.sockets.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, max(counts) + 1000)), hard))

    from rebind.kernel import birth, birth_pins, birth_udp
    from rebind.model.records import Proto
    from rebind.sockets import socket_table

    libc = ctypes.CDLL(None, use_errno=True)
    fs = tempfile.mkdtemp(prefix="rebind-bench-bpffs-")
    if libc.mount(b"bpf", fs.encode(), b"bpf", 0, b"mode=0700") != 0:
        raise SystemExit(f"cannot mount bpffs: {os.strerror(ctypes.get_errno())}")
    pins = os.path.join(fs, "rebind")
    absent = os.path.join(fs, "not-installed")
    print(f"load average before: {os.getloadavg()}; {os.uname().release}")
    try:
        with private_netns():
            birth.install(pins)
            held: list[socket.socket] = []
            try:
                for n in counts:
                    while len(held) < n:
                        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        s.bind(("127.0.0.1", 0))
                        held.append(s)

                    def table() -> object:
                        return socket_table(protos=[Proto.UDP], owners=False)

                    os.environ["REBIND_BPF_DIR"] = absent
                    off = timed(table, args.runs)
                    os.environ["REBIND_BPF_DIR"] = pins
                    on = timed(table, args.runs)
                    got = socket_table(protos=[Proto.UDP], owners=False)
                    certified = sum(e.socket.birth is not None for e in got.entries)
                    fd = birth_pins.open_map()
                    assert fd is not None
                    try:
                        alone = timed(lambda: birth_udp.read(fd), args.runs)  # noqa: B023
                    finally:
                        os.close(fd)
                    print(
                        f"{len(got.entries)} UDP sockets ({certified} with a certificate), best/median ms of "
                        f"{args.runs}: no map {off[0]:.2f}/{off[1]:.2f}; map pinned {on[0]:.2f}/{on[1]:.2f}; "
                        f"iterator read alone {alone[0]:.2f}/{alone[1]:.2f}"
                    )
            finally:
                for s in held:
                    s.close()
                birth.uninstall(pins)
    finally:
        libc.umount2(fs.encode(), 0)
        os.rmdir(fs)
    from rebind.kernel.bpf.sockprog import sock_layout_from_btf
    from rebind.kernel.bpf.syscall import read_vmlinux_btf

    parse = timed(lambda: sock_layout_from_btf(read_vmlinux_btf()), 5)
    print(
        f"the layout from vmlinux BTF (once per boot, then /run/rebind): best/median {parse[0]:.1f}/{parse[1]:.1f} ms"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
