"""Who holds these sockets, asked of the kernel in one pass: a BPF ``task_file`` iterator.

The /proc scan reads one ``/proc/PID/fd/N`` link per open file of every process. Since Linux
5.8 (commit eaaacd23910f, "bpf: Add task and task/file iterator targets") a BPF program can be
run over every (task, fd, struct file) instead: ``bpf_iter_task_file``. Ours keeps the files
whose inode is on sockfs (``S_IFSOCK`` and ``i_sb->s_magic == SOCKFS_MAGIC``) and whose
``i_ino`` is in a hash map of the wanted socket inodes (the ``socket:[INODE]`` number of
/proc and inet_diag), and writes ``(tgid, tid, fd, leader start, inode)`` to the iterator's
seq_file. Nothing is sampled or skipped: every task the kernel has is visited, whatever its
uid or network namespace.

Everything is raw ``bpf(2)`` through ctypes (no libbpf, no compiler): the program is
assembled by :mod:`rebind.kernel.bpf_asm`, and the attach point and the struct offsets it
reads come from the kernel's own BTF (/sys/kernel/btf/vmlinux) via :mod:`rebind.kernel.btf`.
The verifier checks every load against that same BTF.

Threads: the iterator skips a thread whose fd table is its leader's (``task_file_seq_get_next``
with ``skip_if_dup_files``), so each fd table is visited once. A thread with a table of its own
(``unshare(CLONE_FILES)``) is visited too and reported under its process (tgid).

Needs CAP_BPF + CAP_PERFMON (tracing programs) and BTF; anything missing raises
:class:`BPFUnavailable` and callers fall back to the /proc scan.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from rebind.kernel import bpf_asm as asm
from rebind.kernel import btf as btfmod

BTF_PATH = "/sys/kernel/btf/vmlinux"

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_PROG_LOAD = 5
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
HELPER_SEQ_WRITE = 127  # gpl_only: hence the GPL-compatible licence string below

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
#: The counter map's value: last tid seen, fd tables visited.
COUNTER = struct.Struct("<II")


class BPFUnavailable(Exception):
    """The BPF path cannot run here (reason in the message); use the /proc scan."""


@dataclass(frozen=True, slots=True)
class Hit:
    pid: int  # tgid, as /proc/PID names the process (initial pid namespace)
    tid: int  # the task whose fd table holds the socket (== pid unless the table is unshared)
    fd: int
    inode: int
    start_ticks: int  # the process's start, in /proc/PID/stat field-22 units


@dataclass(frozen=True, slots=True)
class ScanResult:
    hits: tuple[Hit, ...]
    #: fd tables the iterator visited (one per process, plus threads with unshared tables;
    #: a process with no open file at all is never handed to the program and is not counted).
    tables: int


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the program looks: the attach id and byte offsets, all from vmlinux BTF."""

    attach_btf_id: int
    ctx_meta: int
    ctx_task: int
    ctx_fd: int
    ctx_file: int
    meta_seq: int
    file_f_inode: int
    inode_i_mode: int
    inode_i_sb: int
    inode_i_ino: int
    sb_s_magic: int
    task_pid: int
    task_tgid: int
    task_group_leader: int
    task_start_boottime: int


#: (struct, member, size in bytes the program loads it with)
_MEMBERS = (
    ("bpf_iter__task_file", "meta", 8),
    ("bpf_iter__task_file", "task", 8),
    ("bpf_iter__task_file", "fd", 4),
    ("bpf_iter__task_file", "file", 8),
    ("bpf_iter_meta", "seq", 8),
    ("file", "f_inode", 8),
    ("inode", "i_mode", 2),
    ("inode", "i_sb", 8),
    ("inode", "i_ino", 8),
    ("super_block", "s_magic", 8),
    ("task_struct", "pid", 4),
    ("task_struct", "tgid", 4),
    ("task_struct", "group_leader", 8),
    ("task_struct", "start_boottime", 8),
)


def layout_from_btf(data: bytes) -> Layout:
    """Find the attach point and the offsets; sizes are checked, not assumed."""
    b = btfmod.BTF(data)
    structs = sorted({s for s, _, _ in _MEMBERS})
    ids = b.find_all(
        [("bpf_iter_task_file", btfmod.KIND_FUNC), *((s, btfmod.KIND_STRUCT) for s in structs)]
    )
    offsets: list[int] = []
    for struct_name, member, size in _MEMBERS:
        m = b.member(ids[struct_name, btfmod.KIND_STRUCT], member)
        if m.size != size:
            raise btfmod.BTFError(f"{struct_name}.{member} is {m.size} bytes, expected {size}")
        offsets.append(m.offset)
    return Layout(ids["bpf_iter_task_file", btfmod.KIND_FUNC], *offsets)


