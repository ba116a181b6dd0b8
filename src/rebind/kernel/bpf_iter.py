"""Who holds these sockets, asked of the kernel: BPF iterators over every task's fd table.

The /proc scan reads one ``/proc/PID/fd/N`` link per open file of every process. BPF task
iterators (Linux 5.8, commit eaaacd23910f) run a program over every task in the kernel
instead. Nothing is sampled or skipped: every task is visited, whatever its uid, network
namespace or pid namespace, and each socket is matched by its inode number (the
``socket:[INODE]`` of /proc and inet_diag), never by a guess.

The fast program (``bpf_iter_task`` + bpf_loop, Linux 5.17; the loop is inlined from 6.0)
copies each fd table's ``fd`` array 16 slots at a time and compares *addresses*: a socket
has exactly one ``struct file`` (sock_alloc_file(); dup, fork and SCM_RIGHTS share it), so
once a wanted socket's file address is known, finding its holders needs no memory beyond
the fd arrays. Addresses are learnt by reading ``f_inode->i_ino`` of each file until every
wanted socket has been met, first in a pass over the likely holders (the sockets' netns and
uid), then in the pass over every task; a matching address is confirmed by its inode number
too (a freed file's memory may be reused). Reading each file's inode instead costs two cache
misses per open file; that is what the fallback program does (``bpf_iter_task_file``, for
kernels without bpf_loop), about 40x slower on 400k open files.

Everything is raw ``bpf(2)`` through ctypes (no libbpf, no compiler): the programs are
assembled by :mod:`rebind.kernel.bpf_asm`; the attach points and struct offsets come from
the kernel's own BTF (:mod:`rebind.kernel.btf`), cached per boot in /run.

Threads: a thread whose fd table is its leader's is skipped (the leader is visited); a
thread with a table of its own (``unshare(CLONE_FILES)``) is visited and reported under its
process (tgid), like a process whose leader has exited.

Needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), BTF and the initial pid namespace; anything
missing raises :class:`BPFUnavailable` and callers fall back to the /proc scan.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from rebind.kernel import bpf_asm as asm
from rebind.kernel import btf as btfmod

BTF_PATH = "/sys/kernel/btf/vmlinux"

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_BTF_LOAD = 18
BPF_MAP_UPDATE_BATCH = 26  # Linux 5.6
BPF_LINK_CREATE = 28  # Linux 5.7
BPF_ITER_CREATE = 33  # Linux 5.8
# enum bpf_map_type / bpf_prog_type / bpf_attach_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28
# enum bpf_func_id
HELPER_MAP_LOOKUP_ELEM = 1
HELPER_MAP_UPDATE_ELEM = 2
HELPER_PROBE_READ_KERNEL = 113  # Linux 5.5; gpl_only
HELPER_SEQ_WRITE = 127  # Linux 5.8; gpl_only: hence the GPL-compatible licence string below
HELPER_LOOP = 181  # bpf_loop, Linux 5.17
BPF_NOEXIST = 1

#: The program is ours (MIT); "Dual MIT/GPL" is GPL-compatible for the kernel
#: (include/linux/license.h), which bpf_seq_write requires.
LICENSE = b"Dual MIT/GPL\0"

SOCKFS_MAGIC = 0x534F434B  # include/uapi/linux/magic.h
S_IFMT = 0o170000
S_IFSOCK = 0o140000
#: /proc/self/ns/pid of the initial pid namespace (PROC_PID_INIT_INO, include/linux/proc_ns.h).
PROC_PID_INIT_INO = 0xEFFFFFFC

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

#: One output record: tgid, tid, fd, pad, the leader's start_boottime (ns), socket inode.
RECORD = struct.Struct("<IIIIQQ")


class BPFUnavailable(Exception):
    """The BPF path cannot run here (reason in the message); use the /proc scan."""


class VerifierRejected(BPFUnavailable):
    """The kernel's verifier refused a program; the message carries its log."""


class Hit(NamedTuple):
    pid: int  # tgid, as /proc/PID names the process (initial pid namespace)
    tid: int  # the task whose fd table holds the socket (== pid unless the table is unshared)
    fd: int
    inode: int
    start_ticks: int  # the process's start, in /proc/PID/stat field-22 units


class ScanResult(NamedTuple):
    hits: tuple[Hit, ...]
    #: fd tables visited: one per process (kernel threads included), plus threads with a
    #: table of their own. (The task_file fallback only sees tasks with an open file.)
    tables: int


#: (struct, member path, size in bytes the programs load it with)
_MEMBERS = (
    ("bpf_iter__task_file", "meta", 8),
    ("bpf_iter__task_file", "task", 8),
    ("bpf_iter__task_file", "fd", 4),
    ("bpf_iter__task_file", "file", 8),
    ("bpf_iter__task", "meta", 8),
    ("bpf_iter__task", "task", 8),
    ("bpf_iter_meta", "seq", 8),
    ("task_struct", "pid", 4),
    ("task_struct", "tgid", 4),
    ("task_struct", "group_leader", 8),
    ("task_struct", "start_boottime", 8),
    ("task_struct", "files", 8),
    ("task_struct", "nsproxy", 8),
    ("task_struct", "cred", 8),
    ("files_struct", "fdt", 8),
    ("fdtable", "max_fds", 4),
    ("fdtable", "fd", 8),
    ("nsproxy", "net_ns", 8),
    ("net", "ns.inum", 4),
    ("cred", "euid", 4),
    ("file", "f_inode", 8),
    ("inode", "i_mode", 2),
    ("inode", "i_sb", 8),
    ("inode", "i_ino", 8),
    ("super_block", "s_magic", 8),
)
_TARGETS = ("bpf_iter_task", "bpf_iter_task_file")


