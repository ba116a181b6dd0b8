"""The socket iterator programs and their stack frame (pure: no syscalls).

``build_sock_program``: a ``bpf_iter__tcp`` or ``bpf_iter__udp`` program (iterators: Linux 5.9,
commits 52d87d5f6418 and 2a7c26d5e3d8; bpf_seq_write: 5.8; bpf_get_socket_cookie from tracing
programs: 5.12). For each socket of the iterator's network namespace whose local port is a key
of the ``ports`` map, it either writes one fixed-size :data:`~.socklayout.RECORD` (``emit``) or adds one to
that port's counter for the socket's state (``count``, for the exporter).

What a record holds, and why each field matters to bind()/connect(), is in
:mod:`rebind.kernel.bpf.sockiter`. Every field is copied from the kernel's own structures at
offsets (and bit offsets: ``skc_reuse:4``) read from vmlinux BTF (:class:`~.socklayout.SockLayout`,
checked by :func:`check_layout`), never assumed; a copy that
faults is counted in the record's ``faults`` (the adapter then trusts nothing in it).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.socklayout import (
    ABSENT,
    CHAIN_HOPS,
    CHAIN_UNKNOWN,
    COUNT_STATES,
    KIND_REQUEST,
    KIND_TIMEWAIT,
    OPTIONAL_MEMBERS,
    REC,
    REC_SIZE,
    RECORD,
    SOCK_MEMBERS,
    SOCK_TARGETS,
    STOP_KEY,
    SockLayout,
)

# enum bpf_func_id (include/uapi/linux/bpf.h)
HELPER_GET_SOCKET_COOKIE = 46  # tracing programs: Linux 5.12 (bpf_get_socket_ptr_cookie_proto)
HELPER_SEQ_WRITE = 127

# include/net/tcp_states.h
TCP_TIME_WAIT = 6
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12


class SockFrame:
    """The program's one stack frame."""

    SCRATCH: Final = -8  # u64: where a pointer or a bitfield's bytes are copied first
    KEY: Final = -16  # u32: the local port, key of the ports map
    RECORD: Final = -16 - RECORD.size  # the record, built in place and written at once


FRAME_SLOTS: tuple[tuple[str, int, int], ...] = (
    ("SCRATCH", SockFrame.SCRATCH, 8),
    ("KEY", SockFrame.KEY, 4),
    ("RECORD", SockFrame.RECORD, RECORD.size),
)

_BUCKET2 = (
    "inet_connection_sock.icsk_bind2_hash",
    "inet_timewait_sock.tw_tb2",
    "inet_bind2_bucket.fastreuse",
    "inet_bind2_bucket.fastreuseport",
)
#: Structs whose first member must be the one before them (the programs use one pointer for both).
_PREFIXES = (
    "sock.__sk_common",
    "udp_sock.inet.sk",
    "inet_connection_sock.icsk_inet.sk",
    "inet_timewait_sock.__tw_common",
    "tcp_timewait_sock.tw_sk",
    "hlist_node.next",
)


def sock_layout_from_btf(data: bytes) -> SockLayout:
    b = btfmod.BTF(data)
    structs = sorted({s for s, _ in (*SOCK_MEMBERS, *OPTIONAL_MEMBERS)})
    ids = b.find_all(
        [*((t, btfmod.KIND_FUNC) for t in SOCK_TARGETS), *((s, btfmod.KIND_STRUCT) for s in structs)]
    )
    bits: dict[str, btfmod.Bits] = {}
    for s, m in SOCK_MEMBERS:
        bits[f"{s}.{m}"] = b.bits(ids[s, btfmod.KIND_STRUCT], m)
    for s, m in OPTIONAL_MEMBERS:
        try:
            bits[f"{s}.{m}"] = b.bits(ids[s, btfmod.KIND_STRUCT], m)
        except btfmod.BTFError:
            pass
    lay = SockLayout({t: ids[t, btfmod.KIND_FUNC] for t in SOCK_TARGETS}, bits)
    check_layout(lay)
    return lay


def check_layout(lay: SockLayout) -> None:
    """What the programs assume of the layout, checked rather than trusted."""
    for key in _PREFIXES:
        if lay.bits[key].bit_offset != 0:
            raise btfmod.BTFError(f"{key} is not at offset 0")
    for key in ("uid", "meta", "sk_common"):
        _ctx_size(lay, f"bpf_iter__tcp.{key}")
    for key in ("uid", "meta", "udp_sk", "bucket"):
        _ctx_size(lay, f"bpf_iter__udp.{key}")
    for dest, src in (*((d, m) for _, d, m, _ in _COPIES), *_TCP_TW_COPIES):
        b = lay.bits.get(src)
        if b is not None and b.bit_size > 8 * REC_SIZE[dest]:
            raise btfmod.BTFError(f"{src} ({b.bit_size} bits) does not fit the record's {dest}")


