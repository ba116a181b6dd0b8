"""A TCP port's bind bucket, read straight from the kernel's bind hash: no walk of the sockets.

bind() and connect() decide by the port's bind bucket (inet_csk_get_port, __inet_hash_connect),
found by hashing the port (inet_bhashfn: ``(port + net->hash_mix) & (bhash_size - 1)``) and
matching (inet_bind_bucket_match: same ``net``, same port; l3mdev may make more than one). Every
other reader of rebind walks a socket table for it: inet_diag's dump (~20-100 ms on a 211k-socket
namespace) or the BPF tcp iterator (~130 ms). Here the program does what the kernel does: one
hash chain per port (:mod:`.bindhashlayout` has the structures and the offsets, all from BTF).

The program is a ``BPF_PROG_TYPE_SCHED_CLS`` run by ``BPF_PROG_TEST_RUN`` (as
:mod:`.socklookup`'s), ``repeat`` = one run per port: it takes the next port from an mmapable
array map, finds its namespace once (``bpf_get_current_task()->nsproxy->net_ns``: the test run
runs in the caller's task; helper 35 is allowed in networking programs with CAP_PERFMON,
bpf_base_func_proto, 5.x+) and caches it with the hash's address in a counter map, then walks
the chain. Nothing is locked (the kernel walks it under the bucket's spinlock): every copy goes
through bpf_probe_read_kernel, inet_bind_bucket is freed by kfree_rcu (the test run holds
rcu_read_lock) but inet_bind2_bucket by a plain kmem_cache_free, so a bind2 bucket is re-checked
(port, net) before it is counted, every walk is bounded, and what went wrong is flagged in the
entry (:class:`~rebind.model.sockstate.PortBucket`: ``faulted``, ``chain_truncated``).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from rebind.errors import RebindError
from rebind.kernel.bpf import asm
from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.bindhashlayout import (
    BIND2_HOPS,
    BIND2_TRUNCATED,
    CHAIN_HOPS,
    CHAIN_TRUNCATED,
    ENT,
    ENTRY,
    ENTRY_NAMES,
    FAULTED,
    INCONSISTENT,
    MEMBERS,
    OWNER_HOPS,
    OWNERS_TRUNCATED,
    RAN,
    SIZED,
    BindHashLayout,
    decode_layout,
    encode_layout,
    layout_from_btf,
)
from rebind.kernel.bpf.layoutcache import layout_cache
from rebind.kernel.bpf.socklookup import _test_run
from rebind.kernel.bpf.syscall import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    SOCKET_LOOKUP,
    BPFUnavailable,
    check_bpf_environment,
    load_program,
    map_create,
)
from rebind.model.sockstate import PortBucket, Unavailable

HELPER_GET_CURRENT_TASK = 35

#: Reading the layout walks most of vmlinux BTF (task_struct, net): cached per boot.
LAYOUT_CACHE = layout_cache(
    "bpf-bindhash-layout",
    1,
    (MEMBERS, SIZED),
    build=layout_from_btf,
    encode=encode_layout,
    decode=decode_layout,
)


def load_layout(*, use_cache: bool = True) -> BindHashLayout:
    return LAYOUT_CACHE.load(use_cache=use_cache)


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


def _find_net(p: asm.Program, lay: BindHashLayout) -> None:
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


def build_bucket_program(lay: BindHashLayout, ctr_fd: int, io_fd: int) -> bytes:
    """One run: entry = io[state.index++]; walk the port's bhash chain; fill the entry.

    r6 the port, r7 the entry, r8 the NetState, r9 the copies' errors OR-ed. The loops are
    bounded (CHAIN_HOPS; then, for the first matched bucket, BIND2_HOPS x OWNER_HOPS; counters on
    the stack, which the verifier follows hop by hop) and run one after the other, not nested,
    so that the verifier's pending states add up rather than multiply."""
    p = asm.Program()
    r0, r1, r2, r3, r6, r7, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
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
    _find_net(p, lay)
    # the chain's head: &bhash[(port + hash_mix) & mask].chain (inet_bhashfn)
    p.load(4, r3, r8, S.HASH_MIX)
    p.alu(asm.ADD, r3, r6)
    p.load(4, r1, r8, S.MASK)
    p.alu(asm.AND, r3, r1)
    p.alu_imm(asm.MUL, r3, lay.size("inet_bind_hashbucket"))
    p.load(8, r1, r8, S.BHASH)
    p.alu(asm.ADD, r3, r1)
    _pointer(p, r1, r3, lay["inet_bind_hashbucket.chain"] + lay["hlist_head.first"])
    p.store(8, fp, F.NODE, r1)
    p.store_imm(8, fp, F.HOP, 0)
    p.store_imm(8, fp, F.B2, 0)
    _chain_loop(p, lay)
    p.store_imm(8, fp, F.HOP2, 0)
    _bind2_loop(p, lay)
    p.jump_imm(asm.JNE, r9, 0, "fault")
    _set_flag(p, RAN)
    p.goto("out")
    p.label("fault")
    _set_flag(p, RAN | FAULTED)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    return p.assemble()


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


