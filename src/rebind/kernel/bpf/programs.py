"""The iterator program, its maps, output record and stack frames (pure: no syscalls).

``build_fdtable_program``: a ``bpf_iter_task`` program with bpf_loop callbacks (Linux 5.17).
What it costs, and why it is the only one, is measured in one place: the docstring of
:mod:`rebind.kernel.bpf`.

Every stack slot a program uses is named in a ``*Frame`` class below (offsets from the frame
pointer r10; a BPF frame is the 512 bytes below it, and each bpf-to-bpf function and callback has
a frame of its own). Where two names share bytes, the frame says which one is dead by then.
The assembled bytes are pinned by a saved disassembly (tests/data/bpf/, tests/unit/test_bpf_programs.py).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from rebind.kernel.bpf import asm
from rebind.kernel.bpf.fdlayout import MEMBERS as MEMBERS
from rebind.kernel.bpf.fdlayout import TARGETS as TARGETS
from rebind.kernel.bpf.fdlayout import Layout as Layout
from rebind.kernel.bpf.fdlayout import layout_from_btf as layout_from_btf

# enum bpf_func_id (include/uapi/linux/bpf.h)
HELPER_MAP_UPDATE_ELEM = 2
HELPER_LOOP = 181  # bpf_loop, Linux 5.17
BPF_NOEXIST = 1  # map update flag

SOCKFS_MAGIC = 0x534F434B  # include/uapi/linux/magic.h
S_IFMT = 0o170000
S_IFSOCK = 0o140000

#: One output record (an element of the records array): tgid, tid, fd, pad, the leader's
#: start_boottime (ns), socket inode.
RECORD = struct.Struct("<IIIIQQ")
REC_TGID, REC_TID, REC_FD, REC_PAD, REC_START, REC_INODE = 0, 4, 8, 12, 16, 24

#: struct state {u32 mode, unknown, tables, netns, errors, emitted}; mode 1: likely tasks only,
#: 2: every task. unknown: wanted inodes whose struct file is not learnt yet. emitted: records
#: produced so far, the index of the next one in the records array (counted past its end too,
#: so that the caller knows how large an array it needs).
STATE = struct.Struct("<6I")
ST_MODE, ST_UNKNOWN, ST_TABLES, ST_NETNS, ST_ERRORS, ST_EMITTED = 0, 4, 8, 12, 16, 20
BITMAP_BYTES = 8192  # 2**16 bits, indexed by bits 6..21 of the file's address
FD_CHUNK = 16  # fd slots copied per bpf_loop step (16 * 8 = 128 bytes of stack)


class LoopCtx:
    """rebind_tasks' per-task context, handed to rebind_chunk as bpf_loop's ctx (32 bytes)."""

    FDS: Final = 0  # u64: fdt->fd, the fd array's address
    MAX: Final = 8  # u64: fdt->max_fds (a u32, zero-extended)
    TGID: Final = 16  # u32
    TID: Final = 20  # u32
    START: Final = 24  # u64: group_leader->start_boottime
    SIZE: Final = 32


class SlotCtx:
    """rebind_chunk's copy of FD_CHUNK fd slots, handed to rebind_slot as bpf_loop's ctx."""

    SLOTS: Final = 0  # FD_CHUNK u64 file addresses
    FIRST: Final = 8 * FD_CHUNK  # u64: the fd number of SLOTS[0]
    LOOP_CTX: Final = 8 * FD_CHUNK + 8  # u64: pointer to the task's LoopCtx
    SIZE: Final = 8 * FD_CHUNK + 16


class TaskFrame:
    """rebind_tasks (the iterator program proper), once per task."""

    STATE_KEY: Final = -4  # u32 0: key of the state array
    EUID: Final = -8  # u32: cred->euid, key of the uids map
    LOOP_CTX: Final = -64  # LoopCtx, -64 .. -32
    TMP: Final = -72  # u64: where bpf_probe_read_kernel copies a task field
    LEADER: Final = -80  # u64: task->group_leader


class ChunkFrame:
    """rebind_chunk(index, LoopCtx *), the outer bpf_loop callback."""

    STATE_KEY: Final = -4  # u32 0 (error counting)
    SLOT_CTX: Final = -160  # SlotCtx, -160 .. -16


class SlotFrame:
    """rebind_slot(k, SlotCtx *), the inner bpf_loop callback (inlined by the verifier, 6.0)."""

    STATE_KEY: Final = -4  # u32 0: key of the state array
    BITS_KEY: Final = -8  # u32 0: key of the bitmap array


class CheckFrame:
    """rebind_check(LoopCtx *, file, fd): is this file a wanted socket? emit a RECORD if so."""

    FILE: Final = -8  # u64: the file's address, key of the files map
    # u64 scratch, in turn: the state key while learning (u32 0), file->f_inode, i_sb->s_magic,
    # and finally the inode number (key of the wanted map, value stored in the files map).
    SCRATCH: Final = -16
    # Below SCRATCH: the inode's first bytes (i_mode .. i_ino, see inode_buf()), read at once.
    # Once i_ino is in a register the buffer is dead; ARRAY_KEY reuses its bytes.
    # u32, in turn: 0, key of the bitmap and of the state array; then the record's index, key
    # of the records array.
    ARRAY_KEY: Final = -20


def inode_span(lay: Layout) -> int:
    """Bytes of struct inode copied at once: from offset 0 past i_mode, i_sb and i_ino, 8-aligned."""
    i_mode, i_sb, i_ino = lay["inode.i_mode"], lay["inode.i_sb"], lay["inode.i_ino"]
    return (max(i_mode + 2, i_sb + 8, i_ino + 8) + 7) & ~7


def inode_buf(lay: Layout) -> int:
    """CheckFrame's inode buffer: the inode_span() bytes right below SCRATCH."""
    return CheckFrame.SCRATCH - inode_span(lay)


