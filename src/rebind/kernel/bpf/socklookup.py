"""The kernel's bind state of named sockets, found by their 4-tuple: no walk of the tables.

The socket iterators (:mod:`.sockiter`) visit every socket of the namespace: ~130 ms of kernel
CPU on 211k sockets whatever the port, where inet_diag's dump filters by port inside its walk.
For sockets inet_diag has already named by their 4-tuple -- a port's TIME_WAITs, connections
nobody has accept()ed yet -- the kernel's own hash lookup finds each one directly:
``bpf_skc_lookup_tcp`` (Linux 5.2) returns any socket of the established hash, TIME_WAITs and
request socks included. It is a helper of networking programs, so the program is a
``BPF_PROG_TYPE_SCHED_CLS`` run by ``BPF_PROG_TEST_RUN`` (no device, no packet: the test run's
skb belongs to the caller's network namespace, BPF_F_CURRENT_NETNS). Each run takes the next
tuple from an array map, looks the socket up, copies the same fields as the iterator into the
same :data:`~.sockprog.RECORD` (offsets from BTF), and releases it; ``repeat`` runs it once per
tuple. bench/whyperf.py measures it against the iterator.

The copies start from the socket's address as a number (the verifier forbids arithmetic on a
socket pointer; the number is read back from the stack with bpf_probe_read_kernel), so every
field goes through bpf_probe_read_kernel like the iterator's, and a fault only marks the record.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

from rebind.errors import RebindError
from rebind.kernel.bpf import asm
from rebind.kernel.bpf.sockprog import (
    REC,
    RECORD,
    SockFrame,
    SockLayout,
    _Emitter,
    emit_socket_fields,
)
from rebind.kernel.bpf.syscall import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    BPF_PROG_TEST_RUN,
    SOCKET_LOOKUP,
    attr_buf,
    bpf,
    load_program,
    map_create,
)
from rebind.model.records import Endpoint, Proto, SocketRecord
from rebind.model.sockstate import SockState, Unavailable

HELPER_SK_RELEASE = 86
HELPER_SKC_LOOKUP_TCP = 99

#: One map entry: struct bpf_sock_tuple (36 bytes: ipv4 uses the first 12), its length, the
#: record the program fills, and whether it found the socket.
TUPLE_SIZE = 36
ENTRY_IN = struct.Struct("<36sI")
FOUND_AT = ENTRY_IN.size  # u32: 1 if the lookup found a socket
FOUND = struct.Struct("<I")
RECORD_AT = FOUND_AT + 8
ENTRY_SIZE = (RECORD_AT + RECORD.size + 7) // 8 * 8
#: Stack slots beyond the iterator program's frame.
REF_SLOT = (SockFrame.RECORD - 8) // 8 * 8  # the referenced socket pointer, spilled (aligned)
ENTRY_SLOT = REF_SLOT - 8  # the map entry pointer, spilled


def build_lookup_program(lay: SockLayout, ctr_fd: int, io_fd: int) -> bytes:
    """One run: entry = io[ctr[0]++]; sk = bpf_skc_lookup_tcp(tuple); record = sk's fields."""
    p = asm.Program()
    e = _Emitter(p, lay)
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R5, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
    F, rec = SockFrame, SockFrame.RECORD
    p.mov(r6, r1)  # the skb
    # idx = ctr[0]++ (one caller at a time: BPF_PROG_TEST_RUN on one CPU)
    p.store_imm(4, fp, F.KEY, 0)
    p.map_lookup(ctr_fd, F.KEY, "out")
    p.load(4, r7, r0, 0)
    p.mov(r1, r7)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(4, r0, 0, r1)
    p.store(4, fp, F.KEY, r7)
    p.map_lookup(io_fd, F.KEY, "out")  # past the last entry
    p.mov(r8, r0)
    p.store(8, fp, ENTRY_SLOT, r8)
    p.load(4, r3, r8, TUPLE_SIZE)
    p.mov(r1, r6)
    p.mov(r2, r8)
    p.jump_imm(asm.JEQ, r3, 12, "v4")
    p.mov_imm(r3, TUPLE_SIZE)
    p.goto("lookup")
    p.label("v4")
    p.mov_imm(r3, 12)
    p.label("lookup")
    p.mov_imm(r4, -1)  # BPF_F_CURRENT_NETNS: the test run's skb is in the caller's namespace
    p.mov_imm(r5, 0)
    p.call(HELPER_SKC_LOOKUP_TCP)
    p.jump_imm(asm.JEQ, r0, 0, "out")
    p.store(8, fp, REF_SLOT, r0)
    # the socket's address as a number: bpf_probe_read_kernel copies the spilled pointer
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, F.SCRATCH)
    p.mov_imm(r2, 8)
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, REF_SLOT)
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.load(8, r7, fp, F.SCRATCH)
    p.mov_imm(r9, 0)
    for off in range(0, RECORD.size, 8):
        p.store_imm(8, fp, rec + off, 0)
    emit_socket_fields(p, e, lay, tcp=True)
    p.label("emit")
    p.store(4, fp, rec + REC["faults"], r9)
    p.load(8, r1, fp, ENTRY_SLOT)
    p.store_imm(4, r1, FOUND_AT, 1)
    p.alu_imm(asm.ADD, r1, RECORD_AT)
    p.mov_imm(r2, RECORD.size)
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, rec)
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.load(8, r1, fp, REF_SLOT)
    p.call(HELPER_SK_RELEASE)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    return p.assemble()


