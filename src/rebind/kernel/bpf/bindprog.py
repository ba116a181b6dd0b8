"""The bind-hash programs (pure: no syscalls): :func:`build_bucket_program` (one port's bind
bucket(s) per run, :func:`~.bindhash.read_port_buckets`) and :func:`build_owners_program` (every
socket of one port's buckets, :func:`~.bindhash.read_port_owners`).

Both start alike: the caller's ``struct net`` (``bpf_get_current_task()->nsproxy->net_ns``,
helper 35: a networking program may call it with CAP_PERFMON, bpf_base_func_proto) and its bind
hash are found once and kept in the state map (:class:`NetState`), then the port's chain is
``bhash[(port + net->hash_mix) & (bhash_size - 1)].chain`` (inet_bhashfn). Every kernel read is
a bpf_probe_read_kernel (nothing is locked; see :mod:`.bindhash` for the races), with offsets
from :class:`~.bindhashlayout.BindHashLayout`.
"""

from __future__ import annotations

from typing import Final

from rebind.kernel.bpf import asm
from rebind.kernel.bpf.bindhashlayout import (
    BIND2_HOPS,
    BIND2_TRUNCATED,
    CHAIN_HOPS,
    CHAIN_TRUNCATED,
    ENT,
    FAULTED,
    INCONSISTENT,
    MEMBERS,
    OWNER_HOPS,
    OWNERS_TRUNCATED,
    RAN,
    BindHashLayout,
)

HELPER_GET_CURRENT_TASK = 35


class NetState:
    """The counter map's one value: the next entry's index, then what the first run found once
    for all (the caller's namespace and its bind hash)."""

    INDEX: Final = 0  # u32
    READY: Final = 4  # u32: 1 once the fields below are set
    NET: Final = 8  # u64: struct net *
    BHASH: Final = 16  # u64: hashinfo->bhash
    MASK: Final = 24  # u32: bhash_size - 1
    HASH_MIX: Final = 28  # u32: net->hash_mix
    SIZE: Final = 32


class BucketFrame:
    """The bucket program's stack frame (8-aligned slots; the spans are copied whole)."""

    KEY: Final = -8  # u32: a map key
    SCRATCH: Final = -16  # u64: a copied pointer or number
    NODE: Final = -24  # u64: the chain's next inet_bind_bucket.node
    B2: Final = -32  # u64: the next inet_bind2_bucket.bhash_node
    OWN: Final = -40  # u64: the next owner's skc_bind_node
    HOP: Final = -48  # u64 loop counters: chain, bind2, owners
    HOP2: Final = -56
    HOP3: Final = -64
    TB: Final = -64 - 128  # the inet_bind_bucket's first bytes (SPAN_MAX)
    TB2: Final = -64 - 256  # the inet_bind2_bucket's first bytes


def _read(p: asm.Program, dst: int, size: int, src: int, off: int) -> None:
    """fp + dst = size bytes at src + off. A fault is OR-ed into r9 without a branch (a branch
    per copy would multiply the verifier's pending states along the bounded loops); the helper
    zeroes the bytes then, so a faulted link reads as the list's end."""
    p.probe_read(dst, size, src, off)
    p.alu(asm.OR, asm.R9, asm.R0)


def _pointer(p: asm.Program, dst: int, src: int, off: int) -> None:
    """dst = the u64 at src + off (via SCRATCH; 0 if the copy faulted)."""
    _read(p, BucketFrame.SCRATCH, 8, src, off)
    p.load(8, dst, asm.FP, BucketFrame.SCRATCH)


def _copy(p: asm.Program, src_fp: int, size: int, dst_off: int) -> None:
    """entry (r7) + dst_off = size bytes of the stack at fp + src_fp, in naturally aligned
    pieces (the verifier wants aligned stack loads)."""
    at = 0
    while at < size:
        piece = next(
            n for n in (8, 4, 2, 1) if size - at >= n and (src_fp + at) % n == 0 and (dst_off + at) % n == 0
        )
        p.load(piece, asm.R1, asm.FP, src_fp + at)
        p.store(piece, asm.R7, dst_off + at, asm.R1)
        at += piece