def _ctx_size(lay: SockLayout, key: str) -> None:
    b = lay.bits[key]
    want = 32 if key.endswith((".uid", ".bucket")) else 64
    if b.bit_size != want or b.bit_offset % 64:
        raise btfmod.BTFError(f"{key}: {b.bit_size} bits at bit {b.bit_offset}, expected {want} at a u64")


# ---------------------------------------------------------------------------------------------
# The program

#: (which sockets, record field, member, base): copied for every reported socket of that kind.
#: base "sk": the iterator's socket pointer; "tb": the inet_bind_bucket pointer.
_COMMON, _FULL, _TW, _BUCKET = "common", "full", "tw", "bucket"
_COPIES: tuple[tuple[str, str, str, str], ...] = (
    (_COMMON, "family", "sock_common.skc_family", "sk"),
    (_COMMON, "state", "sock_common.skc_state", "sk"),
    (_COMMON, "reuse", "sock_common.skc_reuse", "sk"),
    (_COMMON, "reuseport", "sock_common.skc_reuseport", "sk"),
    (_COMMON, "ipv6only", "sock_common.skc_ipv6only", "sk"),
    (_COMMON, "bound_dev_if", "sock_common.skc_bound_dev_if", "sk"),
    (_COMMON, "lport", "sock_common.skc_num", "sk"),
    (_COMMON, "dport", "sock_common.skc_dport", "sk"),
    (_COMMON, "rcv_saddr", "sock_common.skc_rcv_saddr", "sk"),
    (_COMMON, "daddr", "sock_common.skc_daddr", "sk"),
    (_COMMON, "v6_rcv_saddr", "sock_common.skc_v6_rcv_saddr", "sk"),
    (_COMMON, "v6_daddr", "sock_common.skc_v6_daddr", "sk"),
    (_FULL, "userlocks", "sock.sk_userlocks", "sk"),
    (_FULL, "sk_uid", "sock.sk_uid", "sk"),
    (_TW, "tw_substate", "inet_timewait_sock.tw_substate", "sk"),
    (_TW, "tw_connect_bind", "inet_timewait_sock.tw_connect_bind", "sk"),
    (_BUCKET, "tb_port", "inet_bind_bucket.port", "tb"),
    (_BUCKET, "fastreuse", "inet_bind_bucket.fastreuse", "tb"),
    (_BUCKET, "fastreuseport", "inet_bind_bucket.fastreuseport", "tb"),
    (_BUCKET, "fastuid", "inet_bind_bucket.fastuid", "tb"),
    (_BUCKET, "fast_rcv_saddr", "inet_bind_bucket.fast_rcv_saddr", "tb"),
    (_BUCKET, "fast_v6_rcv_saddr", "inet_bind_bucket.fast_v6_rcv_saddr", "tb"),
    (_BUCKET, "fast_sk_family", "inet_bind_bucket.fast_sk_family", "tb"),
    (_BUCKET, "fast_ipv6_only", "inet_bind_bucket.fast_ipv6_only", "tb"),
)
_TCP_TW_COPIES = (
    ("tw_ts_recent", "tcp_timewait_sock.tw_ts_recent"),
    ("tw_ts_recent_stamp", "tcp_timewait_sock.tw_ts_recent_stamp"),
)


def _chain_after(p: asm.Program, e: _Emitter, lay: SockLayout) -> None:
    """chain_after = nodes after this socket in its udptable->hash chain (sk_node, the port's
    chain udp_lib_lport_inuse walks), counted along ``next`` up to CHAIN_HOPS (unrolled: no
    loop for the verifier). Sorting a port's sockets by it, largest first, gives chain order."""
    r1, r7, r8, fp = asm.R1, asm.R7, asm.R8, asm.FP
    at = SockFrame.RECORD + REC["chain_after"]
    p.store_imm(4, fp, at, CHAIN_UNKNOWN)
    e.pointer(r8, r7, "sock_common.skc_node")  # skc_node.next (next is its first member)
    for hop in range(CHAIN_HOPS + 1):
        # the end: NULL (hlist) or an odd "nulls" marker
        p.jump_imm(asm.JEQ, r8, 0, f"chain_end_{hop}")
        p.jump_imm(asm.JSET, r8, 1, f"chain_end_{hop}")
        if hop == CHAIN_HOPS:
            p.goto("chain_done")  # longer than we follow: unknown
            break
        e.pointer(r8, r8, "hlist_node.next")
    for hop in range(CHAIN_HOPS + 1):
        p.label(f"chain_end_{hop}")
        p.mov_imm(r1, hop)
        p.goto("chain_store")
    p.label("chain_store")
    p.store(4, fp, at, r1)
    p.label("chain_done")


