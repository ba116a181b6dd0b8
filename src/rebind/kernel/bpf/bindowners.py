"""The owners program (pure: no syscalls): every socket of one TCP port's bind buckets, each
emitted as the socket programs' :data:`~.socklayout.RECORD` (:func:`~.bindhash.read_port_owners`).

One test run, one ``bpf_loop`` (Linux 5.17) of small steps: each step advances a cursor kept in
the state map (:class:`OwnerState`: the chain's next bucket -> the bucket's next bind2 bucket ->
that one's next owner) by one link and emits at most one record (``rebind_emit``, a global
function: the iterator's record code, verified once on its own), so the verifier sees no loop
and the walk stops as soon as it is done (the callback returns 1). The walk runs inside one
repetition, i.e. one rcu_read_lock section: BPF_PROG_TEST_RUN drops it between repetitions when
it reschedules (bpf_test_timer_continue), and a cursor kept across that gap could point at a
socket or bind2 bucket freed meanwhile. Within it, inet_bind_bucket (kfree_rcu) and TIME_WAIT
and full sockets (SLAB_TYPESAFE_BY_RCU: reused only as sockets) stay readable; a bind2 bucket
(plain kmem_cache_free) or a reused socket may not be what it was, so each is re-checked (its
port and net) before it is followed, and the walk says where it could not go on.
"""

from __future__ import annotations

from typing import Final

from rebind.kernel.bpf import asm
from rebind.kernel.bpf.bindhashlayout import (
    CHAIN_HOPS,
    CHAIN_TRUNCATED,
    FAULTED,
    INCONSISTENT,
    OWNERS_TRUNCATED,
    RAN,
    SPAN_MAX,
    BindHashLayout,
)
from rebind.kernel.bpf.bindprog import NetState, chain_head, find_net
from rebind.kernel.bpf.socklayout import KIND_TIMEWAIT, REC, RECORD, SockLayout
from rebind.kernel.bpf.sockprog import SockFrame, _Emitter, emit_socket_fields

HELPER_LOOP = 181  # bpf_loop, Linux 5.17
HELPER_JIFFIES64 = 118  # bpf_jiffies64, Linux 5.5 (bpf_base_func_proto: CAP_BPF)
#: The walk ran out of steps before its end (OwnerState.STEPS): truncated.
STEPS_EXHAUSTED = 64
#: The cursor's phases: following the chain, a bucket's bind2 list, a bind2 bucket's owners.
PHASE_CHAIN, PHASE_BIND2, PHASE_OWNER = 0, 1, 2


class OwnerState:
    """The state map's one value: NetState's fields first (find_net and chain_head use them),
    then the question, the cursor and the counts."""

    READY: Final = NetState.READY
    NET: Final = NetState.NET
    BHASH: Final = NetState.BHASH
    MASK: Final = NetState.MASK
    HASH_MIX: Final = NetState.HASH_MIX

    PORT: Final = 32  # u32, set by the caller
    LIMIT: Final = 36  # u32, set by the caller: records the map holds
    STEPS: Final = 40  # u32, set by the caller: bpf_loop's iterations
    PHASE: Final = 44  # u32
    NODE: Final = 48  # u64: the chain's next inet_bind_bucket.node
    B2: Final = 56  # u64: the next inet_bind2_bucket.bhash_node
    OWN: Final = 64  # u64: the next owner's skc_bind_node
    EMITTED: Final = 72  # u32: records written, the next one's index
    FLAGS: Final = 76  # u32: RAN (the walk reached its end), CHAIN_TRUNCATED, FAULTED, ...
    BUCKETS: Final = 80  # u32: buckets of this net and port
    BIND2: Final = 84  # u32: bind2 buckets walked
    SKIPPED: Final = 88  # u32: owners not emitted (of another port or net: reused meanwhile)
    HOPS: Final = 92  # u32: chain buckets visited
    JIFFIES: Final = 96  # u64: jiffies_64 when the run began (bpf_jiffies64): HZ calibration
    #: u32, set by the caller: 0, or emit only the owners whose skc_state is this one (the
    #: others are walked, not emitted: a port's bound-inactive sockets among ten thousand
    #: TIME_WAITs cost the walk, not ten thousand records)
    ONLY_STATE: Final = 104
    SIZE: Final = 112