class Layout:
    """Where the programs look: attach ids and byte offsets, all from vmlinux BTF."""

    __slots__ = ("attach", "offsets")

    def __init__(self, attach: dict[str, int], offsets: dict[str, int]) -> None:
        self.attach = attach  # iterator target -> BTF id of its FUNC
        self.offsets = offsets  # "struct.member" -> byte offset

    def __getitem__(self, key: str) -> int:
        return self.offsets[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.attach, self.offsets) == (other.attach, other.offsets)

    __hash__ = None  # type: ignore[assignment]


def layout_from_btf(data: bytes) -> Layout:
    """Find the attach points and the offsets; sizes are checked, not assumed."""
    b = btfmod.BTF(data)
    structs = sorted({s for s, _, _ in _MEMBERS})
    ids = b.find_all(
        [*((t, btfmod.KIND_FUNC) for t in _TARGETS), *((s, btfmod.KIND_STRUCT) for s in structs)]
    )
    offsets: dict[str, int] = {}
    for struct_name, member, size in _MEMBERS:
        m = b.member(ids[struct_name, btfmod.KIND_STRUCT], member)
        if m.size != size:
            raise btfmod.BTFError(f"{struct_name}.{member} is {m.size} bytes, expected {size}")
        offsets[f"{struct_name}.{member}"] = m.offset
    return Layout({t: ids[t, btfmod.KIND_FUNC] for t in _TARGETS}, offsets)


class Maps(NamedTuple):
    wanted: int  # HASH: socket inode (u64) -> u8; what the caller asks about
    files: int  # HASH: struct file address (u64) -> inode (u64); learnt while scanning
    bits: int  # ARRAY[1]: BITMAP_BYTES bitmap of hashed file addresses, a cheap pre-filter
    state: int  # ARRAY[1]: STATE
    uids: int  # HASH: euid (u32) -> u8; which tasks are likely holders (first pass only)


#: struct state {u32 mode, unknown, tables, netns, errors, pad}; mode 1: likely tasks only,
#: 2: every task. unknown: wanted inodes whose struct file is not learnt yet.
STATE = struct.Struct("<6I")
ST_MODE, ST_UNKNOWN, ST_TABLES, ST_NETNS, ST_ERRORS = 0, 4, 8, 12, 16
BITMAP_BYTES = 8192  # 2**16 bits, indexed by bits 6..21 of the file's address
FD_CHUNK = 16  # fd slots copied per bpf_loop step (16 * 8 = 128 bytes of stack)
# The callback's view of the task program's stack (bpf_loop's ctx), at fp-64 there.
CX_FDS, CX_MAX, CX_TGID, CX_TID, CX_START, CX_SEQ = 0, 8, 16, 20, 24, 32
# slot()'s ctx, on chunk()'s stack: FD_CHUNK file addresses, then these.
C2_FIRST, C2_CTX = 8 * FD_CHUNK, 8 * FD_CHUNK + 8


def _state_ptr(p: asm.Program, maps: Maps, key_off: int, null: str) -> None:
    """r0 = &state (an array lookup the verifier inlines); jump to ``null`` if it failed."""
    p.store_imm(4, asm.FP, key_off, 0)
    p.ld_map_fd(asm.R1, maps.state)
    p.mov(asm.R2, asm.FP)
    p.alu_imm(asm.ADD, asm.R2, key_off)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, asm.R0, 0, null)


def _count_error(p: asm.Program, maps: Maps, key_off: int, ret: int, prefix: str) -> None:
    _state_ptr(p, maps, key_off, f"{prefix}_err_out")
    p.load(4, asm.R1, asm.R0, ST_ERRORS)
    p.alu_imm(asm.ADD, asm.R1, 1)
    p.store(4, asm.R0, ST_ERRORS, asm.R1)
    p.label(f"{prefix}_err_out")
    p.mov_imm(asm.R0, ret)
    p.exit()


