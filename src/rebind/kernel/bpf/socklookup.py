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
same :data:`~.socklayout.RECORD` (offsets from BTF), and releases it; ``repeat`` runs it once per
tuple. bench/whyperf.py measures it against the iterator.

The copies start from the socket's address as a number (the verifier forbids arithmetic on a
socket pointer; the number is read back from the stack with bpf_probe_read_kernel), so every
field goes through bpf_probe_read_kernel like the iterator's, and a fault only marks the record.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

from rebind.errors import RebindError
from rebind.kernel.bpf import asm
from rebind.kernel.bpf.socklayout import REC, RECORD, RECORD_FIELDS, SockLayout
from rebind.kernel.bpf.sockprog import SockFrame, _Emitter, emit_socket_fields
from rebind.kernel.bpf.syscall import (
    BPF_PROG_TEST_RUN,
    attr_buf,
    bpf,
)
from rebind.model.records import Endpoint, Family, Proto, SocketRecord
from rebind.model.sockstate import SockState, Unavailable

if TYPE_CHECKING:
    from rebind.kernel.bpf.bindhashlayout import BindHashLayout
    from rebind.kernel.bpf.sockdecode import BulkDecoder

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


def build_lookup_program(
    lay: SockLayout, ctr_fd: int, io_fd: int, extras: BindHashLayout | None = None
) -> bytes:
    """One run: entry = io[ctr[0]++]; sk = bpf_skc_lookup_tcp(tuple); record = sk's fields.
    ``extras``: the record also gets the owners program's extras (inode, a TIME_WAIT's jiffies
    left, skc_cookie, sk_uid: bindowners.emit_bind_extras), so it reads as theirs."""
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
    if extras is not None:
        from rebind.kernel.bpf.bindowners import emit_bind_extras

        emit_bind_extras(p, extras, e)
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


def _entry(local: Endpoint, remote: Endpoint) -> tuple[bytes, _Expect]:
    """The map entry's input (struct bpf_sock_tuple as a packet to this socket would carry it:
    from remote to local), and what the found socket's record must then hold (its addresses as
    the socket's family stores them, and the ports).

    An IPv6 socket talking IPv4 (``::ffff:a.b.c.d`` both ends) is hashed by its IPv4 addresses
    (tcp_v6_connect hands mapped peers to tcp_v4_connect; an accepted one is a tcp_v4 child
    made IPv6), so it is looked up as IPv4."""
    la, ra = local.addr, remote.addr
    lp, rp = la.packed, ra.packed
    ports = _PORTS.pack(remote.port, local.port)
    expect = (lp, rp, ports[:2], local.port)
    if len(lp) == 4 and len(rp) == 4:
        return ENTRY_IN.pack(rp + lp + ports, 12), expect
    la4 = la if isinstance(la, IPv4Address) else la.ipv4_mapped
    ra4 = ra if isinstance(ra, IPv4Address) else ra.ipv4_mapped
    if la4 is not None and ra4 is not None:
        return ENTRY_IN.pack(ra4.packed + la4.packed + ports, 12), expect
    la6, ra6 = IPv6Address(int(la)), IPv6Address(int(ra))
    return ENTRY_IN.pack(ra6.packed + la6.packed + ports, TUPLE_SIZE), expect


#: (local address, remote address, remote port as skc_dport holds it, local port)
_Expect = tuple[bytes, bytes, bytes, int]
_PORTS = struct.Struct(">HH")


#: What precedes each record in an entry, as the results are read: whether the lookup found it.
_LEAD = f"{FOUND_AT}xI{RECORD_AT - FOUND_AT - 4}x"


def _run(
    lay: SockLayout, entries: bytes | bytearray, n: int, extras: BindHashLayout | None = None
) -> bytes | Unavailable:
    """One test run over ``n`` map entries (``entries``: their inputs); the entries after it.
    The program and its maps are kept for the next run (bindhash._loaded: the verifier's pass
    and the maps' allocation cost more than a run of a few entries -- the exporter looks a
    port's sockets up every scrape), grown to the next power of two past ``n``."""
    from rebind.kernel.bpf.bindhash import _LOCK, _forget, _loaded

    name = "lookup" if extras is None else "lookup+extras"
    with _LOCK:
        try:
            run = _loaded(
                name,
                (lay, extras),
                n,
                lambda cap: [(4, 1), (ENTRY_SIZE, cap)],
                lambda fds: (build_lookup_program(lay, fds[0], fds[1], extras), ()),
            )
            ctr, io = run.maps
            ctr[:4] = bytes(4)
            io[: ENTRY_SIZE * n] = entries
            _test_run(run.prog, n)
            return io[: ENTRY_SIZE * n]
        except (OSError, RebindError) as exc:
            _forget(name)
            return Unavailable(f"BPF socket lookup: {exc}".splitlines()[0])
        except BaseException:
            _forget(name)
            raise