class Maps(NamedTuple):
    ports: int  # HASH: local port (u32) -> COUNT_VALUE; the ports asked about


class _Emitter:
    """Instruction helpers over one asm.Program: r6 ctx, r7 socket, r8 bucket, r9 faults."""

    def __init__(self, p: asm.Program, lay: SockLayout) -> None:
        self.p, self.lay, self.n = p, lay, 0

    def _label(self, what: str) -> str:
        self.n += 1
        return f"{what}_{self.n}"

    def probe_read(self, dst_fp_off: int, size: int, base: int, off: int) -> None:
        """*(fp + dst) = size bytes at base + off; a fault counts in r9 and leaves the bytes."""
        p = self.p
        p.probe_read(dst_fp_off, size, base, off)
        ok = self._label("read_ok")
        p.jump_imm(asm.JEQ, asm.R0, 0, ok)
        p.alu_imm(asm.ADD, asm.R9, 1)
        p.label(ok)

    def copy(self, dest: str, member: str, base: int) -> None:
        """The record's ``dest`` = the member at ``base``, a whole member or a bitfield."""
        p, rec = self.p, SockFrame.RECORD + REC[dest]
        b = self.lay.bits.get(member)
        if b is None:  # an OPTIONAL_MEMBERS entry this kernel lacks
            p.store_imm(1, asm.FP, rec, ABSENT)
            return
        if b.bit_offset % 8 == 0 and b.bit_size % 8 == 0:
            self.probe_read(rec, b.bit_size // 8, base, b.bit_offset // 8)
            return
        # a bitfield: copy the bytes it spans, shift and mask (little-endian bit numbering)
        shift = b.bit_offset % 8
        span = (shift + b.bit_size + 7) // 8
        if span > 8 or REC_SIZE[dest] != 1:
            raise btfmod.BTFError(f"{member}: bitfield of {b.bit_size} bits not supported")
        p.store_imm(8, asm.FP, SockFrame.SCRATCH, 0)
        self.probe_read(SockFrame.SCRATCH, span, base, b.bit_offset // 8)
        p.load(8, asm.R1, asm.FP, SockFrame.SCRATCH)
        if shift:
            p.alu_imm(asm.RSH, asm.R1, shift)
        p.alu_imm(asm.AND, asm.R1, (1 << b.bit_size) - 1)
        p.store(1, asm.FP, rec, asm.R1)

    def pointer(self, dst: int, base: int, member: str) -> None:
        """dst = the pointer member at base (via SCRATCH; 0 if the copy faulted)."""
        self.p.store_imm(8, asm.FP, SockFrame.SCRATCH, 0)
        self.probe_read(SockFrame.SCRATCH, 8, base, self.lay[member])
        self.p.load(8, dst, asm.FP, SockFrame.SCRATCH)


def build_sock_program(
    lay: SockLayout, maps: Maps, *, proto: str, count: bool, listeners_only: bool = False
) -> bytes:
    """The ``bpf_iter__tcp`` (``proto="tcp"``) or ``bpf_iter__udp`` program.

    r6 ctx, r7 the socket (struct sock_common * / struct udp_sock *, sock_common first),
    r8 the bind bucket, r9 faults of this record.

    ``listeners_only`` (TCP): stop the walk at the first socket that is not listening.
    bpf_iter_tcp walks the listening hash (lhash2: TCP_LISTEN sockets only) before the
    established hash (net/ipv4/tcp_ipv4.c, bpf_iter_tcp_batch), so that socket is the first of
    the ehash, and stopping there skips the walk of every connection and TIME_WAIT, the bulk of
    the iterator's cost on a busy host. The program returns 1, which bpf_iter_run_prog turns
    into -EAGAIN for show(): bpf_seq_read then ends the read with what it has and fails the
    next one with EAGAIN; first it sets the STOP_KEY counter, so the reader can tell this stop
    from the iterator's own EAGAIN after a million objects without output.
    """
    if proto not in ("tcp", "udp"):
        raise ValueError(proto)
    if listeners_only and (proto != "tcp" or count):
        raise ValueError("listeners_only: TCP records only")
    p = asm.Program()
    e = _Emitter(p, lay)
    r0, r1, r3, r6, r7, r8, r9, fp = asm.R0, asm.R1, asm.R3, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP
    ctx = "bpf_iter__tcp" if proto == "tcp" else "bpf_iter__udp"
    sk_member = "sk_common" if proto == "tcp" else "udp_sk"
    F, rec = SockFrame, SockFrame.RECORD

    p.mov(r6, r1)
    p.load(8, r7, r6, lay[f"{ctx}.{sk_member}"])
    p.jump_imm(asm.JEQ, r7, 0, "out")  # the final call, from seq stop
    p.mov_imm(r9, 0)
    if listeners_only:
        _stop_after_listeners(p, e, lay, maps)
    # the local port: key of the ports map (u16 skc_num, zero-extended into the u32 key)
    p.store_imm(8, fp, F.SCRATCH, 0)
    e.probe_read(F.SCRATCH, 2, r7, lay["sock_common.skc_num"])
    p.jump_imm(asm.JNE, r9, 0, "out")
    p.load(4, r1, fp, F.SCRATCH)
    p.store(4, fp, F.KEY, r1)
    p.map_lookup(maps.ports, F.KEY, "out")
    if count:
        # counters[skc_state & 15] += 1: one reader runs the iterator, so no atomics are needed
        p.mov(r8, r0)
        p.store_imm(8, fp, F.SCRATCH, 0)
        e.probe_read(F.SCRATCH, 1, r7, lay["sock_common.skc_state"])
        p.jump_imm(asm.JNE, r9, 0, "out")
        p.load(1, r1, fp, F.SCRATCH)
        p.alu_imm(asm.AND, r1, COUNT_STATES - 1)
        p.alu_imm(asm.LSH, r1, 3)
        p.alu(asm.ADD, r8, r1)
        p.load(8, r1, r8, 0)
        p.alu_imm(asm.ADD, r1, 1)
        p.store(8, r8, 0, r1)
        p.goto("out")
    else:
        _emit_record(p, e, lay, ctx, proto)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    del r3, rec
    return p.assemble()


def _stop_after_listeners(p: asm.Program, e: _Emitter, lay: SockLayout, maps: Maps) -> None:
    """Return 1 (stop) at the first socket not in TCP_LISTEN, after marking STOP_KEY."""
    r0, r1, r7, r9, fp = asm.R0, asm.R1, asm.R7, asm.R9, asm.FP
    F = SockFrame
    p.store_imm(8, fp, F.SCRATCH, 0)
    e.probe_read(F.SCRATCH, 1, r7, lay["sock_common.skc_state"])
    p.jump_imm(asm.JNE, r9, 0, "out")  # unreadable: skip the socket, do not stop on a guess
    p.load(1, r1, fp, F.SCRATCH)
    p.jump_imm(asm.JEQ, r1, TCP_LISTEN, "listening")
    p.store_imm(4, fp, F.KEY, STOP_KEY)
    p.map_lookup(maps.ports, F.KEY, "stop")
    p.store_imm(8, r0, 0, 1)
    p.label("stop")
    p.mov_imm(r0, 1)
    p.exit()
    p.label("listening")


def emit_socket_fields(p: asm.Program, e: _Emitter, lay: SockLayout, *, tcp: bool) -> None:
    """The record's fields from the socket at r7, up to (not including) the label ``emit``:
    sock_common's, its network namespace, then by kind -- a request sock (NEW_SYN_RECV) only
    its kind, a TIME_WAIT (TCP) its own and its buckets, a full socket its own and (TCP) its
    buckets. Shared by the iterator program and the lookup program (kernel/bpf/socklookup.py),
    which hand it the same frame, r7 and r9 (faults).
    """
    r1, r3, r7, r8, fp = asm.R1, asm.R3, asm.R7, asm.R8, asm.FP
    rec = SockFrame.RECORD
    for group, dest, member, _ in _COPIES:
        if group == _COMMON:
            e.copy(dest, member, r7)
    # the socket's network namespace: skc_net.net->ns.inum
    e.pointer(r3, r7, "sock_common.skc_net")
    p.jump_imm(asm.JEQ, r3, 0, "netns_done")
    e.probe_read(rec + REC["netns"], 4, r3, lay["net.ns.inum"])
    p.label("netns_done")
    p.mov_imm(r8, 0)  # no bind bucket known yet
    p.load(1, r1, fp, rec + REC["state"])
    p.jump_imm(asm.JEQ, r1, TCP_NEW_SYN_RECV, "request")
    if tcp:
        p.jump_imm(asm.JEQ, r1, TCP_TIME_WAIT, "timewait")
    # a full socket (struct sock): UDP's are always full; TCP's listen or are connected
    for group, dest, member, _ in _COPIES:
        if group == _FULL:
            e.copy(dest, member, r7)
    if tcp:
        e.pointer(r8, r7, "inet_connection_sock.icsk_bind_hash")
    p.goto("bucket")
    p.label("request")
    # a request_sock (NEW_SYN_RECV): only sock_common is its own; it has no bucket of its own
    p.store_imm(1, fp, rec + REC["kind"], KIND_REQUEST)
    p.goto("emit")
    if tcp:
        p.label("timewait")
        p.store_imm(1, fp, rec + REC["kind"], KIND_TIMEWAIT)
        for group, dest, member, _ in _COPIES:
            if group == _TW:
                e.copy(dest, member, r7)
        for dest, member in _TCP_TW_COPIES:
            e.copy(dest, member, r7)
        e.pointer(r8, r7, "inet_timewait_sock.tw_tb")
    p.label("bucket")
    p.jump_imm(asm.JEQ, r8, 0, "bucket2")
    p.store_imm(1, fp, rec + REC["has_bucket"], 1)
    for group, dest, member, _ in _COPIES:
        if group == _BUCKET:
            e.copy(dest, member, r8)
    p.label("bucket2")
    if tcp and all(k in lay.bits for k in _BUCKET2):
        # the (port, address) bucket, whose own fastreuse/fastreuseport 6.18 keeps (requests
        # went to "emit" above: only full sockets and TIME_WAITs come here)
        p.load(1, r1, fp, rec + REC["kind"])
        p.jump_imm(asm.JEQ, r1, KIND_TIMEWAIT, "bucket2_tw")
        e.pointer(r8, r7, "inet_connection_sock.icsk_bind2_hash")
        p.goto("bucket2_read")
        p.label("bucket2_tw")
        e.pointer(r8, r7, "inet_timewait_sock.tw_tb2")
        p.label("bucket2_read")
        p.jump_imm(asm.JEQ, r8, 0, "emit")
        p.load(1, r1, fp, rec + REC["has_bucket"])
        p.alu_imm(asm.OR, r1, 2)
        p.store(1, fp, rec + REC["has_bucket"], r1)
        e.copy("tb2_fastreuse", "inet_bind2_bucket.fastreuse", r8)
        e.copy("tb2_fastreuseport", "inet_bind2_bucket.fastreuseport", r8)


def _emit_record(p: asm.Program, e: _Emitter, lay: SockLayout, ctx: str, proto: str) -> None:
    r0, r1, r2, r3, r6, r7, r9, fp = asm.R0, asm.R1, asm.R2, asm.R3, asm.R6, asm.R7, asm.R9, asm.FP
    rec = SockFrame.RECORD
    for off in range(0, RECORD.size, 8):
        p.store_imm(8, fp, rec + off, 0)
    # the cookie inet_diag reports too (sock_gen_cookie: made on first ask, then fixed)
    p.mov(r1, r7)
    p.call(HELPER_GET_SOCKET_COOKIE)
    p.store(8, fp, rec + REC["cookie"], r0)
    p.load(8, r1, r6, lay[f"{ctx}.meta"])
    p.load(8, r2, r1, lay["bpf_iter_meta.seq_num"])
    p.store(8, fp, rec + REC["seq_num"], r2)
    p.load(4, r1, r6, lay[f"{ctx}.uid"])
    p.store(4, fp, rec + REC["uid"], r1)
    if proto == "udp":
        p.load(4, r1, r6, lay["bpf_iter__udp.bucket"])
        p.store(4, fp, rec + REC["bucket"], r1)
    emit_socket_fields(p, e, lay, tcp=proto == "tcp")
    p.label("emit")
    if proto == "udp":
        _chain_after(p, e, lay)
    p.store(4, fp, rec + REC["faults"], r9)
    p.load(8, r1, r6, lay[f"{ctx}.meta"])
    p.load(8, r1, r1, lay["bpf_iter_meta.seq"])
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, rec)
    p.mov_imm(r3, RECORD.size)
    p.call(HELPER_SEQ_WRITE)
    del r0