def _set_flag(p: asm.Program, flag: int) -> None:
    p.load(1, asm.R1, asm.R7, ENT["flags"])
    p.alu_imm(asm.OR, asm.R1, flag)
    p.store(1, asm.R7, ENT["flags"], asm.R1)


def find_net(p: asm.Program, lay: BindHashLayout) -> None:
    """Once (NetState.READY): current->nsproxy->net_ns, its hash_mix, its bind hash. A fault or
    a NULL on the way fails this entry (and the next run tries again)."""
    r0, r1, r8, r9, fp = asm.R0, asm.R1, asm.R8, asm.R9, asm.FP
    F, S = BucketFrame, NetState
    p.load(4, r1, r8, S.READY)
    p.jump_imm(asm.JNE, r1, 0, "ready")
    p.call(HELPER_GET_CURRENT_TASK)
    _pointer(p, r1, r0, lay["task_struct.nsproxy"])
    p.jump_imm(asm.JEQ, r1, 0, "fault")
    _pointer(p, r1, r1, lay["nsproxy.net_ns"])
    p.jump_imm(asm.JEQ, r1, 0, "fault")
    p.store(8, r8, S.NET, r1)
    p.store_imm(8, fp, F.SCRATCH, 0)
    _read(p, F.SCRATCH, 4, r1, lay["net.hash_mix"])
    p.load(4, r1, fp, F.SCRATCH)
    p.store(4, r8, S.HASH_MIX, r1)
    p.load(8, r1, r8, S.NET)
    _pointer(p, r1, r1, lay["net.ipv4.tcp_death_row.hashinfo"])
    p.jump_imm(asm.JEQ, r1, 0, "fault")
    p.store(8, fp, F.NODE, r1)  # hashinfo, for a moment
    _pointer(p, r1, r1, lay["inet_hashinfo.bhash"])
    p.jump_imm(asm.JEQ, r1, 0, "fault")
    p.store(8, r8, S.BHASH, r1)
    p.load(8, r1, fp, F.NODE)
    p.store_imm(8, fp, F.SCRATCH, 0)
    _read(p, F.SCRATCH, 4, r1, lay["inet_hashinfo.bhash_size"])
    p.load(4, r1, fp, F.SCRATCH)
    p.jump_imm(asm.JEQ, r1, 0, "fault")
    p.jump_imm(asm.JNE, r9, 0, "fault")
    p.alu_imm(asm.SUB, r1, 1)
    p.store(4, r8, S.MASK, r1)
    p.store_imm(4, r8, S.READY, 1)
    p.label("ready")


def build_bucket_program(lay: BindHashLayout, ctr_fd: int, io_fd: int, *, owners: bool = False) -> bytes:
    """One run: entry = io[state.index++]; walk the port's bhash chain; fill the entry.

    ``owners``: count the owners too (up to OWNER_HOPS per bind2 bucket). Each is a socket of
    its own, a cache miss: on bench/mkload.py's load that is ~10x the cost of the chain walks
    (docs/benchmarks.md), so it is asked for, not the default.

    r6 the port, r7 the entry, r8 the NetState, r9 the copies' errors OR-ed. The loops are
    bounded (CHAIN_HOPS; then, for the first matched bucket, BIND2_HOPS x OWNER_HOPS; counters on
    the stack, which the verifier follows hop by hop) and run one after the other, not nested,
    so that the verifier's pending states add up rather than multiply."""
    p = asm.Program()
    r0, r1, r2, r6, r7, r8, r9, fp = asm.R0, asm.R1, asm.R2, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP
    F, S = BucketFrame, NetState
    p.store_imm(4, fp, F.KEY, 0)
    p.map_lookup(ctr_fd, F.KEY, "out")
    p.mov(r8, r0)
    p.load(4, r1, r8, S.INDEX)
    p.mov(r2, r1)
    p.alu_imm(asm.ADD, r2, 1)
    p.store(4, r8, S.INDEX, r2)
    p.store(4, fp, F.KEY, r1)
    p.map_lookup(io_fd, F.KEY, "out")
    p.mov(r7, r0)
    p.load(2, r6, r7, ENT["port"])
    p.mov_imm(r9, 0)
    find_net(p, lay)
    chain_head(p, lay)
    p.store(8, fp, F.NODE, r1)
    p.store_imm(8, fp, F.HOP, 0)
    p.store_imm(8, fp, F.B2, 0)
    _chain_loop(p, lay)
    p.store_imm(8, fp, F.HOP2, 0)
    _bind2_loop(p, lay, owners)
    p.jump_imm(asm.JNE, r9, 0, "fault")
    _set_flag(p, RAN)
    p.goto("out")
    p.label("fault")
    _set_flag(p, RAN | FAULTED)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    return p.assemble()