def _test_run(prog_fd: int, repeat: int) -> None:
    packet = ctypes.create_string_buffer(64)
    # prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration,
    # ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size
    attr = attr_buf(
        "<IIIIQQIIIIQQIII4x", prog_fd, 0, 64, 0, ctypes.addressof(packet), 0, repeat, 0, 0, 0, 0, 0, 0, 0, 0
    )
    bpf(BPF_PROG_TEST_RUN, attr)


def _tuple(local: Endpoint, remote: Endpoint) -> bytes:
    """struct bpf_sock_tuple as a packet to this socket would carry it: from remote to local.

    An IPv6 socket talking IPv4 (``::ffff:a.b.c.d`` both ends) is hashed by its IPv4 addresses
    (tcp_v6_connect hands mapped peers to tcp_v4_connect; an accepted one is a tcp_v4 child
    made IPv6), so it is looked up as IPv4."""
    la4 = local.addr if isinstance(local.addr, IPv4Address) else local.addr.ipv4_mapped
    ra4 = remote.addr if isinstance(remote.addr, IPv4Address) else remote.addr.ipv4_mapped
    if la4 is not None and ra4 is not None:
        raw = ra4.packed + la4.packed + struct.pack(">HH", remote.port, local.port)
        return ENTRY_IN.pack(raw, 12)
    la, ra = IPv6Address(int(local.addr)), IPv6Address(int(remote.addr))
    raw = ra.packed + la.packed + struct.pack(">HH", remote.port, local.port)
    return ENTRY_IN.pack(raw, TUPLE_SIZE)


def lookup_socket_states(
    lay: SockLayout, targets: Sequence[SocketRecord]
) -> tuple[list[SockState | None], int] | Unavailable:
    """For each TCP socket of the established hash that inet_diag named (TIME_WAIT, connected):
    the kernel's state of that very socket, with inet_diag's cookie and uid (the program has
    neither), or None where the 4-tuple finds no socket or another one (gone since the dump: the
    lookup then falls through to a listener). Also how many records faulted."""
    from rebind.kernel.bpf.sockiter import decode_records

    if not targets:
        return [], 0
    n = len(targets)
    fds: list[int] = []
    try:
        ctr = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1)
        fds.append(ctr)
        io = map_create(BPF_MAP_TYPE_ARRAY, 4, ENTRY_SIZE, n, BPF_F_MMAPABLE)
        fds.append(io)
        size = (ENTRY_SIZE * n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        with mmap.mmap(io, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mem:
            for i, t in enumerate(targets):
                mem[i * ENTRY_SIZE : i * ENTRY_SIZE + ENTRY_IN.size] = _tuple(t.local, t.remote)
            insns = build_lookup_program(lay, ctr, io)
            prog = load_program(insns, prog=SOCKET_LOOKUP)
            fds.append(prog)
            _test_run(prog, n)
            data = bytearray(mem[: ENTRY_SIZE * n])
    except (OSError, RebindError) as exc:
        return Unavailable(f"BPF socket lookup: {exc}".splitlines()[0])
    finally:
        for fd in fds:
            os.close(fd)
    found = [i for i in range(n) if FOUND.unpack_from(data, i * ENTRY_SIZE + FOUND_AT)[0]]
    for i in found:  # inet_diag's cookie and uid into the record, before it is decoded once
        at = i * ENTRY_SIZE + RECORD_AT
        struct.pack_into("<Q", data, at + REC["cookie"], targets[i].cookie or 0)
        struct.pack_into("<I", data, at + REC["uid"], targets[i].uid or 0)
    raw = b"".join(data[i * ENTRY_SIZE + RECORD_AT : i * ENTRY_SIZE + RECORD_AT + RECORD.size] for i in found)
    states, faulted = decode_records(Proto.TCP, raw)  # one call: shared addresses and buckets
    if faulted:  # records left out: pair the rest by their cookie (written above)
        by_cookie = {s.cookie: s for s in states}
        pairs = [(t, by_cookie.get(t.cookie or 0)) for t in targets]
    else:
        got: list[SockState | None] = [None] * n
        for i, st in zip(found, states, strict=True):
            got[i] = st
        pairs = list(zip(targets, got, strict=True))
    # The 4-tuple of a socket gone since the dump finds a listener, or a newer socket: not ours.
    return [st if st is not None and _same(st, t) else None for t, st in pairs], faulted


def _same(st: SockState, t: SocketRecord) -> bool:
    return (
        st.local.port == t.local.port
        and st.remote.port == t.remote.port
        and st.local.addr == t.local.addr
        and st.remote.addr == t.remote.addr
    )