class StepFrame:
    """The step callback's frame: a map key, and the bucket copied whole."""

    KEY: Final = SockFrame.KEY  # u32
    TB: Final = SockFrame.KEY - SPAN_MAX  # an inet_bind_bucket's / inet_bind2_bucket's first bytes


class EmitFrame:
    """rebind_emit's frame: the socket programs' (SockFrame: SCRATCH, KEY, RECORD), and below it
    the record's index, kept across the copies."""

    INDEX: Final = SockFrame.RECORD - 8  # u64


#: The functions of the owners program: (name, parameters). rebind_emit is global: the verifier
#: checks it once on its own. Inlined in the step callback, the iterator's record code cost ~20 ms
#: of verification (13.7k instructions processed: in a bpf_loop callback the verifier's precision
#: tracking gives up and keeps every scalar precise, so the copies' fault branches never prune).
FUNCS = (("rebind_owners", 1), ("rebind_step", 2), ("rebind_emit", 2))
GLOBAL_FUNCS = frozenset({"rebind_emit"})


def build_owners_program(
    lay: BindHashLayout, sock: SockLayout, state_fd: int, records_fd: int
) -> tuple[bytes, tuple[tuple[str, int, int], ...]]:
    """(instructions, functions for func_info): main finds the net and the chain, then
    bpf_loop(OwnerState.STEPS, step); step calls emit for each owner (GLOBAL_FUNCS: load with
    ``global_funcs=GLOBAL_FUNCS``)."""
    p = asm.Program()
    r0, r1, r2, r3, r4, r6, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
    S = OwnerState
    p.store_imm(4, fp, SockFrame.KEY, 0)
    p.map_lookup(state_fd, SockFrame.KEY, "main_out")
    p.mov(r8, r0)
    p.call(HELPER_JIFFIES64)
    p.store(8, r8, S.JIFFIES, r0)
    p.mov_imm(r9, 0)
    find_net(p, lay)  # jumps to "fault"
    p.load(4, r6, r8, S.PORT)
    chain_head(p, lay)
    p.jump_imm(asm.JNE, r9, 0, "fault")
    p.store(8, r8, S.NODE, r1)
    p.store_imm(4, r8, S.PHASE, PHASE_CHAIN)
    p.load(4, r1, r8, S.STEPS)
    p.ld_func(r2, "step")
    p.mov_imm(r3, 0)
    p.mov_imm(r4, 0)
    p.call(HELPER_LOOP)
    p.goto("main_out")
    p.label("fault")
    _flag(p, r8, FAULTED)
    p.label("main_out")
    p.mov_imm(r0, 0)
    p.exit()
    _step(p, lay, state_fd)
    _emit(p, lay, sock, records_fd)
    starts = (0, p.address("step"), p.address("emit_owner"))
    return p.assemble(), tuple((name, at, n) for (name, n), at in zip(FUNCS, starts, strict=True))


def _flag(p: asm.Program, state: int, flag: int) -> None:
    p.load(4, asm.R1, state, OwnerState.FLAGS)
    p.alu_imm(asm.OR, asm.R1, flag)
    p.store(4, state, OwnerState.FLAGS, asm.R1)


def _bump(p: asm.Program, field: int) -> None:
    p.load(4, asm.R1, asm.R6, field)
    p.alu_imm(asm.ADD, asm.R1, 1)
    p.store(4, asm.R6, field, asm.R1)


def _copy_or_stop(p: asm.Program, size: int, src: int, off: int) -> None:
    """StepFrame.TB = size bytes at src + off; a fault ends the walk (FAULTED)."""
    p.probe_read(StepFrame.TB, size, src, off)
    p.jump_imm(asm.JNE, asm.R0, 0, "s_fault")