#: Every stack slot above: (frame, name, offset, size); a unit test checks they lie in the frame
#: and overlap only as SHARED_SLOTS says (one is dead before the other is written).
FRAME_SLOTS: tuple[tuple[str, str, int, int], ...] = (
    ("task", "STATE_KEY", TaskFrame.STATE_KEY, 4),
    ("task", "EUID", TaskFrame.EUID, 4),
    ("task", "LOOP_CTX", TaskFrame.LOOP_CTX, LoopCtx.SIZE),
    ("task", "TMP", TaskFrame.TMP, 8),
    ("task", "LEADER", TaskFrame.LEADER, 8),
    ("chunk", "STATE_KEY", ChunkFrame.STATE_KEY, 4),
    ("chunk", "SLOT_CTX", ChunkFrame.SLOT_CTX, SlotCtx.SIZE),
    ("slot", "STATE_KEY", SlotFrame.STATE_KEY, 4),
    ("slot", "BITS_KEY", SlotFrame.BITS_KEY, 4),
    ("check", "FILE", CheckFrame.FILE, 8),
    ("check", "SCRATCH", CheckFrame.SCRATCH, 8),
    ("check", "ARRAY_KEY", CheckFrame.ARRAY_KEY, 4),
)

SHARED_SLOTS: frozenset[tuple[str, str, str]] = frozenset()


class Maps(NamedTuple):
    wanted: int  # HASH: socket inode (u64) -> u8; what the caller asks about
    files: int  # HASH: struct file address (u64) -> inode (u64); learnt while scanning
    bits: int  # ARRAY[1]: BITMAP_BYTES bitmap of hashed file addresses, a cheap pre-filter
    state: int  # ARRAY[1]: STATE
    uids: int  # HASH: euid (u32) -> u8; which tasks are likely holders (first pass only)
    records: int  # ARRAY (mmapable) of RECORD: the output, records[state.emitted++]


Built = tuple[bytes, tuple[tuple[str, int, int], ...]]  # instructions, (func, insn, params)


def _state_ptr(p: asm.Program, maps: Maps, key_off: int, null: str) -> None:
    """r0 = &state (an array lookup the verifier inlines); jump to ``null`` if it failed."""
    p.store_imm(4, asm.FP, key_off, 0)
    p.map_lookup(maps.state, key_off, null)