Built = tuple[bytes, tuple[tuple[str, int, int], ...]]  # instructions, (func, insn, params)


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
    r0, r1, r2, r3, r4, r6, r7, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
    # -- main: r6 ctx, r7 task, r8 task->files, r9 &state -----------------------------------
    # Task fields are copied with bpf_probe_read_kernel rather than loaded directly: each
    # direct load of a pointer field makes the verifier search all of vmlinux BTF by name
    # for "<struct>__safe_rcu"-style types (~1 ms each on 6.18); a copy costs it nothing.
    tmp, leader = -72, -80

    def read(dst: int, size: int, src: int, off: int) -> None:
        """*(fp + dst) = size bytes at src + off, or count an error and stop."""
        p.mov(r3, src)  # first: src may be r1 or r2
        p.alu_imm(asm.ADD, r3, off)
        p.mov(r1, fp)
        p.alu_imm(asm.ADD, r1, dst)
        p.mov_imm(r2, size)
        p.call(HELPER_PROBE_READ_KERNEL)
        p.jump_imm(asm.JNE, r0, 0, "main_fault")

    p.mov(r6, r1)
    p.load(8, r7, r6, lay["bpf_iter__task.task"])
    p.jump_imm(asm.JEQ, r7, 0, "out")  # the final call, from seq stop
    _state_ptr(p, maps, -4, "out")
    p.mov(r9, r0)
    read(tmp, 8, r7, lay["task_struct.files"])
    p.load(8, r8, fp, tmp)
    p.jump_imm(asm.JEQ, r8, 0, "out")  # exiting, or a kernel thread
    read(leader, 8, r7, lay["task_struct.group_leader"])
    p.load(8, r1, fp, leader)
    p.jump_reg(asm.JEQ, r1, r7, "own_table")
    p.jump_imm(asm.JEQ, r1, 0, "main_fault")
    read(tmp, 8, r1, lay["task_struct.files"])
    p.load(8, r2, fp, tmp)
    p.jump_reg(asm.JEQ, r2, r8, "out")  # CLONE_FILES thread: its leader's table is visited
    p.label("own_table")
    p.load(4, r1, r9, ST_MODE)
    p.jump_imm(asm.JNE, r1, 1, "scan")
    # first pass: same network namespace (if one is given) and a wanted euid
    p.load(4, r1, r9, ST_NETNS)
    p.jump_imm(asm.JEQ, r1, 0, "netns_ok")
    read(tmp, 8, r7, lay["task_struct.nsproxy"])
    p.load(8, r1, fp, tmp)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    read(tmp, 8, r1, lay["nsproxy.net_ns"])
    p.load(8, r1, fp, tmp)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    p.store_imm(8, fp, tmp, 0)
    read(tmp, 4, r1, lay["net.ns.inum"])
    p.load(8, r1, fp, tmp)
    p.load(4, r2, r9, ST_NETNS)
    p.jump_reg(asm.JNE, r1, r2, "out")
    p.label("netns_ok")
    read(tmp, 8, r7, lay["task_struct.cred"])
    p.load(8, r1, fp, tmp)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    read(-8, 4, r1, lay["cred.euid"])
    p.ld_map_fd(r1, maps.uids)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -8)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, r0, 0, "out")
    p.label("scan")
    p.load(4, r1, r9, ST_TABLES)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(4, r9, ST_TABLES, r1)
    read(tmp, 8, r8, lay["files_struct.fdt"])
    p.load(8, r8, fp, tmp)  # r8 = fdt from here on
    p.jump_imm(asm.JEQ, r8, 0, "out")
    p.store_imm(8, fp, -64 + CX_MAX, 0)
    read(-64 + CX_MAX, 4, r8, lay["fdtable.max_fds"])
    read(-64 + CX_FDS, 8, r8, lay["fdtable.fd"])
    read(-64 + CX_TGID, 4, r7, lay["task_struct.tgid"])
    read(-64 + CX_TID, 4, r7, lay["task_struct.pid"])
    p.load(8, r1, fp, leader)
    read(-64 + CX_START, 8, r1, lay["task_struct.start_boottime"])
    p.load(8, r1, r6, lay["bpf_iter__task.meta"])
    p.load(8, r1, r1, lay["bpf_iter_meta.seq"])
    p.store(8, fp, -64 + CX_SEQ, r1)
    p.load(8, r2, fp, -64 + CX_MAX)
    # bpf_loop(DIV_ROUND_UP(max_fds, FD_CHUNK), chunk, ctx = fp-64, 0)
    p.mov(r1, r2)
    p.alu_imm(asm.ADD, r1, FD_CHUNK - 1)
    p.alu_imm(asm.RSH, r1, 4)
    p.ld_func(r2, "chunk")
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, -64)
    p.mov_imm(r4, 0)
    p.call(HELPER_LOOP)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    p.label("main_fault")
    _count_error(p, maps, -4, 0, "main")

    # -- chunk(index, ctx): copy FD_CHUNK slots to the stack, then slot() over each -------
    # Its stack from fp-160 is slot()'s ctx: the slots, the chunk's first fd, the task ctx.
    cx2 = -160
    p.label("chunk")
    p.mov(r6, r2)
    p.mov(r7, r1)
    p.alu_imm(asm.LSH, r7, 4)
    p.load(8, r1, r6, CX_MAX)
    p.mov(r2, r7)
    p.alu_imm(asm.ADD, r2, FD_CHUNK)
    p.jump_reg(asm.JGT, r2, r1, "chunk_fault")  # max_fds is a multiple of BITS_PER_LONG
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, cx2)
    p.mov_imm(r2, 8 * FD_CHUNK)
    p.load(8, r3, r6, CX_FDS)
    p.mov(r4, r7)
    p.alu_imm(asm.LSH, r4, 3)
    p.alu(asm.ADD, r3, r4)
    p.call(HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "chunk_fault")
    p.store(8, fp, cx2 + C2_FIRST, r7)
    p.store(8, fp, cx2 + C2_CTX, r6)
    # bpf_loop(FD_CHUNK, slot, ctx = fp-160, 0): inlined by the verifier (Linux 6.0)
    p.mov_imm(r1, FD_CHUNK)
    p.ld_func(r2, "slot")
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, cx2)
    p.mov_imm(r4, 0)
    p.call(HELPER_LOOP)
    p.mov_imm(r0, 0)
    p.exit()
    p.label("chunk_fault")
    _count_error(p, maps, -4, 1, "chunk")

    # -- slot(k, ctx2): r6 ctx2, r7 k, r8 the slot's file address ------------------------
    p.label("slot")
    p.jump_imm(asm.JGT, r1, FD_CHUNK - 1, "slot_break")
    p.mov(r6, r2)
    p.mov(r7, r1)
    p.mov(r3, r1)
    p.alu_imm(asm.LSH, r3, 3)
    p.mov(r2, r6)
    p.alu(asm.ADD, r2, r3)
    p.load(8, r8, r2, 0)
    p.jump_imm(asm.JEQ, r8, 0, "slot_out")
    _state_ptr(p, maps, -4, "slot_break")
    p.load(4, r1, r0, ST_UNKNOWN)
    p.jump_imm(asm.JNE, r1, 0, "slot_check")  # still learning: every file is checked
    p.store_imm(4, fp, -8, 0)
    p.ld_map_fd(r1, maps.bits)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -8)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, r0, 0, "slot_break")
    # bitmap test: bit (addr >> 6) & 0xffff
    p.mov(r2, r8)
    p.alu_imm(asm.RSH, r2, 6)
    p.alu_imm(asm.AND, r2, 0xFFFF)
    p.mov(r3, r2)
    p.alu_imm(asm.RSH, r3, 3)
    p.alu(asm.ADD, r0, r3)
    p.load(1, r3, r0, 0)
    p.alu_imm(asm.AND, r2, 7)
    p.alu(asm.RSH, r3, r2)
    p.alu_imm(asm.AND, r3, 1)
    p.jump_imm(asm.JEQ, r3, 0, "slot_out")
    p.label("slot_check")
    p.load(8, r1, r6, C2_CTX)
    p.mov(r2, r8)
    p.load(8, r3, r6, C2_FIRST)
    p.alu(asm.ADD, r3, r7)
    p.call_local("check")
    p.label("slot_out")
    p.mov_imm(r0, 0)
    p.exit()
    p.label("slot_break")
    p.mov_imm(r0, 1)
    p.exit()

    # -- check(ctx, file, fd): r6 ctx, r7 file, r8 fd, r9 inode number (0: not known yet) ----
    i_mode, i_sb, i_ino = lay["inode.i_mode"], lay["inode.i_sb"], lay["inode.i_ino"]
    span = (max(i_mode + 2, i_sb + 8, i_ino + 8) + 7) & ~7
    ibuf = -16 - span
    p.label("check")
    p.mov(r6, r1)
    p.mov(r7, r2)
    p.mov(r8, r3)
    p.store(8, fp, -8, r7)
    p.ld_map_fd(r1, maps.files)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -8)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, r0, 0, "learn")
    # A known address: still read the inode, so that a file freed since (the socket closed)
    # and its memory reused for another file is not taken for the socket.
    p.load(8, r9, r0, 0)
    p.goto("deref")
    p.label("learn")
    p.mov_imm(r9, 0)  # 0: match by inode number (socket inodes are never 0, get_next_ino())
    _state_ptr(p, maps, -16, "check_out")
    p.load(4, r1, r0, ST_UNKNOWN)
    p.jump_imm(asm.JEQ, r1, 0, "check_out")
    p.label("deref")
    # inode = file->f_inode
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, -16)
    p.mov_imm(r2, 8)
    p.mov(r3, r7)
    p.alu_imm(asm.ADD, r3, lay["file.f_inode"])
    p.call(HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "check_fault")
    p.load(8, r3, fp, -16)
    p.jump_imm(asm.JEQ, r3, 0, "check_out")
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, ibuf)
    p.mov_imm(r2, span)
    p.call(HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "check_fault")
    # S_ISSOCK(i_mode) and i_sb->s_magic == SOCKFS_MAGIC: a socket, not an O_PATH fd on a
    # filesystem's socket file (same mode, unrelated inode number)
    p.load(2, r1, fp, ibuf + i_mode)
    p.alu_imm(asm.AND, r1, S_IFMT)
    p.jump_imm(asm.JNE, r1, S_IFSOCK, "check_out")
    p.load(8, r3, fp, ibuf + i_sb)
    p.jump_imm(asm.JEQ, r3, 0, "check_out")
    p.alu_imm(asm.ADD, r3, lay["super_block.s_magic"])
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, -16)
    p.mov_imm(r2, 8)
    p.call(HELPER_PROBE_READ_KERNEL)
    p.jump_imm(asm.JNE, r0, 0, "check_fault")
    p.load(8, r1, fp, -16)
    p.jump_imm(asm.JNE, r1, SOCKFS_MAGIC, "check_out")
    p.load(8, r1, fp, ibuf + i_ino)
    p.jump_imm(asm.JEQ, r9, 0, "by_number")
    p.jump_reg(asm.JNE, r1, r9, "check_out")  # a stale address
    p.goto("emit")
    p.label("by_number")
    p.mov(r9, r1)
    p.store(8, fp, -16, r9)
    p.ld_map_fd(r1, maps.wanted)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -16)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, r0, 0, "check_out")
    # learnt: files[file] = inode, set its bit, one unknown fewer
    p.ld_map_fd(r1, maps.files)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -8)
    p.mov(r3, fp)
    p.alu_imm(asm.ADD, r3, -16)
    p.mov_imm(r4, BPF_NOEXIST)
    p.call(HELPER_MAP_UPDATE_ELEM)
    p.jump_imm(asm.JNE, r0, 0, "emit")
    p.store_imm(4, fp, -20, 0)
    p.ld_map_fd(r1, maps.bits)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -20)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, r0, 0, "emit")
    p.mov(r1, r7)
    p.alu_imm(asm.RSH, r1, 6)
    p.alu_imm(asm.AND, r1, 0xFFFF)
    p.mov(r2, r1)
    p.alu_imm(asm.RSH, r2, 3)
    p.alu(asm.ADD, r0, r2)
    p.load(1, r3, r0, 0)
    p.alu_imm(asm.AND, r1, 7)
    p.mov_imm(r4, 1)
    p.alu(asm.LSH, r4, r1)
    p.alu(asm.OR, r3, r4)
    p.store(1, r0, 0, r3)
    _state_ptr(p, maps, -20, "emit")
    p.load(4, r1, r0, ST_UNKNOWN)
    p.jump_imm(asm.JEQ, r1, 0, "emit")
    p.alu_imm(asm.ADD, r1, -1)
    p.store(4, r0, ST_UNKNOWN, r1)
    # emit RECORD at fp-48
    p.label("emit")
    p.load(4, r1, r6, CX_TGID)
    p.store(4, fp, -48, r1)
    p.load(4, r1, r6, CX_TID)
    p.store(4, fp, -44, r1)
    p.store(4, fp, -40, r8)
    p.store_imm(4, fp, -36, 0)
    p.load(8, r1, r6, CX_START)
    p.store(8, fp, -32, r1)
    p.store(8, fp, -24, r9)
    p.load(8, r1, r6, CX_SEQ)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, -48)
    p.mov_imm(r3, RECORD.size)
    p.call(HELPER_SEQ_WRITE)
    p.label("check_out")
    p.mov_imm(r0, 0)
    p.exit()
    p.label("check_fault")
    _count_error(p, maps, -16, 0, "check")
    funcs = (
        ("rebind_tasks", 0, 1),
        ("rebind_chunk", p.address("chunk"), 2),
        ("rebind_slot", p.address("slot"), 2),
        ("rebind_check", p.address("check"), 3),
    )
    return p.assemble(), funcs