def _bucket_fields() -> struct.Struct:
    """An entry, read for its port's bind bucket only: found, faults, lport, has_bucket,
    fastreuse, fastreuseport (the rest skipped as padding)."""
    at = [
        (FOUND_AT, "I"),
        *((RECORD_AT + REC[n], f) for n, f in RECORD_FIELDS if n in _BUCKET_NAMES),
    ]
    fmt, off = "<", 0
    for pos, f in sorted(at):
        fmt += f"{pos - off}x{f}" if pos > off else f
        off = pos + struct.calcsize("<" + f)
    return struct.Struct(f"{fmt}{ENTRY_SIZE - off}x")


_BUCKET_NAMES = ("faults", "lport", "has_bucket", "fastreuse", "fastreuseport")
_BUCKET_ENTRY = _bucket_fields()
_BUCKET_ORDER = sorted((REC[n], n) for n in _BUCKET_NAMES)


def lookup_port_buckets(
    lay: SockLayout, sockets: Sequence[tuple[int, bytes, bytes, int]]
) -> list[tuple[int, int] | None] | Unavailable:
    """For each TCP socket (local port, local address, remote address, remote port; addresses
    of 4 bytes for IPv4 and v4-mapped IPv6, else 16): its port's bind bucket cache
    (``fastreuse``, ``fastreuseport``), or None where the tuple found no socket of that port or
    its copy faulted. One lookup a socket and no SockState: where only the port's bucket is
    wanted (the exporter's connect metrics), any socket of the port leads to it -- even a
    listener the lookup falls through to when the connection is gone (same port, same bucket).
    ~1 us a socket in all (docs/benchmarks.md)."""
    if not sockets:
        return []
    n = len(sockets)
    buf = bytearray(ENTRY_SIZE * n)
    size = ENTRY_IN.size
    for i, (lport, local, remote, rport) in enumerate(sockets):
        at = i * ENTRY_SIZE
        buf[at : at + size] = _raw_entry(lport, local, remote, rport)
    data = _run(lay, buf, n)
    if isinstance(data, Unavailable):
        return data
    return buckets_of([s[0] for s in sockets], data)


def buckets_of(ports: Sequence[int], data: bytes) -> list[tuple[int, int] | None]:
    """The test run's entries (``data``), one per port asked: (fastreuse, fastreuseport) where
    the lookup found a socket of that port, copied without a fault, with its bucket read."""
    names = [name for _, name in _BUCKET_ORDER]
    fi, li, hi, ri, pi = (1 + names.index(k) for k in _BUCKET_NAMES)
    out: list[tuple[int, int] | None] = []
    for lport, v in zip(ports, _BUCKET_ENTRY.iter_unpack(data), strict=True):
        if v[0] and not v[fi] and v[li] == lport and v[hi] & 1:
            out.append((v[ri], v[pi]))
        else:
            out.append(None)
    return out


def _raw_entry(lport: int, local: bytes, remote: bytes, rport: int) -> bytes:
    """_entry for addresses as bytes: a packet from remote to local."""
    ports = _PORTS.pack(rport, lport)
    if len(local) == 4 and len(remote) == 4:
        return ENTRY_IN.pack(remote + local + ports, 12)
    return ENTRY_IN.pack(_as16(remote) + _as16(local) + ports, TUPLE_SIZE)


def _as16(a: bytes) -> bytes:
    return a if len(a) == 16 else bytes(10) + b"\xff\xff" + a


def lookup_socket_states(
    lay: SockLayout, targets: Sequence[SocketRecord]
) -> tuple[list[SockState | None], int] | Unavailable:
    """For each TCP socket of the established hash that inet_diag named (TIME_WAIT, connected):
    the kernel's state of that very socket, with inet_diag's cookie and uid (the program has
    neither), or None where the 4-tuple finds no socket or another one (gone since the dump: the
    lookup then falls through to a listener), or its copy faulted. Also how many faulted.

    The map is written and read whole (one mmap copy each way, struct.iter_unpack over the
    entries); each record decodes into a SockState that shares its SockCommon with the records
    like it (sockdecode.BulkDecoder): a few us a socket in Python, docs/benchmarks.md."""
    from rebind.kernel.bpf.sockdecode import BulkDecoder

    if not targets:
        return [], 0
    entries, expect = _entries(targets)
    data = _run(lay, entries, len(targets))
    if isinstance(data, Unavailable):
        return data
    dec = BulkDecoder(Proto.TCP, lead=_LEAD, trail=ENTRY_SIZE - RECORD_AT - RECORD.size)
    out: list[SockState | None] = []
    faulted = 0
    faults, decode, add = dec.faults, dec.decode, out.append
    for i, (t, want, v) in enumerate(zip(targets, expect, dec.rows(data), strict=True)):
        if not v[0]:  # not found
            add(None)
        elif v[faults]:  # a socket freed mid-read: not decoded (read_kernel then walks)
            faulted += 1
            add(None)
        elif _is(dec, v, t, want):
            # inet_diag's remote end: the record's, checked byte for byte
            add(decode(v, data, i, t.cookie or 0, t.uid or 0, t.remote))
        else:  # the 4-tuple of a socket gone since the dump finds a listener, or a newer socket
            add(None)
    return out, faulted