def _count_error(p: asm.Program, maps: Maps, key_off: int, ret: int, prefix: str) -> None:
    _state_ptr(p, maps, key_off, f"{prefix}_err_out")
    p.load(4, asm.R1, asm.R0, ST_ERRORS)
    p.alu_imm(asm.ADD, asm.R1, 1)
    p.store(4, asm.R0, ST_ERRORS, asm.R1)
    p.label(f"{prefix}_err_out")
    p.mov_imm(asm.R0, ret)
    p.exit()


def build_fdtable_program(lay: Layout, maps: Maps) -> Built:
    """The ``bpf_iter_task`` program: each fd table read as an array of file addresses.

    Per task (threads sharing their leader's table are skipped): copy the table's ``fd``
    array 16 slots at a time (bpf_loop + bpf_probe_read_kernel) and look each non-NULL
    slot up by *address*: a socket has exactly one struct file (sock_alloc_file(); dup,
    fork and SCM_RIGHTS share it), so once that address is known no file needs reading.
    Until every wanted socket's address is known, each slot's inode is read and matched
    by number instead, learning addresses on the way. The first pass visits only tasks
    likely to hold the sockets (same netns, a socket's uid) to learn them cheaply; the
    second pass visits every task.
    """
    p = asm.Program()
    _tasks(p, lay, maps)
    _chunk(p, maps)
    _slot(p, maps)
    _check(p, lay, maps)
    funcs = (
        ("rebind_tasks", 0, 1),
        ("rebind_chunk", p.address("chunk"), 2),
        ("rebind_slot", p.address("slot"), 2),
        ("rebind_check", p.address("check"), 3),
    )
    return p.assemble(), funcs


def _tasks(p: asm.Program, lay: Layout, maps: Maps) -> None:
    """main: r6 ctx, r7 task, r8 task->files then its fdtable, r9 &state."""
    r0, r1, r2, r3, r4, r6, r7, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
    F, cx = TaskFrame, TaskFrame.LOOP_CTX

    # Task fields are copied with bpf_probe_read_kernel rather than loaded directly: each
    # direct load of a pointer field makes the verifier search all of vmlinux BTF by name
    # for "<struct>__safe_rcu"-style types (~1 ms each on 6.18); a copy costs it nothing.
    def read(dst: int, size: int, src: int, off: int) -> None:
        """*(fp + dst) = size bytes at src + off, or count an error and stop."""
        p.probe_read(dst, size, src, off)
        p.jump_imm(asm.JNE, r0, 0, "main_fault")

    p.mov(r6, r1)
    p.load(8, r7, r6, lay["bpf_iter__task.task"])
    p.jump_imm(asm.JEQ, r7, 0, "out")  # the final call, from seq stop
    _state_ptr(p, maps, F.STATE_KEY, "out")
    p.mov(r9, r0)
    read(F.TMP, 8, r7, lay["task_struct.files"])
    p.load(8, r8, fp, F.TMP)
    p.jump_imm(asm.JEQ, r8, 0, "out")  # exiting, or a kernel thread
    read(F.LEADER, 8, r7, lay["task_struct.group_leader"])
    p.load(8, r1, fp, F.LEADER)
    p.jump_reg(asm.JEQ, r1, r7, "own_table")
    p.jump_imm(asm.JEQ, r1, 0, "main_fault")
    read(F.TMP, 8, r1, lay["task_struct.files"])
    p.load(8, r2, fp, F.TMP)
    p.jump_reg(asm.JEQ, r2, r8, "out")  # CLONE_FILES thread: its leader's table is visited
    p.label("own_table")
    p.load(4, r1, r9, ST_MODE)
    p.jump_imm(asm.JNE, r1, 1, "scan")
    # first pass: same network namespace (if one is given) and a wanted euid
    p.load(4, r1, r9, ST_NETNS)
    p.jump_imm(asm.JEQ, r1, 0, "netns_ok")
    read(F.TMP, 8, r7, lay["task_struct.nsproxy"])
    p.load(8, r1, fp, F.TMP)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    read(F.TMP, 8, r1, lay["nsproxy.net_ns"])
    p.load(8, r1, fp, F.TMP)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    p.store_imm(8, fp, F.TMP, 0)  # ns.inum is a u32: the upper half must read as 0
    read(F.TMP, 4, r1, lay["net.ns.inum"])
    p.load(8, r1, fp, F.TMP)
    p.load(4, r2, r9, ST_NETNS)
    p.jump_reg(asm.JNE, r1, r2, "out")
    p.label("netns_ok")
    read(F.TMP, 8, r7, lay["task_struct.cred"])
    p.load(8, r1, fp, F.TMP)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    read(F.EUID, 4, r1, lay["cred.euid"])
    p.map_lookup(maps.uids, F.EUID, "out")
    p.label("scan")
    p.load(4, r1, r9, ST_TABLES)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(4, r9, ST_TABLES, r1)
    read(F.TMP, 8, r8, lay["files_struct.fdt"])
    p.load(8, r8, fp, F.TMP)  # r8 = fdt from here on
    p.jump_imm(asm.JEQ, r8, 0, "out")
    p.store_imm(8, fp, cx + LoopCtx.MAX, 0)  # max_fds is a u32: zero the upper half
    read(cx + LoopCtx.MAX, 4, r8, lay["fdtable.max_fds"])
    read(cx + LoopCtx.FDS, 8, r8, lay["fdtable.fd"])
    read(cx + LoopCtx.TGID, 4, r7, lay["task_struct.tgid"])
    read(cx + LoopCtx.TID, 4, r7, lay["task_struct.pid"])
    p.load(8, r1, fp, F.LEADER)
    read(cx + LoopCtx.START, 8, r1, lay["task_struct.start_boottime"])
    p.load(8, r2, fp, cx + LoopCtx.MAX)
    # bpf_loop(DIV_ROUND_UP(max_fds, FD_CHUNK), chunk, ctx = &LoopCtx, 0)
    p.mov(r1, r2)
    p.alu_imm(asm.ADD, r1, FD_CHUNK - 1)
    p.alu_imm(asm.RSH, r1, FD_CHUNK.bit_length() - 1)
    p.ld_func(r2, "chunk")
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, cx)
    p.mov_imm(r4, 0)
    p.call(HELPER_LOOP)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    p.label("main_fault")
    _count_error(p, maps, F.STATE_KEY, 0, "main")