def build_task_file_program(lay: Layout, maps: Maps) -> Built:
    """The ``bpf_iter_task_file`` program (Linux 5.8+; used where bpf_loop is missing).

    Called once per (task, fd, file): reads file->f_inode for every file, so it costs a
    couple of cache misses per open file (about 2.5x slower than the fd-table program).
    """
    p = asm.Program()
    p.mov(asm.R6, asm.R1)
    # The last call (after every file, from seq stop) has task == file == NULL.
    p.load(8, asm.R7, asm.R6, lay["bpf_iter__task_file.file"])
    p.jump_imm(asm.JEQ, asm.R7, 0, "out")
    p.load(8, asm.R8, asm.R6, lay["bpf_iter__task_file.task"])
    p.jump_imm(asm.JEQ, asm.R8, 0, "out")
    # Count fd tables: the task changes when its first file is visited.
    _state_ptr(p, maps, -4, "out")
    p.load(4, asm.R1, asm.R8, lay["task_struct.pid"])
    p.load(4, asm.R2, asm.R0, ST_MODE)  # here: the last tid seen
    p.jump_reg(asm.JEQ, asm.R1, asm.R2, "same_task")
    p.store(4, asm.R0, ST_MODE, asm.R1)
    p.load(4, asm.R2, asm.R0, ST_TABLES)
    p.alu_imm(asm.ADD, asm.R2, 1)
    p.store(4, asm.R0, ST_TABLES, asm.R2)
    p.label("same_task")
    # Sockets only: S_ISSOCK(inode->i_mode) and the inode is sockfs's.
    p.load(8, asm.R9, asm.R7, lay["file.f_inode"])
    p.jump_imm(asm.JEQ, asm.R9, 0, "out")
    p.load(2, asm.R1, asm.R9, lay["inode.i_mode"])
    p.alu_imm(asm.AND, asm.R1, S_IFMT)
    p.jump_imm(asm.JNE, asm.R1, S_IFSOCK, "out")
    p.load(8, asm.R1, asm.R9, lay["inode.i_sb"])
    p.jump_imm(asm.JEQ, asm.R1, 0, "out")
    p.load(8, asm.R1, asm.R1, lay["super_block.s_magic"])
    p.jump_imm(asm.JNE, asm.R1, SOCKFS_MAGIC, "out")
    # Wanted? key = inode->i_ino at fp-8.
    p.load(8, asm.R1, asm.R9, lay["inode.i_ino"])
    p.store(8, asm.FP, -8, asm.R1)
    p.ld_map_fd(asm.R1, maps.wanted)
    p.mov(asm.R2, asm.FP)
    p.alu_imm(asm.ADD, asm.R2, -8)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, asm.R0, 0, "out")
    # RECORD at fp-40 .. fp-8.
    p.load(4, asm.R1, asm.R8, lay["task_struct.tgid"])
    p.store(4, asm.FP, -40, asm.R1)
    p.load(4, asm.R1, asm.R8, lay["task_struct.pid"])
    p.store(4, asm.FP, -36, asm.R1)
    p.load(4, asm.R1, asm.R6, lay["bpf_iter__task_file.fd"])
    p.store(4, asm.FP, -32, asm.R1)
    p.store_imm(4, asm.FP, -28, 0)
    p.load(8, asm.R1, asm.R8, lay["task_struct.group_leader"])
    p.load(8, asm.R1, asm.R1, lay["task_struct.start_boottime"])
    p.store(8, asm.FP, -24, asm.R1)
    p.load(8, asm.R1, asm.FP, -8)
    p.store(8, asm.FP, -16, asm.R1)
    p.load(8, asm.R1, asm.R6, lay["bpf_iter__task_file.meta"])
    p.load(8, asm.R1, asm.R1, lay["bpf_iter_meta.seq"])
    p.mov(asm.R2, asm.FP)
    p.alu_imm(asm.ADD, asm.R2, -40)
    p.mov_imm(asm.R3, RECORD.size)
    p.call(HELPER_SEQ_WRITE)
    p.label("out")
    p.mov_imm(asm.R0, 0)
    p.exit()
    return p.assemble(), ()