def _step(p: asm.Program, lay: BindHashLayout, state_fd: int) -> None:
    """step(index, ctx): one link of the walk. r6 the state (a map value), r7 the socket."""
    r0, r1, r6, fp = asm.R0, asm.R1, asm.R6, asm.FP
    S = OwnerState
    p.label("step")
    p.store_imm(4, fp, SockFrame.KEY, 0)
    p.map_lookup(state_fd, SockFrame.KEY, "s_stop")
    p.mov(r6, r0)
    p.load(4, r1, r6, S.PHASE)
    p.jump_imm(asm.JEQ, r1, PHASE_BIND2, "s_bind2")
    p.jump_imm(asm.JEQ, r1, PHASE_OWNER, "s_owner")
    _chain_step(p, lay)
    _bind2_step(p, lay)
    _owner_step(p, lay)
    p.label("s_fault")
    _flag(p, r6, FAULTED)
    p.goto("s_stop")
    p.label("s_done")
    _flag(p, r6, RAN)
    p.label("s_stop")
    p.mov_imm(r0, 1)
    p.exit()
    p.label("s_next")
    p.mov_imm(r0, 0)
    p.exit()


def _chain_step(p: asm.Program, lay: BindHashLayout) -> None:
    """The chain's next bucket: of this net and port (inet_bind_bucket_match, any l3mdev), its
    bind2 list comes next."""
    r1, r2, r3, r6, fp = asm.R1, asm.R2, asm.R3, asm.R6, asm.FP
    S, tb, TB = OwnerState, "inet_bind_bucket", StepFrame.TB
    node = lay[f"{tb}.node"]
    p.load(8, r3, r6, S.NODE)
    p.jump_imm(asm.JEQ, r3, 0, "s_done")
    p.load(4, r1, r6, S.HOPS)
    p.jump_imm(asm.JGE, r1, CHAIN_HOPS, "s_chain_truncated")
    _bump(p, S.HOPS)
    _copy_or_stop(p, lay.span(tb), r3, -node)
    p.load(8, r1, fp, TB + node)
    p.store(8, r6, S.NODE, r1)
    p.load(8, r1, fp, TB + lay[f"{tb}.ib_net.net"])
    p.load(8, r2, r6, S.NET)
    p.jump_reg(asm.JNE, r1, r2, "s_next")
    p.load(2, r1, fp, TB + lay[f"{tb}.port"])
    p.load(4, r2, r6, S.PORT)
    p.jump_reg(asm.JNE, r1, r2, "s_next")
    _bump(p, S.BUCKETS)
    p.load(8, r1, fp, TB + lay[f"{tb}.bhash2"] + lay["hlist_head.first"])
    p.store(8, r6, S.B2, r1)
    p.store_imm(4, r6, S.PHASE, PHASE_BIND2)
    p.goto("s_next")
    p.label("s_chain_truncated")
    _flag(p, r6, CHAIN_TRUNCATED)
    p.goto("s_stop")


def _bind2_step(p: asm.Program, lay: BindHashLayout) -> None:
    """The bucket's next bind2 bucket, re-checked (freed without an RCU grace period, it may be
    another's by now): its owners come next; at the list's end, back to the chain."""
    r1, r2, r3, r6, fp = asm.R1, asm.R2, asm.R3, asm.R6, asm.FP
    S, tb2, TB = OwnerState, "inet_bind2_bucket", StepFrame.TB
    node = lay[f"{tb2}.bhash_node"]
    p.label("s_bind2")
    p.load(8, r3, r6, S.B2)
    p.jump_imm(asm.JEQ, r3, 0, "s_to_chain")
    _copy_or_stop(p, lay.span(tb2), r3, -node)
    p.load(8, r1, fp, TB + node)
    p.store(8, r6, S.B2, r1)
    p.load(8, r1, fp, TB + lay[f"{tb2}.ib_net.net"])
    p.load(8, r2, r6, S.NET)
    p.jump_reg(asm.JNE, r1, r2, "s_inconsistent")
    p.load(2, r1, fp, TB + lay[f"{tb2}.port"])
    p.load(4, r2, r6, S.PORT)
    p.jump_reg(asm.JNE, r1, r2, "s_inconsistent")
    _bump(p, S.BIND2)
    p.load(8, r1, fp, TB + lay[f"{tb2}.owners"] + lay["hlist_head.first"])
    p.store(8, r6, S.OWN, r1)
    p.store_imm(4, r6, S.PHASE, PHASE_OWNER)
    p.goto("s_next")
    p.label("s_inconsistent")  # the rest of this bucket's list is not to be trusted
    _flag(p, r6, INCONSISTENT)
    p.label("s_to_chain")
    p.store_imm(4, r6, S.PHASE, PHASE_CHAIN)
    p.goto("s_next")