def chain_head(p: asm.Program, lay: BindHashLayout) -> None:
    """r1 = the first node of port r6's chain, &bhash[(port + hash_mix) & mask].chain's first
    (inet_bhashfn), from the NetState at r8."""
    r1, r3, r6, r8 = asm.R1, asm.R3, asm.R6, asm.R8
    S = NetState
    p.load(4, r3, r8, S.HASH_MIX)
    p.alu(asm.ADD, r3, r6)
    p.load(4, r1, r8, S.MASK)
    p.alu(asm.AND, r3, r1)
    p.alu_imm(asm.MUL, r3, lay.size("inet_bind_hashbucket"))
    p.load(8, r1, r8, S.BHASH)
    p.alu(asm.ADD, r3, r1)
    _pointer(p, r1, r3, lay["inet_bind_hashbucket.chain"] + lay["hlist_head.first"])


def _hop(p: asm.Program, slot: int, bound: int, over: str) -> None:
    """if (*slot >= bound) goto over; *slot += 1."""
    p.load(8, asm.R2, asm.FP, slot)
    p.jump_imm(asm.JGE, asm.R2, bound, over)
    p.alu_imm(asm.ADD, asm.R2, 1)
    p.store(8, asm.FP, slot, asm.R2)


def _chain_loop(p: asm.Program, lay: BindHashLayout) -> None:
    """Every bucket of the chain: count those of this net and port (inet_bind_bucket_match:
    l3mdev apart); copy the first one's fields and keep its bhash2 list's head in B2."""
    r1, r2, r3, r6, r7, r8, fp = asm.R1, asm.R2, asm.R3, asm.R6, asm.R7, asm.R8, asm.FP
    F, S = BucketFrame, NetState
    tb = "inet_bind_bucket"
    node = lay[f"{tb}.node"]
    p.label("chain")
    p.load(8, r3, fp, F.NODE)
    p.jump_imm(asm.JEQ, r3, 0, "chain_end")
    _hop(p, F.HOP, CHAIN_HOPS, "chain_truncated")
    _read(p, F.TB, lay.span(tb), r3, -node)
    p.load(8, r1, fp, F.TB + node)
    p.store(8, fp, F.NODE, r1)
    p.load(8, r1, fp, F.TB + lay[f"{tb}.ib_net.net"])
    p.load(8, r2, r8, S.NET)
    p.jump_reg(asm.JNE, r1, r2, "chain")
    p.load(2, r1, fp, F.TB + lay[f"{tb}.port"])
    p.jump_reg(asm.JNE, r1, r6, "chain")
    p.load(1, r1, r7, ENT["matched"])
    p.mov(r2, r1)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(1, r7, ENT["matched"], r1)
    p.jump_imm(asm.JNE, r2, 0, "chain")  # the first (newest) bucket's fields only
    for name in ("fastreuse", "fastreuseport", "l3mdev"):
        _copy(p, F.TB + lay[f"{tb}.{name}"], _SIZE[name], ENT[name])
    p.load(8, r1, fp, F.TB + lay[f"{tb}.bhash2"] + lay["hlist_head.first"])
    p.store(8, fp, F.B2, r1)
    # the fast-reuse cache, only where the kernel keeps it (fastreuseport > 0: s8 1..127)
    p.load(1, r1, fp, F.TB + lay[f"{tb}.fastreuseport"])
    p.jump_imm(asm.JEQ, r1, 0, "chain")
    p.jump_imm(asm.JGE, r1, 0x80, "chain")
    for name in ("fastuid", "fast_sk_family", "fast_ipv6_only", "fast_rcv_saddr", "fast_v6_rcv_saddr"):
        _copy(p, F.TB + lay[f"{tb}.{name}"], _SIZE[name], ENT[name])
    p.goto("chain")
    p.label("chain_truncated")
    _set_flag(p, CHAIN_TRUNCATED)
    p.label("chain_end")