def _chunk(p: asm.Program, maps: Maps) -> None:
    """chunk(index, LoopCtx *): copy FD_CHUNK slots into a SlotCtx, then slot() over each."""
    r0, r1, r2, r3, r4, r6, r7, fp = asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.FP
    sx = ChunkFrame.SLOT_CTX
    p.label("chunk")
    p.mov(r6, r2)
    p.mov(r7, r1)
    p.alu_imm(asm.LSH, r7, FD_CHUNK.bit_length() - 1)  # r7 = the chunk's first fd
    p.load(8, r1, r6, LoopCtx.MAX)
    p.mov(r2, r7)
    p.alu_imm(asm.ADD, r2, FD_CHUNK)
    p.jump_reg(asm.JGT, r2, r1, "chunk_fault")  # max_fds is a multiple of BITS_PER_LONG
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, sx + SlotCtx.SLOTS)
    p.mov_imm(r2, 8 * FD_CHUNK)
    p.load(8, r3, r6, LoopCtx.FDS)
    p.mov(r4, r7)
    p.alu_imm(asm.LSH, r4, 3)
    p.alu(asm.ADD, r3, r4)
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "chunk_fault")
    p.store(8, fp, sx + SlotCtx.FIRST, r7)
    p.store(8, fp, sx + SlotCtx.LOOP_CTX, r6)
    # bpf_loop(FD_CHUNK, slot, ctx = &SlotCtx, 0): inlined by the verifier (Linux 6.0)
    p.mov_imm(r1, FD_CHUNK)
    p.ld_func(r2, "slot")
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, sx)
    p.mov_imm(r4, 0)
    p.call(HELPER_LOOP)
    p.mov_imm(r0, 0)
    p.exit()
    p.label("chunk_fault")
    _count_error(p, maps, ChunkFrame.STATE_KEY, 1, "chunk")