def _owner_step(p: asm.Program, lay: BindHashLayout) -> None:
    """The bind2 bucket's next owner: checked (its port and net), passed over if it is not in
    OwnerState.ONLY_STATE (where set), then emitted (rebind_emit) at records[EMITTED++] unless
    LIMIT are already; at the list's end, back to the bind2 list."""
    r1, r2, r3, r6, r7, fp = asm.R1, asm.R2, asm.R3, asm.R6, asm.R7, asm.FP
    S = OwnerState
    bind_node = lay["sock_common.skc_bind_node"]
    p.label("s_owner")
    p.load(8, r3, r6, S.OWN)
    p.jump_imm(asm.JEQ, r3, 0, "s_to_bind2")
    p.mov(r7, r3)
    p.alu_imm(asm.ADD, r7, -bind_node)  # the socket (sock_common first: sockprog.check_layout)
    _copy_or_stop(p, 8, r3, lay["hlist_node.next"])
    p.load(8, r1, fp, StepFrame.TB)
    p.store(8, r6, S.OWN, r1)
    # still this port's and this net's (a socket is reused only as a socket, but maybe another)
    _copy_or_stop(p, 8, r7, lay["sock_common.skc_net"])
    p.load(8, r1, fp, StepFrame.TB)
    p.load(8, r2, r6, S.NET)
    p.jump_reg(asm.JNE, r1, r2, "s_skip")
    p.store_imm(8, fp, StepFrame.TB, 0)
    _copy_or_stop(p, 2, r7, lay["sock_common.skc_num"])
    p.load(8, r1, fp, StepFrame.TB)
    p.load(4, r2, r6, S.PORT)
    p.jump_reg(asm.JNE, r1, r2, "s_skip")
    p.load(4, r2, r6, S.ONLY_STATE)
    p.jump_imm(asm.JEQ, r2, 0, "s_emit")
    p.store_imm(8, fp, StepFrame.TB, 0)
    _copy_or_stop(p, 1, r7, lay["sock_common.skc_state"])
    p.load(8, r1, fp, StepFrame.TB)
    p.load(4, r2, r6, S.ONLY_STATE)
    p.jump_reg(asm.JNE, r1, r2, "s_next")  # walked, not wanted
    p.label("s_emit")
    # the limit counts the records kept: owners walked past never cut the walk short
    p.load(4, r1, r6, S.EMITTED)
    p.load(4, r2, r6, S.LIMIT)
    p.jump_reg(asm.JGE, r1, r2, "s_limit")
    p.mov(r1, r7)
    p.load(4, r2, r6, S.EMITTED)
    p.call_local("emit_owner")
    p.jump_imm(asm.JNE, asm.R0, 0, "s_stop")  # the records map refused the index: stop
    _bump(p, S.EMITTED)
    p.goto("s_next")
    p.label("s_skip")  # a socket of another port or net: this list is no longer the port's
    _bump(p, S.SKIPPED)
    _flag(p, r6, INCONSISTENT)
    p.label("s_to_bind2")
    p.store_imm(4, r6, S.PHASE, PHASE_BIND2)
    p.goto("s_next")
    p.label("s_limit")
    _flag(p, r6, OWNERS_TRUNCATED)
    p.goto("s_stop")


def _emit(p: asm.Program, lay: BindHashLayout, sock: SockLayout, records_fd: int) -> None:
    """rebind_emit(sk, index): the socket's RECORD (the iterator's fields: emit_socket_fields;
    the cookie as the socket holds it, skc_cookie; the uid its sk_uid; the extras of
    :func:`_emit_extras`) written at records[index]. Returns 0, or 1 if the map has no such
    index."""
    r0, r1, r2, r3, r7, r9, fp = asm.R0, asm.R1, asm.R2, asm.R3, asm.R7, asm.R9, asm.FP
    F, rec = SockFrame, SockFrame.RECORD
    p.label("emit_owner")
    p.mov(r7, r1)
    p.store(8, fp, EmitFrame.INDEX, r2)
    e = _Emitter(p, sock)
    p.mov_imm(r9, 0)
    for off in range(0, RECORD.size, 8):
        p.store_imm(8, fp, rec + off, 0)
    emit_socket_fields(p, e, sock, tcp=True)
    p.label("emit")
    emit_bind_extras(p, lay, e)
    p.store(4, fp, rec + REC["faults"], r9)
    p.load(8, r1, fp, EmitFrame.INDEX)
    p.store(4, fp, F.KEY, r1)
    p.map_lookup(records_fd, F.KEY, "e_missing")
    p.mov(r1, r0)
    p.mov_imm(r2, RECORD.size)
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, rec)
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.mov_imm(r0, 0)
    p.exit()
    p.label("e_missing")
    p.mov_imm(r0, 1)
    p.exit()