def _bind2_loop(p: asm.Program, lay: BindHashLayout, owners: bool) -> None:
    """Count the first matched bucket's bind2 buckets (from B2), and their owners if asked."""
    r1, r2, r3, r6, r7, r8, fp = asm.R1, asm.R2, asm.R3, asm.R6, asm.R7, asm.R8, asm.FP
    F, S = BucketFrame, NetState
    tb2 = "inet_bind2_bucket"
    node = lay[f"{tb2}.bhash_node"]
    p.label("b2")
    p.load(8, r3, fp, F.B2)
    p.jump_imm(asm.JEQ, r3, 0, "b2_end")
    _hop(p, F.HOP2, BIND2_HOPS, "b2_truncated")
    _read(p, F.TB2, lay.span(tb2), r3, -node)
    p.load(8, r1, fp, F.TB2 + node)
    p.store(8, fp, F.B2, r1)
    # not freed and reused meanwhile (kmem_cache_free, no RCU grace): same net, same port
    p.load(8, r1, fp, F.TB2 + lay[f"{tb2}.ib_net.net"])
    p.load(8, r2, r8, S.NET)
    p.jump_reg(asm.JNE, r1, r2, "b2_inconsistent")
    p.load(2, r1, fp, F.TB2 + lay[f"{tb2}.port"])
    p.jump_reg(asm.JNE, r1, r6, "b2_inconsistent")
    p.load(2, r1, r7, ENT["bind2"])
    p.alu_imm(asm.ADD, r1, 1)
    p.store(2, r7, ENT["bind2"], r1)
    if not owners:
        p.goto("b2")
        _bind2_end(p)
        return
    p.load(8, r1, fp, F.TB2 + lay[f"{tb2}.owners"] + lay["hlist_head.first"])
    p.store(8, fp, F.OWN, r1)
    p.store_imm(8, fp, F.HOP3, 0)
    p.label("own")
    p.load(8, r3, fp, F.OWN)
    p.jump_imm(asm.JEQ, r3, 0, "b2")
    _hop(p, F.HOP3, OWNER_HOPS, "own_truncated")
    p.load(4, r1, r7, ENT["owners"])
    p.alu_imm(asm.ADD, r1, 1)
    p.store(4, r7, ENT["owners"], r1)
    # skc_bind_node.next (hlist_node.next, offset 0: check_layout)
    _pointer(p, r1, r3, lay["hlist_node.next"])
    p.store(8, fp, F.OWN, r1)
    p.goto("own")
    p.label("own_truncated")
    _set_flag(p, OWNERS_TRUNCATED)
    p.goto("b2")
    _bind2_end(p)


def _bind2_end(p: asm.Program) -> None:
    p.label("b2_inconsistent")
    _set_flag(p, INCONSISTENT)
    p.goto("b2_end")
    p.label("b2_truncated")
    _set_flag(p, BIND2_TRUNCATED)
    p.label("b2_end")


#: Bytes each copied member fills in the entry (its size in the kernel: bindhashlayout.MEMBERS).
_SIZE = {m: size for s, m, size in MEMBERS if s == "inet_bind_bucket"}