def _bind2_loop(p: asm.Program, lay: BindHashLayout) -> None:
    """Count the first matched bucket's bind2 buckets (from B2) and their owners."""
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
    p.label("b2_inconsistent")
    _set_flag(p, INCONSISTENT)
    p.goto("b2_end")
    p.label("b2_truncated")
    _set_flag(p, BIND2_TRUNCATED)
    p.label("b2_end")


#: Bytes each copied member fills in the entry (its size in the kernel: bindhashlayout.MEMBERS).
_SIZE = {m: size for s, m, size in MEMBERS if s == "inet_bind_bucket"}


# ---------------------------------------------------------------------------------------------
# running and decoding


class _Runner:
    """The maps and the loaded program, kept for the next call: the exporter asks for the whole
    ephemeral range each scrape, and loading the program (the verifier following the bounded
    loops hop by hop) costs more than the run itself (docs/benchmarks.md). Sized for
    ``capacity`` entries; a run of n ports fills and runs the first n. One caller at a time
    (_LOCK): the counter map is the run's cursor."""

    def __init__(self, lay: BindHashLayout, capacity: int) -> None:
        self.lay, self.capacity = lay, capacity
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        try:
            ctr = self._map(NetState.SIZE, 1)
            io = self._map(ENTRY.size, capacity)
            self.state, self.entries = self.maps
            self.prog = load_program(build_bucket_program(lay, ctr, io), prog=SOCKET_LOOKUP)
            self.fds.append(self.prog)
        except BaseException:
            self.close()
            raise

    def _map(self, value_size: int, n: int) -> int:
        fd = map_create(BPF_MAP_TYPE_ARRAY, 4, value_size, n, BPF_F_MMAPABLE)
        self.fds.append(fd)
        size = (value_size * n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self.maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        return fd

    def run(self, ports: list[int]) -> bytes:
        n = len(ports)
        # the cursor at 0 and the namespace unknown: this thread may have changed namespace
        self.state[: NetState.SIZE] = bytes(NetState.SIZE)
        self.entries[: ENTRY.size * n] = _inputs(ports)
        _test_run(self.prog, n)
        return self.entries[: ENTRY.size * n]

    def close(self) -> None:
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)
        self.maps, self.fds = [], []


_LOCK = threading.Lock()
_RUNNER: list[_Runner] = []


def _run_buckets(lay: BindHashLayout, ports: list[int]) -> bytes:
    """One test run, one repetition per port: the entries as the program left them."""
    with _LOCK:
        if _RUNNER and (_RUNNER[0].lay is not lay or _RUNNER[0].capacity < len(ports)):
            _RUNNER.pop().close()
        if not _RUNNER:
            _RUNNER.append(_Runner(lay, max(1024, 1 << (len(ports) - 1).bit_length())))
        try:
            return _RUNNER[0].run(ports)
        except BaseException:
            _RUNNER.pop().close()
            raise