def build_program(lay: Layout, wanted_fd: int, counter_fd: int) -> bytes:
    """The iterator program; ``r6`` = ctx, ``r7`` = file, ``r8`` = task, ``r9`` = inode."""
    p = asm.Program()
    p.mov(asm.R6, asm.R1)
    # The last call (after every file, from seq stop) has task == file == NULL.
    p.load(8, asm.R7, asm.R6, lay.ctx_file)
    p.jump_imm(asm.JEQ, asm.R7, 0, "out")
    p.load(8, asm.R8, asm.R6, lay.ctx_task)
    p.jump_imm(asm.JEQ, asm.R8, 0, "out")
    # Count fd tables: the task changes when its first file is visited.
    p.store_imm(4, asm.FP, -4, 0)
    p.ld_map_fd(asm.R1, counter_fd)
    p.mov(asm.R2, asm.FP)
    p.alu_imm(asm.ADD, asm.R2, -4)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, asm.R0, 0, "out")
    p.load(4, asm.R1, asm.R8, lay.task_pid)
    p.load(4, asm.R2, asm.R0, 0)
    p.jump_reg(asm.JEQ, asm.R1, asm.R2, "same_task")
    p.store(4, asm.R0, 0, asm.R1)
    p.load(4, asm.R2, asm.R0, 4)
    p.alu_imm(asm.ADD, asm.R2, 1)
    p.store(4, asm.R0, 4, asm.R2)
    p.label("same_task")
    # Sockets only: S_ISSOCK(inode->i_mode) and the inode is sockfs's (an O_PATH fd on a
    # filesystem's socket file is S_IFSOCK too, with an unrelated inode number).
    p.load(8, asm.R9, asm.R7, lay.file_f_inode)
    p.jump_imm(asm.JEQ, asm.R9, 0, "out")
    p.load(2, asm.R1, asm.R9, lay.inode_i_mode)
    p.alu_imm(asm.AND, asm.R1, S_IFMT)
    p.jump_imm(asm.JNE, asm.R1, S_IFSOCK, "out")
    p.load(8, asm.R1, asm.R9, lay.inode_i_sb)
    p.jump_imm(asm.JEQ, asm.R1, 0, "out")
    p.load(8, asm.R1, asm.R1, lay.sb_s_magic)
    p.jump_imm(asm.JNE, asm.R1, SOCKFS_MAGIC, "out")
    # Wanted? key = inode->i_ino at fp-8.
    p.load(8, asm.R1, asm.R9, lay.inode_i_ino)
    p.store(8, asm.FP, -8, asm.R1)
    p.ld_map_fd(asm.R1, wanted_fd)
    p.mov(asm.R2, asm.FP)
    p.alu_imm(asm.ADD, asm.R2, -8)
    p.call(HELPER_MAP_LOOKUP_ELEM)
    p.jump_imm(asm.JEQ, asm.R0, 0, "out")
    # The record, RECORD, at fp-40 .. fp-8.
    p.load(4, asm.R1, asm.R8, lay.task_tgid)
    p.store(4, asm.FP, -40, asm.R1)
    p.load(4, asm.R1, asm.R8, lay.task_pid)
    p.store(4, asm.FP, -36, asm.R1)
    p.load(4, asm.R1, asm.R6, lay.ctx_fd)
    p.store(4, asm.FP, -32, asm.R1)
    p.store_imm(4, asm.FP, -28, 0)
    p.load(8, asm.R1, asm.R8, lay.task_group_leader)
    p.load(8, asm.R1, asm.R1, lay.task_start_boottime)
    p.store(8, asm.FP, -24, asm.R1)
    p.load(8, asm.R1, asm.FP, -8)
    p.store(8, asm.FP, -16, asm.R1)
    # bpf_seq_write(ctx->meta->seq, fp-40, 32)
    p.load(8, asm.R1, asm.R6, lay.ctx_meta)
    p.load(8, asm.R1, asm.R1, lay.meta_seq)
    p.mov(asm.R2, asm.FP)
    p.alu_imm(asm.ADD, asm.R2, -40)
    p.mov_imm(asm.R3, RECORD.size)
    p.call(HELPER_SEQ_WRITE)
    p.label("out")
    p.mov_imm(asm.R0, 0)
    p.exit()
    return p.assemble()


# ---------------------------------------------------------------------------------------------
# bpf(2)