# ---------------------------------------------------------------------------------------------
# bpf(2)

_syscall: Callable[[int, int, int, int], int] | None = None


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    global _syscall
    machine = os.uname().machine
    nr = _NR_BPF.get(machine)
    if nr is None:
        raise BPFUnavailable(f"bpf(2) number unknown for {machine}")
    if _syscall is None:
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        fn.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
        _syscall = fn
    while True:
        rc = int(_syscall(nr, cmd, ctypes.addressof(attr), len(attr)))
        if rc >= 0:
            return rc
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    raw = struct.pack(fmt, *values)
    return ctypes.create_string_buffer(raw, len(raw))


def _map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    # union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags
    return _bpf(BPF_MAP_CREATE, _attr("<5I", map_type, key_size, value_size, max_entries, 0))


def _map_fill(map_fd: int, keys: list[int], key_fmt: str) -> None:
    """One BPF_MAP_UPDATE_BATCH: every key with a zero u8 value."""
    kbuf = ctypes.create_string_buffer(struct.pack(f"<{len(keys)}{key_fmt}", *keys))
    vbuf = ctypes.create_string_buffer(len(keys))
    # batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    attr = _attr("<QQQQIIQQ", 0, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), len(keys), map_fd, 0, 0)
    _bpf(BPF_MAP_UPDATE_BATCH, attr)
    done = struct.unpack_from("<I", attr, 32)[0]
    if done != len(keys):
        raise BPFUnavailable(f"map update stopped after {done} of {len(keys)} keys")