def _inputs(ports: list[int]) -> bytes:
    """The map's contents before the run: each entry's port (u16, little-endian), the rest zero."""
    buf = bytearray(ENTRY.size * len(ports))
    raw = struct.pack(f"<{len(ports)}H", *ports)
    buf[0 :: ENTRY.size] = raw[0::2]
    buf[1 :: ENTRY.size] = raw[1::2]
    return bytes(buf)


def decode_buckets(ports: list[int], data: bytes) -> dict[int, PortBucket]:
    """The entries, one per port asked, as PortBuckets: equal entries (but for the port, which
    the program never writes) share one object, decoded once -- the ports of a client host hold
    a handful of distinct buckets, and decoding is most of a 28k-port read."""
    memo: dict[bytes, PortBucket] = {}
    get = memo.get
    found: list[PortBucket] = []
    keep = found.append
    for (rest,) in _REST.iter_unpack(data):
        got = get(rest)
        if got is None:
            got = memo[rest] = decode_entry(ENTRY.unpack(bytes(2) + rest))
        keep(got)
    return dict(zip(ports, found, strict=True))


#: An entry but its port, as bytes (the memo's key).
_REST = struct.Struct(f"<2x{ENTRY.size - 2}s")
_I = {name: i for i, name in enumerate(ENTRY_NAMES)}
(_MATCHED, _FLAGS, _REUSE, _REUSEPORT, _BIND2, _UID, _L3MDEV, _OWNERS, _FAMILY, _V6ONLY, _RCV, _RCV6) = (
    _I[k]
    for k in (
        "matched", "flags", "fastreuse", "fastreuseport", "bind2", "fastuid", "l3mdev", "owners",
        "fast_sk_family", "fast_ipv6_only", "fast_rcv_saddr", "fast_v6_rcv_saddr",
    )
)  # fmt: skip


def decode_entry(v: tuple[Any, ...]) -> PortBucket:
    """One unpacked ENTRY."""
    flags, matched = v[_FLAGS], v[_MATCHED]
    bad = not flags & RAN or bool(flags & (FAULTED | INCONSISTENT))
    trunc = bool(flags & CHAIN_TRUNCATED)
    if not matched:
        return PortBucket(0, chain_truncated=trunc, faulted=bad)
    cached = v[_REUSEPORT] > 0  # else the kernel's fast_* are stale (and the program left them 0)
    return PortBucket(
        buckets=matched,
        fastreuse=v[_REUSE],
        fastreuseport=v[_REUSEPORT],
        fastuid=v[_UID] if cached else None,
        fast_rcv_saddr=IPv4Address(v[_RCV]) if cached else None,
        fast_v6_rcv_saddr=IPv6Address(v[_RCV6]) if cached else None,
        fast_sk_family=v[_FAMILY] if cached else None,
        fast_ipv6_only=bool(v[_V6ONLY]) if cached else None,
        l3mdev=v[_L3MDEV],
        bind2=v[_BIND2],
        owners=v[_OWNERS],
        chain_truncated=trunc,
        counts_truncated=bool(flags & (BIND2_TRUNCATED | OWNERS_TRUNCATED)),
        faulted=bad,
    )


def read_port_buckets(ports: Iterable[int]) -> dict[int, PortBucket] | Unavailable:
    """Each TCP port's bind bucket(s) in this thread's network namespace, read from the bind
    hash: one chain walk per port, no socket visited (docs/benchmarks.md). Ports outside
    1-65535 are left out. Unavailable (with the reason) where BPF cannot run here: capabilities,
    REBIND_NO_BPF=1, BTF lacking a member, the verifier."""
    wanted = sorted({p for p in ports if 0 < p < 1 << 16})
    try:
        check_bpf_environment(honour_no_bpf=True)
        lay = load_layout()
        if not wanted:
            return {}
        return decode_buckets(wanted, _run_buckets(lay, wanted))
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(_reason(exc))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, BPFUnavailable):
        return f"BPF bind hash read: {exc.strerror or exc}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]
