"""UDP sockets' birth certificates, read with the BPF UDP socket iterator.

inet_diag's UDP dump never returns socket storage (``inet_sk_diag_fill`` returns before the
``INET_DIAG_SK_BPF_STORAGES`` attribute for a socket without a connection part), although the
post-bind and connect programs certify UDP sockets as they do TCP ones. So for UDP,
:class:`rebind.kernel.diag.DiagSocket` asks this module once per snapshot, and only when the
certificate map is pinned and the dump returned a UDP socket: one ``bpf_iter__udp`` program
(:func:`rebind.kernel.bpf.birth_prog.build_udp_reader`) walks this thread's network namespace
and writes (cookie, value) for each certified socket; the cookie is the one inet_diag reports,
so the records are matched to the dump's sockets by it.

Costs one program load and one walk of the namespace's UDP table (docs/benchmarks.md,
"birth certificates of UDP sockets"); needs what every socket iterator needs (CAP_BPF +
CAP_PERFMON or CAP_SYS_ADMIN, vmlinux BTF: the per-boot layout cache of kernel/bpf/sockiter.py).
Anything missing or failing is no certificate, never an error: :func:`read` returns None.
"""

from __future__ import annotations

import os

from rebind.kernel.bpf.birth_prog import READ_RECORD, build_udp_reader
from rebind.kernel.bpf.syscall import (
    BPF_PROG_TYPE_TRACING,
    BPF_TRACE_ITER,
    ProgType,
    check_bpf_environment,
    load_program,
    run_iterator,
)

READER = ProgType(BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER, b"rebind_birthu", "the UDP certificate reader")


def read_values(map_fd: int) -> dict[int, bytes]:
    """cookie -> map value of every certified UDP socket in this thread's network namespace.
    Raises (OSError, RebindError, BTF errors) when it cannot: :func:`read` is the safe one."""
    from rebind.kernel.bpf.sockiter import load_sock_layout

    check_bpf_environment(honour_no_bpf=True)
    lay = load_sock_layout()
    insns = build_udp_reader(
        map_fd,
        udp_sk=lay["bpf_iter__udp.udp_sk"],
        meta=lay["bpf_iter__udp.meta"],
        seq=lay["bpf_iter_meta.seq"],
    )
    prog_fd = load_program(insns, lay.attach["bpf_iter_udp"], prog=READER)
    try:
        raw = run_iterator(prog_fd)
    finally:
        os.close(prog_fd)
    return decode_records(raw)


def decode_records(raw: bytes) -> dict[int, bytes]:
    """The reader's output: whole :data:`READ_RECORD` records (a trailing partial one is dropped)."""
    out: dict[int, bytes] = {}
    end = len(raw) - len(raw) % READ_RECORD.size
    for cookie, value in READ_RECORD.iter_unpack(raw[:end]):
        out[cookie] = value
    return out


def read(map_fd: int) -> dict[int, bytes] | None:
    """:func:`read_values`, or None when it cannot run here (any reason: no certificate shown)."""
    try:
        return read_values(map_fd)
    except Exception:  # a certificate is extra: `ls` must never fail for it
        return None