def _entries(targets: Sequence[SocketRecord]) -> tuple[bytearray, list[_Expect]]:
    """The map's contents before the run (each entry's tuple, the rest zero), and what each
    entry's record must hold to be of that very socket (see _is)."""
    buf = bytearray(ENTRY_SIZE * len(targets))
    expect: list[_Expect] = []
    size = ENTRY_IN.size
    pack_into, pack_ports = ENTRY_IN.pack_into, _PORTS.pack
    for i, t in enumerate(targets):
        at = i * ENTRY_SIZE
        local, remote = t.local, t.remote
        if isinstance(local.addr, IPv4Address) and isinstance(remote.addr, IPv4Address):
            # _entry's first case written in place (ten thousand TIME_WAITs of one port);
            # int().to_bytes is .packed with one Python call less
            lp, rp = int(local.addr).to_bytes(4, "big"), int(remote.addr).to_bytes(4, "big")
            ports = pack_ports(remote.port, local.port)
            pack_into(buf, at, rp + lp + ports, 12)
            expect.append((lp, rp, ports[:2], local.port))
            continue
        buf[at : at + size], want = _entry(local, remote)
        expect.append(want)
    return buf, expect


def _is(dec: BulkDecoder, v: tuple[Any, ...], t: SocketRecord, want: _Expect) -> bool:
    """The record is of the socket inet_diag named: same family, addresses and ports, compared
    as the kernel stores them (the record's address of the socket's own family)."""
    fam = v[dec.family]
    local, remote, dport, lport = want
    if fam != t.family or v[dec.lport] != lport or v[dec.dport] != dport:
        return False
    if fam == Family.INET:
        return bool(v[dec.rcv] == local and v[dec.daddr] == remote)
    return bool(v[dec.rcv6] == local and v[dec.daddr6] == remote)


#: A peer lookup's found socket: its SockState, its inode (0: a TIME_WAIT or an orphan), for a
#: TIME_WAIT its timer's jiffies left, for a full socket its struct file (bindowners' extras).
PeerSocket = tuple[SockState, int, int, int]


def lookup_peer_sockets(
    lay: SockLayout,
    extras: BindHashLayout,
    local: IPv4Address | IPv6Address,
    remote: IPv4Address | IPv6Address,
    rport: int,
    ports: Sequence[int],
) -> list[PeerSocket] | Unavailable:
    """The sockets of the established hash with the 4-tuple (``local``, p, ``remote``,
    ``rport``), for each p of ``ports``: what __inet_check_established asks of each port a
    connect() to that peer tries, found by the same hash lookup (no walk of the table: the
    inet_diag filter for "connected to the peer" visits every socket of the namespace). A port
    where the lookup finds nothing, or falls through to a listener (no socket of that 4-tuple),
    is not in the answer; a record that faulted makes the whole answer Unavailable (a socket
    freed mid-copy: the caller then walks). The records carry the owners program's extras."""
    from rebind.kernel.bpf.sockdecode import BulkDecoder

    if not ports:
        return []
    l4 = local if isinstance(local, IPv4Address) else local.ipv4_mapped
    r4 = remote if isinstance(remote, IPv4Address) else remote.ipv4_mapped
    if l4 is not None and r4 is not None:
        # a v4-mapped IPv6 socket is hashed by its IPv4 addresses (see _entry)
        head, size, lb, rb = r4.packed + l4.packed, 12, l4.packed, r4.packed
    else:
        lb, rb = IPv6Address(int(local)).packed, IPv6Address(int(remote)).packed
        head, size = rb + lb, TUPLE_SIZE
    n = len(ports)
    buf = bytearray(ENTRY_SIZE * n)
    pack_into, pad = ENTRY_IN.pack_into, bytes(TUPLE_SIZE - len(head) - 4)
    for i, p in enumerate(ports):
        pack_into(buf, i * ENTRY_SIZE, head + _PORTS.pack(rport, p) + pad, size)
    data = _run(lay, buf, n, extras)
    if isinstance(data, Unavailable):
        return data
    dec = BulkDecoder(Proto.TCP, lead=_LEAD, trail=ENTRY_SIZE - RECORD_AT - RECORD.size)
    want_dport = rport.to_bytes(2, "big")
    fam_i, lp_i, dp_i, f_i = dec.family, dec.lport, dec.dport, dec.faults
    out: list[PeerSocket] = []
    for i, (p, v) in enumerate(zip(ports, dec.rows(data), strict=True)):
        if not v[0]:
            continue
        if v[f_i]:
            return Unavailable(f"the socket on port {p} changed while it was read")
        if v[lp_i] != p or v[dp_i] != want_dport:
            continue  # fell through to a listener of the port: nothing holds this 4-tuple
        if v[fam_i] == Family.INET:
            if len(lb) != 4 or v[dec.rcv] != lb or v[dec.daddr] != rb:
                continue
        elif v[dec.rcv6] != _as16(lb) or v[dec.daddr6] != _as16(rb):
            continue
        ino = v[dec.bucket]
        st = dec.decode(v, data, i, v[dec.cookie], v[dec.uid])
        out.append((st, ino, v[dec.chain_after], v[dec.stamp] if ino else 0))
    return out