_syscall: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    global _syscall
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BPFUnavailable(f"bpf(2) number unknown for {platform.machine()}")
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


def _map_fill(map_fd: int, inodes: list[int]) -> None:
    keys = ctypes.create_string_buffer(struct.pack(f"<{len(inodes)}Q", *inodes), 8 * len(inodes))
    values = ctypes.create_string_buffer(1 * len(inodes))
    # batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    attr = _attr(
        "<QQQQIIQQ", 0, 0, ctypes.addressof(keys), ctypes.addressof(values), len(inodes), map_fd, 0, 0
    )
    _bpf(BPF_MAP_UPDATE_BATCH, attr)
    done = struct.unpack_from("<I", attr, 32)[0]
    if done != len(inodes):
        raise BPFUnavailable(f"map update stopped after {done} of {len(inodes)} inodes")


def _map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    # map_fd, (pad), key, value, flags
    _bpf(BPF_MAP_LOOKUP_ELEM, _attr("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    return v.raw


def _prog_load(insns: bytes, attach_btf_id: int, log_size: int = 0) -> int:
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
        0,
        0,
        0,
        0,
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
        raise BPFUnavailable(f"verifier rejected the program ({exc.strerror}):\n{text}") from exc


def _link_create(prog_fd: int) -> int:
    # prog_fd, target_fd, attach_type, flags, iter_info, iter_info_len (no map/task filter)
    return _bpf(BPF_LINK_CREATE, _attr("<IIIIQI4x", prog_fd, 0, BPF_TRACE_ITER, 0, 0, 0))


def _iter_create(link_fd: int) -> int:
    return _bpf(BPF_ITER_CREATE, _attr("<II", link_fd, 0))


def _read_all(fd: int) -> bytes:
    chunks = []
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


def _check_environment() -> None:
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError as exc:
        raise BPFUnavailable(f"cannot tell the pid namespace: {exc.strerror}") from exc
    if pidns != PROC_PID_INIT_INO:
        # task->tgid is the pid of the initial namespace; /proc here numbers them differently.
        raise BPFUnavailable("not in the initial pid namespace")


def load_layout() -> Layout:
    global _layout
    if _layout is None:
        try:
            with open(BTF_PATH, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise BPFUnavailable(f"no kernel BTF ({BTF_PATH}: {exc.strerror})") from exc
        try:
            _layout = layout_from_btf(data)
        except btfmod.BTFError as exc:
            raise BPFUnavailable(f"kernel BTF: {exc}") from exc
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


def find_socket_holders(inodes: Iterable[int]) -> ScanResult:
    """Every (process, fd) whose file is one of these sockets, in one kernel pass.

    Raises BPFUnavailable when this cannot be done here (the caller falls back to /proc).
    """
    wanted = sorted({i for i in inodes if i})
    if not wanted:
        return ScanResult((), 0)
    _check_environment()
    lay = load_layout()
    fds: list[int] = []
    try:
        try:
            wanted_fd = _map_create(BPF_MAP_TYPE_HASH, 8, 1, len(wanted))
            fds.append(wanted_fd)
            counter_fd = _map_create(BPF_MAP_TYPE_ARRAY, 4, COUNTER.size, 1)
            fds.append(counter_fd)
            _map_fill(wanted_fd, wanted)
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        insns = build_program(lay, wanted_fd, counter_fd)
        try:
            prog_fd = _prog_load(insns, lay.attach_btf_id)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise BPFUnavailable(f"loading a BPF program: {exc.strerror}") from exc
            # Load again, with the verifier's log this time, to say why.
            prog_fd = _prog_load(insns, lay.attach_btf_id, log_size=1 << 16)
        fds.append(prog_fd)
        try:
            link_fd = _link_create(prog_fd)
            fds.append(link_fd)
            iter_fd = _iter_create(link_fd)
            fds.append(iter_fd)
            data = _read_all(iter_fd)
            tables = COUNTER.unpack(_map_lookup(counter_fd, b"\0\0\0\0", COUNTER.size))[1]
        except OSError as exc:
            raise BPFUnavailable(f"BPF iterator: {exc.strerror}") from exc
    finally:
        for fd in reversed(fds):
            os.close(fd)
    if len(data) % RECORD.size:
        raise BPFUnavailable(f"iterator output of {len(data)} bytes is not whole records")
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    offset = _boottime_offset_ns()
    hits = {
        (tgid, fd, ino): Hit(tgid, tid, fd, ino, (start + offset) // tick_ns)
        for tgid, tid, fd, _, start, ino in RECORD.iter_unpack(data)
    }
    return ScanResult(tuple(hits.values()), tables)