def _map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    # map_fd, (pad), key, value, flags
    _bpf(BPF_MAP_LOOKUP_ELEM, _attr("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    return v.raw


def _map_update(map_fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _attr("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def _btf_load(blob: bytes) -> int:
    buf = ctypes.create_string_buffer(blob, len(blob))
    # btf, btf_log_buf, btf_size, btf_log_size, btf_log_level
    return _bpf(BPF_BTF_LOAD, _attr("<QQIII4x", ctypes.addressof(buf), 0, len(blob), 0, 0))


def _prog_load(
    insns: bytes,
    attach_btf_id: int,
    log_size: int = 0,
    funcs: Sequence[tuple[str, int, int]] = (),
) -> int:
    """Load a tracing/iterator program; ``funcs``: (name, first insn, params) per function,
    for the func_info BTF that programs with callbacks need."""
    btf_fd = 0
    finfo = None
    if funcs:
        btf_fd = _btf_load(btfmod.encode_funcs((name, n) for name, _, n in funcs))
        # struct bpf_func_info {insn_off, type_id}: FUNC ids are 3, 5, 7.. in encode_funcs
        recs = b"".join(struct.pack("<II", at, 3 + 2 * i) for i, (_, at, _) in enumerate(funcs))
        finfo = ctypes.create_string_buffer(recs, len(recs))
    try:
        return _prog_load_attr(insns, attach_btf_id, log_size, btf_fd, finfo, len(funcs))
    finally:
        if btf_fd:
            os.close(btf_fd)


def _prog_load_attr(
    insns: bytes,
    attach_btf_id: int,
    log_size: int,
    btf_fd: int,
    finfo: ctypes.Array[ctypes.c_char] | None,
    nfuncs: int,
) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(LICENSE, len(LICENSE))
    log = ctypes.create_string_buffer(log_size) if log_size else None
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16], prog_ifindex, expected_attach_type, prog_btf_fd,
    # func_info_rec_size, func_info, func_info_cnt, line_info_rec_size, line_info,
    # line_info_cnt, attach_btf_id, attach_btf_obj_fd (0: vmlinux)
    attr = _attr(
        "<IIQQIIQII16sIIIIQIIQIII",
        BPF_PROG_TYPE_TRACING,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(lic),
        1 if log else 0,
        log_size,
        ctypes.addressof(log) if log else 0,
        0,
        0,
        b"rebind_owners",
        0,
        BPF_TRACE_ITER,
        btf_fd,
        8 if finfo is not None else 0,
        ctypes.addressof(finfo) if finfo is not None else 0,
        nfuncs,
        0,
        0,
        0,
        attach_btf_id,
        0,
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        if log is None:
            raise
        text = log.value.decode(errors="replace").strip()
        raise VerifierRejected(f"verifier rejected the program ({exc.strerror}):\n{text}") from exc


def _link_create(prog_fd: int) -> int:
    # prog_fd, target_fd, attach_type, flags, iter_info, iter_info_len (no map/task filter)
    return _bpf(BPF_LINK_CREATE, _attr("<IIIIQI4x", prog_fd, 0, BPF_TRACE_ITER, 0, 0, 0))


def _iter_create(link_fd: int) -> int:
    return _bpf(BPF_ITER_CREATE, _attr("<II", link_fd, 0))


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    again = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            # bpf_seq_read() gives up with EAGAIN after MAX_ITER_OBJECTS (1M) files without
            # output; the iterator keeps its place, so reading again goes on from there.
            again += 1
            if again > 10_000:
                raise
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ---------------------------------------------------------------------------------------------
# The scan

_layout: Layout | None = None


#: Capability bits (include/uapi/linux/capability.h): tracing programs need CAP_BPF and
#: CAP_PERFMON (Linux 5.8), or CAP_SYS_ADMIN.
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def _check_environment() -> None:
    """Cheap reasons not to try, before the BTF is read."""
    try:
        with open("/proc/self/status", "rb") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith(b"CapEff:")), 0)
    except (OSError, ValueError, IndexError):
        caps = 0
    bpf_caps = (1 << CAP_BPF) | (1 << CAP_PERFMON)
    if caps & bpf_caps != bpf_caps and not caps & (1 << CAP_SYS_ADMIN):
        raise BPFUnavailable("no CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN)")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError as exc:
        raise BPFUnavailable(f"cannot tell the pid namespace: {exc.strerror}") from exc
    if pidns != PROC_PID_INIT_INO:
        # task->tgid is the pid of the initial namespace; /proc here numbers them differently.
        raise BPFUnavailable("not in the initial pid namespace")


#: Finding the layout walks ~65k BTF records (~15 ms); it cannot change until the next boot,
#: so it is kept in /run (a tmpfs, emptied at boot) keyed by boot id and BTF size.
CACHE_PATH = "/run/rebind/bpf-layout"
_CACHE_MAGIC = "rebind-bpf-layout 1"


def _cache_key() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return f"{boot_id} {os.stat(BTF_PATH).st_size}"
    except OSError:
        return None


def _read_cache(key: str) -> Layout | None:
    try:
        fd = os.open(CACHE_PATH, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None  # not ours, or writable by others: do not trust it
        text = os.read(fd, 1 << 16).decode()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    lines = text.splitlines()
    if len(lines) < 2 or lines[0] != _CACHE_MAGIC or lines[1] != key:
        return None
    attach: dict[str, int] = {}
    offsets: dict[str, int] = {}
    try:
        for line in lines[2:]:
            kind, name, value = line.split()
            (attach if kind == "attach" else offsets)[name] = int(value)
    except ValueError:
        return None
    if set(attach) != set(_TARGETS) or set(offsets) != {f"{s}.{m}" for s, m, _ in _MEMBERS}:
        return None
    return Layout(attach, offsets)


def _write_cache(key: str, lay: Layout) -> None:
    body = [_CACHE_MAGIC, key]
    body += [f"attach {k} {v}" for k, v in sorted(lay.attach.items())]
    body += [f"offset {k} {v}" for k, v in sorted(lay.offsets.items())]
    tmp = f"{CACHE_PATH}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(CACHE_PATH), mode=0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, ("\n".join(body) + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, CACHE_PATH)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_layout(*, use_cache: bool = True) -> Layout:
    """The layout of this kernel, from the per-boot cache or from its BTF."""
    global _layout
    if _layout is not None:
        return _layout
    key = _cache_key() if use_cache else None
    if key is not None and (cached := _read_cache(key)) is not None:
        _layout = cached
        return cached
    try:
        with open(BTF_PATH, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BPFUnavailable(f"no kernel BTF ({BTF_PATH}: {exc.strerror})") from exc
    try:
        _layout = layout_from_btf(data)
    except btfmod.BTFError as exc:
        raise BPFUnavailable(f"kernel BTF: {exc}") from exc
    if key is not None:
        _write_cache(key, _layout)
    return _layout


def _boottime_offset_ns() -> int:
    """This time namespace's boottime offset: /proc/PID/stat adds it (timens_add_boottime_ns)."""
    try:
        with open("/proc/self/timens_offsets", "rb") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in (b"boottime", b"7"):  # name, or CLOCK_BOOTTIME's number
                    return int(parts[1]) * 1_000_000_000 + int(parts[2])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # no CONFIG_TIME_NS: no offsets


def _load(program: tuple[bytes, Sequence[tuple[str, int, int]]], attach_btf_id: int) -> int:
    insns, funcs = program
    try:
        return _prog_load(insns, attach_btf_id, funcs=funcs)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise BPFUnavailable(f"loading a BPF program: {exc.strerror}") from exc
    # Load again, with the verifier's log this time, to say why.
    return _prog_load(insns, attach_btf_id, log_size=1 << 20, funcs=funcs)


def _run(prog_fd: int, passes: Iterable[bytes | None], state_fd: int) -> tuple[bytes, bytes]:
    """Run the iterator once per pass (state written before each); output and final state."""
    out = []
    link_fd = _link_create(prog_fd)
    try:
        for st in passes:
            if st is not None:
                _map_update(state_fd, b"\0\0\0\0", st)
            iter_fd = _iter_create(link_fd)
            try:
                out.append(_read_all(iter_fd))
            finally:
                os.close(iter_fd)
    finally:
        os.close(link_fd)
    return b"".join(out), _map_lookup(state_fd, b"\0\0\0\0", STATE.size)


def find_socket_holders(
    inodes: Iterable[int],
    *,
    uids: Iterable[int] = (),
    netns: int | None = None,
    per_file: bool = False,
) -> ScanResult:
    """Every (process, fd) whose file is one of these sockets.

    ``uids`` and ``netns`` (the sockets') only say which tasks to look at first: every task
    is visited whatever they are. ``per_file`` forces the slower task_file program (what
    kernels before 5.17 get). Raises BPFUnavailable when this cannot be done here.
    """
    wanted = sorted({i for i in inodes if i})
    if not wanted:
        return ScanResult((), 0)
    _check_environment()
    lay = load_layout()
    uid_list = sorted({u for u in uids if 0 <= u < 1 << 32})
    fds: list[int] = []
    try:
        try:
            maps = Maps(
                wanted=_map_create(BPF_MAP_TYPE_HASH, 8, 1, len(wanted)),
                files=_map_create(BPF_MAP_TYPE_HASH, 8, 8, len(wanted)),
                bits=_map_create(BPF_MAP_TYPE_ARRAY, 4, BITMAP_BYTES, 1),
                state=_map_create(BPF_MAP_TYPE_ARRAY, 4, STATE.size, 1),
                uids=_map_create(BPF_MAP_TYPE_HASH, 4, 1, max(len(uid_list), 1)),
            )
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        fds.extend((maps.wanted, maps.files, maps.bits, maps.state, maps.uids))
        try:
            _map_fill(maps.wanted, wanted, "Q")
            if uid_list:
                _map_fill(maps.uids, uid_list, "I")
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        rejected: VerifierRejected | None = None
        if not per_file:
            try:
                data, st = _scan_fdtables(lay, maps, len(wanted), netns, likely_first=bool(uid_list))
            except VerifierRejected as exc:
                rejected = exc  # before Linux 5.17 (no bpf_loop): the per-file program
        if per_file or rejected is not None:
            try:
                prog_fd = _load(build_task_file_program(lay, maps), lay.attach["bpf_iter_task_file"])
            except BPFUnavailable as exc:
                raise BPFUnavailable(f"{rejected}\nand the task_file program: {exc}") from exc
            fds.append(prog_fd)
            data, st = _run(prog_fd, [STATE.pack(0, 0, 0, 0, 0, 0)], maps.state)
    except OSError as exc:
        raise BPFUnavailable(f"BPF iterator: {exc.strerror}") from exc
    finally:
        for fd in fds:
            os.close(fd)
    _mode, _unknown, tables, _netns, errors, _ = STATE.unpack(st)
    if errors:
        raise BPFUnavailable(f"{errors} fd table chunk(s) or file(s) could not be read")
    if len(data) % RECORD.size:
        raise BPFUnavailable(f"iterator output of {len(data)} bytes is not whole records")
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    offset = _boottime_offset_ns()
    hits = {
        (tgid, fd, ino): Hit(tgid, tid, fd, ino, (start + offset) // tick_ns)
        for tgid, tid, fd, _, start, ino in RECORD.iter_unpack(data)
    }
    return ScanResult(tuple(hits.values()), tables)


def _scan_fdtables(
    lay: Layout, maps: Maps, unknown: int, netns: int | None, *, likely_first: bool
) -> tuple[bytes, bytes]:
    """Load the fd-table program; a first pass over likely tasks, then every task."""
    prog_fd = _load(build_fdtable_program(lay, maps), lay.attach["bpf_iter_task"])
    try:
        out = b""
        if likely_first:
            out, st = _run(prog_fd, [STATE.pack(1, unknown, 0, netns or 0, 0, 0)], maps.state)
            _mode, unknown, _tables, _netns, errors, _pad = STATE.unpack(st)
            if errors:
                return out, st
        # every task; the addresses learnt so far stay in maps.files, "unknown" carries over
        data, st = _run(prog_fd, [STATE.pack(2, unknown, 0, 0, 0, 0)], maps.state)
        return out + data, st
    finally:
        os.close(prog_fd)