def emit_bind_extras(p: asm.Program, lay: BindHashLayout, e: _Emitter) -> None:
    """What the owners' records carry beyond the socket programs' fields, for the socket at r7
    (its record on the stack at SockFrame.RECORD): :func:`_emit_extras`, the cookie as the
    socket holds it (skc_cookie) and the uid its sk_uid. Shared with the 4-tuple lookups of
    :mod:`.socklookup` (``extras``), whose records then read as these."""
    r1, r7, fp = asm.R1, asm.R7, asm.FP
    rec = SockFrame.RECORD
    _emit_extras(p, lay, e)
    e.probe_read(rec + REC["cookie"], 8, r7, lay["sock_common.skc_cookie"])
    p.load(4, r1, fp, rec + REC["sk_uid"])
    p.store(4, fp, rec + REC["uid"], r1)


#: Where the owners' records carry what the socket programs' RECORD has no field for, in fields
#: only UDP's iterator fills (so every other reader sees its records unchanged): a full
#: socket's inode, a TIME_WAIT's jiffies left (:func:`_emit_extras`); and, in a TIME_WAIT's
#: field (a full socket's record leaves it unread: sockdecode), a full socket's struct file.
EXTRA_INODE, EXTRA_TW_LEFT, EXTRA_FILE = "bucket", "chain_after", "tw_ts_recent_stamp"


def _emit_extras(p: asm.Program, lay: BindHashLayout, e: _Emitter) -> None:
    """What inet_diag would report beside the record, for `rebind trace`'s snapshot
    (kernel/bindhash_table.py): a full socket's inode -- sock_i_ino: ``SOCK_INODE(sk->sk_socket)
    ->i_ino``, 0 where orphaned (no sk_socket), the low 32 bits (socket inodes come from
    get_next_ino, an unsigned int) -- at EXTRA_INODE, and its ``sk_socket->file`` at EXTRA_FILE;
    a TIME_WAIT's timer, as
    inet_twsk_diag_fill reads it (``tw_timer.expires - jiffies``, 0 where past due), in jiffies
    at EXTRA_TW_LEFT. A fault counts in r9 as any copy's (the record is then left out)."""
    r0, r1, r3, r7, fp = asm.R0, asm.R1, asm.R3, asm.R7, asm.FP
    rec, scratch = SockFrame.RECORD, SockFrame.SCRATCH
    p.load(1, r1, fp, rec + REC["kind"])
    p.jump_imm(asm.JEQ, r1, KIND_TIMEWAIT, "x_tw")
    p.jump_imm(asm.JNE, r1, 0, "x_done")  # a request sock: in no bind bucket, no file
    p.store_imm(8, fp, scratch, 0)
    e.probe_read(scratch, 8, r7, lay["sock.sk_socket"])
    p.load(8, r3, fp, scratch)
    p.jump_imm(asm.JEQ, r3, 0, "x_done")
    e.probe_read(rec + REC[EXTRA_INODE], 4, r3, lay["socket_alloc.vfs_inode"] + lay["inode.i_ino"])
    p.load(8, r3, fp, scratch)  # the copy's helper call clobbered r3
    e.probe_read(rec + REC[EXTRA_FILE], 8, r3, lay["socket.file"])
    p.goto("x_done")
    p.label("x_tw")
    p.store_imm(8, fp, scratch, 0)
    e.probe_read(scratch, 8, r7, lay["inet_timewait_sock.tw_timer.expires"])
    p.call(HELPER_JIFFIES64)
    p.load(8, r1, fp, scratch)
    p.alu(asm.SUB, r1, r0)
    p.jump_imm(asm.JSGT, r1, 0, "x_left")
    p.mov_imm(r1, 0)
    p.label("x_left")
    p.store(4, fp, rec + REC[EXTRA_TW_LEFT], r1)
    p.label("x_done")