def _bit(p: asm.Program, addr: int, index: int, byte: int) -> None:
    """index = bit of ``addr`` in the bitmap, (addr >> 6) & 0xffff; byte = index >> 3."""
    p.mov(index, addr)
    p.alu_imm(asm.RSH, index, 6)
    p.alu_imm(asm.AND, index, 0xFFFF)
    p.mov(byte, index)
    p.alu_imm(asm.RSH, byte, 3)


def _slot(p: asm.Program, maps: Maps) -> None:
    """slot(k, SlotCtx *): r6 the SlotCtx, r7 k, r8 the slot's file address."""
    r0, r1, r2, r3, r6, r7, r8, fp = asm.R0, asm.R1, asm.R2, asm.R3, asm.R6, asm.R7, asm.R8, asm.FP
    F = SlotFrame
    p.label("slot")
    p.jump_imm(asm.JGT, r1, FD_CHUNK - 1, "slot_break")
    p.mov(r6, r2)
    p.mov(r7, r1)
    p.mov(r3, r1)
    p.alu_imm(asm.LSH, r3, 3)
    p.mov(r2, r6)
    p.alu(asm.ADD, r2, r3)
    p.load(8, r8, r2, SlotCtx.SLOTS)
    p.jump_imm(asm.JEQ, r8, 0, "slot_out")
    _state_ptr(p, maps, F.STATE_KEY, "slot_break")
    p.load(4, r1, r0, ST_UNKNOWN)
    p.jump_imm(asm.JNE, r1, 0, "slot_check")  # still learning: every file is checked
    p.store_imm(4, fp, F.BITS_KEY, 0)
    p.map_lookup(maps.bits, F.BITS_KEY, "slot_break")
    _bit(p, r8, r2, r3)
    p.alu(asm.ADD, r0, r3)
    p.load(1, r3, r0, 0)
    p.alu_imm(asm.AND, r2, 7)
    p.alu(asm.RSH, r3, r2)
    p.alu_imm(asm.AND, r3, 1)
    p.jump_imm(asm.JEQ, r3, 0, "slot_out")
    p.label("slot_check")
    p.load(8, r1, r6, SlotCtx.LOOP_CTX)
    p.mov(r2, r8)
    p.load(8, r3, r6, SlotCtx.FIRST)
    p.alu(asm.ADD, r3, r7)
    p.call_local("check")
    p.label("slot_out")
    p.mov_imm(r0, 0)
    p.exit()
    p.label("slot_break")
    p.mov_imm(r0, 1)
    p.exit()


def _check(p: asm.Program, lay: Layout, maps: Maps) -> None:
    """check(LoopCtx *, file, fd): r6 ctx, r7 file, r8 fd, r9 inode number (0: not known yet)."""
    r0, r1, r2, r3, r4, r6, r7, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
    F, ibuf = CheckFrame, inode_buf(lay)
    p.label("check")
    p.mov(r6, r1)
    p.mov(r7, r2)
    p.mov(r8, r3)
    p.store(8, fp, F.FILE, r7)
    p.map_lookup(maps.files, F.FILE, "learn")
    # A known address: still read the inode, so that a file freed since (the socket closed)
    # and its memory reused for another file is not taken for the socket.
    p.load(8, r9, r0, 0)
    p.goto("deref")
    p.label("learn")
    p.mov_imm(r9, 0)  # 0: match by inode number (socket inodes are never 0, get_next_ino())
    _state_ptr(p, maps, F.SCRATCH, "check_out")
    p.load(4, r1, r0, ST_UNKNOWN)
    p.jump_imm(asm.JEQ, r1, 0, "check_out")
    p.label("deref")
    # inode = file->f_inode
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, F.SCRATCH)
    p.mov_imm(r2, 8)
    p.mov(r3, r7)
    p.alu_imm(asm.ADD, r3, lay["file.f_inode"])
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "check_fault")
    p.load(8, r3, fp, F.SCRATCH)
    p.jump_imm(asm.JEQ, r3, 0, "check_out")
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, ibuf)
    p.mov_imm(r2, inode_span(lay))
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "check_fault")
    # S_ISSOCK(i_mode) and i_sb->s_magic == SOCKFS_MAGIC: a socket, not an O_PATH fd on a
    # filesystem's socket file (same mode, unrelated inode number)
    p.load(2, r1, fp, ibuf + lay["inode.i_mode"])
    p.alu_imm(asm.AND, r1, S_IFMT)
    p.jump_imm(asm.JNE, r1, S_IFSOCK, "check_out")
    p.load(8, r3, fp, ibuf + lay["inode.i_sb"])
    p.jump_imm(asm.JEQ, r3, 0, "check_out")
    p.alu_imm(asm.ADD, r3, lay["super_block.s_magic"])
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, F.SCRATCH)
    p.mov_imm(r2, 8)
    p.call(asm.HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "check_fault")
    p.load(8, r1, fp, F.SCRATCH)
    p.jump_imm(asm.JNE, r1, SOCKFS_MAGIC, "check_out")
    p.load(8, r1, fp, ibuf + lay["inode.i_ino"])  # the inode buffer is dead after this load
    p.jump_imm(asm.JEQ, r9, 0, "by_number")
    p.jump_reg(asm.JNE, r1, r9, "check_out")  # a stale address
    p.goto("emit")
    p.label("by_number")
    p.mov(r9, r1)
    p.store(8, fp, F.SCRATCH, r9)
    p.map_lookup(maps.wanted, F.SCRATCH, "check_out")
    # learnt: files[file] = inode, set its bit, one unknown fewer
    p.ld_map_fd(r1, maps.files)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, F.FILE)
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, F.SCRATCH)
    p.mov_imm(r4, BPF_NOEXIST)
    p.call(HELPER_MAP_UPDATE_ELEM)
    p.jump_imm(asm.JNE, r0, 0, "emit")
    p.store_imm(4, fp, F.ARRAY_KEY, 0)
    p.map_lookup(maps.bits, F.ARRAY_KEY, "emit")
    _bit(p, r7, r1, r2)
    p.alu(asm.ADD, r0, r2)
    p.load(1, r3, r0, 0)
    p.alu_imm(asm.AND, r1, 7)
    p.mov_imm(r4, 1)
    p.alu(asm.LSH, r4, r1)
    p.alu(asm.OR, r3, r4)
    p.store(1, r0, 0, r3)
    _state_ptr(p, maps, F.ARRAY_KEY, "emit")
    p.load(4, r1, r0, ST_UNKNOWN)
    p.jump_imm(asm.JEQ, r1, 0, "emit")
    p.alu_imm(asm.ADD, r1, -1)
    p.store(4, r0, ST_UNKNOWN, r1)
    # records[state.emitted++] = the record. Not bpf_seq_write: one task's output must fit the
    # seq_file buffer (bpf_seq_read(): PAGE_SIZE << 3, E2BIG past it: 1,023 records), and a
    # process may hold any number of wanted sockets. An index past the array's end finds no
    # element: the record is only counted, and the caller runs the scan again with room for it.
    p.label("emit")
    _state_ptr(p, maps, F.ARRAY_KEY, "check_out")
    p.load(4, r1, r0, ST_EMITTED)
    p.store(4, fp, F.ARRAY_KEY, r1)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(4, r0, ST_EMITTED, r1)
    p.map_lookup(maps.records, F.ARRAY_KEY, "check_out")
    p.load(4, r1, r6, LoopCtx.TGID)
    p.store(4, r0, REC_TGID, r1)
    p.load(4, r1, r6, LoopCtx.TID)
    p.store(4, r0, REC_TID, r1)
    p.store(4, r0, REC_FD, r8)
    p.store_imm(4, r0, REC_PAD, 0)
    p.load(8, r1, r6, LoopCtx.START)
    p.store(8, r0, REC_START, r1)
    p.store(8, r0, REC_INODE, r9)
    p.label("check_out")
    p.mov_imm(r0, 0)
    p.exit()
    p.label("check_fault")
    _count_error(p, maps, F.SCRATCH, 0, "check")
