"""The flight recorder's program (``rebind trace``): failing bind/listen/connect calls (pure).

Where it attaches, decided by what loads (measured costs: docs/benchmarks.md, "Trace"):

* **fexit** on ``inet_bind``/``inet6_bind``/``inet_listen``/``inet_stream_connect`` was the plan
  (arguments and return value of exactly the calls that matter, nothing else pays). On the
  kernel this was built on (6.18.44, CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y, root with every
  capability) ``BPF_PROG_LOAD`` of any ``BPF_TRACE_FENTRY``/``FEXIT``/``MODIFY_RETURN`` program,
  even ``r0 = 0; exit``, fails with EPERM before the verifier writes a line, while raw
  tracepoints and ``tp_btf`` load: a host that forbids trampolines is a case to handle anyway.
  kprobes are not built in (CONFIG_KPROBES unset) and there is no tracepoint in the bind path.
* So: one ``BPF_PROG_TYPE_RAW_TRACEPOINT`` program (Linux 4.17) on **``sys_exit``**
  (raw_syscalls), attached with ``BPF_RAW_TRACEPOINT_OPEN``. Its context is ``{struct pt_regs
  *regs, long ret}``; on x86_64 the user's argument registers (``di``, ``si``, ``dx``) and
  ``orig_ax`` (the syscall number) are still in ``regs`` at exit. Every syscall of every task
  runs the first five instructions (``ret >= 0``: out), so a successful call costs the
  tracepoint's slow-path exit and those; only a failing bind(2)/listen(2)/connect(2) with a
  wanted errno reads anything.

On such a failure the program follows the fd (``current->files->fdt->fd[fd]``) to its
``struct file``, checks ``S_IFSOCK`` on its inode, takes ``file->private_data`` (the
``struct socket``) and its ``sk``, copies what the model needs into one fixed :data:`EVENT`
(the socket's flags, bound device, uid, family, protocol, netns inode, the caller's pid, comm,
cgroup id; the sockaddr from user memory with ``bpf_probe_read_user``) and hands it to
``bpf_ringbuf_output`` (Linux 5.8). A full ring is counted in the per-CPU ``counters`` map:
a lost event is counted, never silent.

Not seen: io_uring's IORING_OP_BIND/LISTEN/CONNECT (no syscall), in-kernel binds (kernel_bind),
and 32-bit (ia32) processes, whose syscall numbers differ (their failures are not decoded). Bitfields
(``skc_reuse``, ``skc_reuseport``, ``skc_ipv6only``) are copied as the raw bytes that hold them
and decoded in Python with the bit offsets BTF gives (:class:`TraceLayout`).
"""

from __future__ import annotations

import os
import struct
from typing import Final, NamedTuple

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import btf as btfmod
from rebind.model.trace import Kind

# enum bpf_func_id (include/uapi/linux/bpf.h)
HELPER_KTIME_GET_NS = 5  # CLOCK_MONOTONIC
HELPER_GET_CURRENT_PID_TGID = 14
HELPER_GET_CURRENT_COMM = 16
HELPER_GET_CURRENT_TASK = 35
HELPER_GET_CURRENT_CGROUP_ID = 80  # cgroup v2 id: the inode of its directory in cgroupfs
HELPER_RINGBUF_OUTPUT = 130  # Linux 5.8

#: Highest errno the filter map covers (MAX_ERRNO, include/linux/err.h).
MAX_ERRNO = 4095
S_IFMT = 0o170000
S_IFSOCK = 0o140000
SOCKADDR_BYTES = 28  # sizeof(struct sockaddr_in6), the largest inet address


#: Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) and where the arguments sit in
#: struct pt_regs at sys_exit. Other architectures: not supported yet (BPFUnavailable).
SYSCALLS = {"x86_64": {42: Kind.CONNECT, 49: Kind.BIND, 50: Kind.LISTEN}}
ARG_REGS = {"x86_64": ("orig_ax", "di", "si", "dx")}

#: The event record (little-endian).
EVENT = struct.Struct("<QQQIIIiIIHHHHIHHII32s16s16sI4x")


class Ev:
    """Byte offsets in :data:`EVENT` (the program writes them; model.trace decodes them)."""

    TS: Final = 0  # u64 bpf_ktime_get_ns (CLOCK_MONOTONIC)
    CGROUP: Final = 8  # u64 bpf_get_current_cgroup_id
    INO: Final = 16  # u64 the socket's inode number
    TID: Final = 24  # u32 (bpf_get_current_pid_tgid low half)
    TGID: Final = 28  # u32
    NETNS: Final = 32  # u32 sk->__sk_common.skc_net.net->ns.inum
    ERRNO: Final = 36  # s32, positive
    UID: Final = 40  # u32 sk->sk_uid
    DEV: Final = 44  # u32 skc_bound_dev_if
    KIND: Final = 48  # u16 Kind
    FAMILY: Final = 50  # u16 skc_family (0: the fd was not a socket by then)
    TYPE: Final = 52  # u16 sk_type
    PROTO: Final = 54  # u16 sk_protocol
    FLAGS: Final = 56  # u32 raw bytes holding skc_reuse/skc_reuseport/skc_ipv6only
    NUM: Final = 60  # u16 skc_num: the socket's bound local port (host order), 0 if none
    PAD: Final = 62  # u16
    ARG: Final = 64  # u32 addrlen (bind, connect) or backlog (listen)
    SADDR4: Final = 68  # u32 skc_rcv_saddr (network order)
    SOCKADDR: Final = 72  # 28 bytes of the caller's sockaddr (user memory), 4 zero
    SADDR6: Final = 104  # 16 bytes skc_v6_rcv_saddr
    COMM: Final = 120  # 16 bytes bpf_get_current_comm
    FD: Final = 136  # u32 the fd argument
    SIZE: Final = 144


assert EVENT.size == Ev.SIZE

#: (struct, member path, size or None): plain members the program reads.
MEMBERS = (
    ("task_struct", "files", 8),
    ("files_struct", "fdt", 8),
    ("fdtable", "max_fds", 4),
    ("fdtable", "fd", 8),
    ("file", "f_inode", 8),
    ("file", "private_data", 8),
    ("inode", "i_mode", 2),
    ("inode", "i_ino", 8),
    ("socket", "sk", 8),
    ("sock", "__sk_common.skc_family", 2),
    ("sock", "__sk_common.skc_num", 2),
    ("sock", "__sk_common.skc_rcv_saddr", 4),
    ("sock", "__sk_common.skc_v6_rcv_saddr", 16),
    ("sock", "__sk_common.skc_bound_dev_if", 4),
    ("sock", "__sk_common.skc_net.net", 8),
    ("sock", "sk_uid", 4),
    ("sock", "sk_protocol", 2),
    ("sock", "sk_type", 2),
    ("net", "ns.inum", 4),
)
#: Bitfields of struct sock_common, decoded from EVENT.FLAGS.
BITFIELDS = ("skc_reuse", "skc_reuseport", "skc_ipv6only")


class Bits(NamedTuple):
    shift: int  # bit offset from the first byte copied into EVENT.FLAGS
    width: int


class TraceLayout(NamedTuple):
    arch: str
    offsets: dict[str, int]  # "struct.member" -> byte offset
    flags_at: int  # byte offset in struct sock of the 4 bytes copied into EVENT.FLAGS
    bits: dict[str, Bits]


class Frame:
    """Stack slots of the program (offsets from r10)."""

    KEY: Final = -4  # u32: errno, key of the errnos map; then 0, key of the counters map
    TMP: Final = -16  # u64: a value read with bpf_probe_read_kernel
    MAXFDS: Final = -24  # u64: fdt->max_fds (a u32, zero-extended)
    EVENT: Final = -24 - Ev.SIZE  # EVENT, -168 .. -24


def _bitfield(b: btfmod.BTF, struct_id: int, name: str) -> tuple[int, int]:
    """(bit offset, bit width) of a bitfield member (the struct must have kind_flag set)."""
    words = b._words  # the BTF reader has no bitfield lookup: read the member records here
    at = b._record(struct_id)
    info = words[at + 1]
    offs = b.string_offsets(name)
    for m in range(info & 0xFFFF):
        m_name, _m_type, m_off = words[at + 3 + 3 * m : at + 6 + 3 * m]
        if m_name in offs:
            if not info >> 31:
                raise btfmod.BTFError(f"{name}: struct without bitfield sizes (kind_flag 0)")
            return m_off & 0xFFFFFF, m_off >> 24
    raise btfmod.BTFError(f"no bitfield {name!r}")


def layout_from_btf(data: bytes, arch: str | None = None) -> TraceLayout:
    """Offsets and bitfields of this kernel; BTFError if anything is missing or differs."""
    arch = arch or os.uname().machine
    if arch not in SYSCALLS:
        raise btfmod.BTFError(f"rebind trace decodes x86_64 syscalls only (this is {arch})")
    b = btfmod.BTF(data)
    structs = sorted({s for s, _, _ in MEMBERS} | {"sock_common", "pt_regs"})
    ids = b.find_all([(s, btfmod.KIND_STRUCT) for s in structs])
    offsets: dict[str, int] = {}
    members = [*MEMBERS, *(("pt_regs", r, 8) for r in ARG_REGS[arch])]
    for struct_name, member, size in members:
        m = b.member(ids[struct_name, btfmod.KIND_STRUCT], member)
        if size is not None and m.size != size:
            raise btfmod.BTFError(f"{struct_name}.{member} is {m.size} bytes, expected {size}")
        offsets[f"{struct_name}.{member}"] = m.offset
    common = b.member(ids["sock", btfmod.KIND_STRUCT], "__sk_common").offset
    raw = {n: _bitfield(b, ids["sock_common", btfmod.KIND_STRUCT], n) for n in BITFIELDS}
    first = min(off for off, _ in raw.values()) // 8
    bits = {n: Bits(off - first * 8, width) for n, (off, width) in raw.items()}
    if any(bt.shift + bt.width > 32 for bt in bits.values()):
        raise btfmod.BTFError("skc_reuse, skc_reuseport and skc_ipv6only are not within 4 bytes")
    return TraceLayout(arch, offsets, common + first, bits)


class TraceMaps(NamedTuple):
    errnos: int  # ARRAY[MAX_ERRNO + 1] of u8: 1 = report this errno
    counters: int  # PERCPU_ARRAY[1] of COUNTERS
    ring: int  # RINGBUF


#: Per-CPU counters: failures that passed the filters, and those the ring could not take.
COUNTERS = struct.Struct("<QQ")
CNT_MATCHED, CNT_DROPPED = 0, 8


def build_program(lay: TraceLayout, maps: TraceMaps) -> bytes:
    """The sys_exit program (no subprograms, no callbacks).

    r6 ctx, r7 errno then &counters, r8 regs then the walk's pointer, r9 the Kind.
    """
    p = asm.Program()
    r0, r1, r2, r3, r4, r6, r7, r8, r9, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8, asm.R9, asm.FP,
    )  # fmt: skip
    ev, off = Frame.EVENT, lay.offsets
    nr_reg, fd_reg, addr_reg, len_reg = (f"pt_regs.{r}" for r in ARG_REGS[lay.arch])

    def read(dst: int, size: int, src: int, at: int, *, user: bool = False) -> None:
        """fp + dst = size bytes at src + at; r0 = 0 or a negative error."""
        p.probe_read(dst, size, src, at, asm.HELPER_PROBE_READ_USER if user else asm.HELPER_PROBE_READ_KERNEL)

    def follow(src: int, at: int, missing: str) -> None:
        """r8 = *(u64 *)(src + at), or goto missing when it cannot be read or is NULL."""
        p.store_imm(8, fp, Frame.TMP, 0)
        read(Frame.TMP, 8, src, at)
        p.jump_imm(asm.JNE, r0, 0, missing)
        p.load(8, r8, fp, Frame.TMP)
        p.jump_imm(asm.JEQ, r8, 0, missing)

    p.mov(r6, r1)
    p.load(8, r7, r6, 8)  # ret (long)
    p.jump_imm(asm.JSGE, r7, 0, "out")  # success: every other syscall stops here
    p.alu_imm(asm.NEG, r7, 0)
    p.jump_imm(asm.JGT, r7, MAX_ERRNO, "out")
    p.load(8, r8, r6, 0)  # struct pt_regs *
    p.store_imm(8, fp, Frame.TMP, 0)
    read(Frame.TMP, 8, r8, off[nr_reg])
    p.load(8, r1, fp, Frame.TMP)
    p.mov_imm(r9, 0)
    for nr, kind in sorted(SYSCALLS[lay.arch].items()):
        p.jump_imm(asm.JNE, r1, nr, f"not_{nr}")
        p.mov_imm(r9, int(kind))
        p.label(f"not_{nr}")
    p.jump_imm(asm.JEQ, r9, 0, "out")
    p.store(4, fp, Frame.KEY, r7)
    p.map_lookup(maps.errnos, Frame.KEY, "out")
    p.load(1, r1, r0, 0)
    p.jump_imm(asm.JEQ, r1, 0, "out")
    # A failure to report: zero the record (the ring copies all of it), then fill it in.
    for at in range(0, Ev.SIZE, 8):
        p.store_imm(8, fp, ev + at, 0)
    p.store(4, fp, ev + Ev.ERRNO, r7)
    p.store(2, fp, ev + Ev.KIND, r9)
    read(ev + Ev.FD, 4, r8, off[fd_reg])
    read(ev + Ev.ARG, 4, r8, off[len_reg])  # addrlen; listen's backlog is in si, read below
    p.jump_imm(asm.JEQ, r9, int(Kind.LISTEN), "listen_args")
    p.store_imm(8, fp, Frame.TMP, 0)
    read(Frame.TMP, 8, r8, off[addr_reg])
    p.load(8, r3, fp, Frame.TMP)
    p.jump_imm(asm.JEQ, r3, 0, "walk")
    read(ev + Ev.SOCKADDR, SOCKADDR_BYTES, r3, 0, user=True)  # still the caller's buffer
    p.goto("walk")
    p.label("listen_args")
    read(ev + Ev.ARG, 4, r8, off[addr_reg])
    # current->files->fdt->fd[fd]: the struct file the call was made on
    p.label("walk")
    p.call(HELPER_GET_CURRENT_TASK)
    p.mov(r8, r0)
    follow(r8, off["task_struct.files"], "task")
    follow(r8, off["files_struct.fdt"], "task")
    p.store_imm(8, fp, Frame.MAXFDS, 0)
    read(Frame.MAXFDS, 4, r8, off["fdtable.max_fds"])
    follow(r8, off["fdtable.fd"], "task")
    p.load(4, r1, fp, ev + Ev.FD)
    p.load(8, r2, fp, Frame.MAXFDS)
    p.jump_reg(asm.JGE, r1, r2, "task")  # closed and the table shrank meanwhile
    p.alu_imm(asm.LSH, r1, 3)
    p.alu(asm.ADD, r8, r1)
    follow(r8, 0, "task")  # r8 = struct file *
    p.mov(r9, r8)  # the Kind is in the record now: r9 = file
    follow(r9, off["file.f_inode"], "task")
    read(ev + Ev.INO, 8, r8, off["inode.i_ino"])
    p.store_imm(8, fp, Frame.TMP, 0)
    read(Frame.TMP, 2, r8, off["inode.i_mode"])
    p.load(8, r1, fp, Frame.TMP)
    p.alu_imm(asm.AND, r1, S_IFMT)
    p.jump_imm(asm.JNE, r1, S_IFSOCK, "task")  # the fd is no longer a socket
    follow(r9, off["file.private_data"], "task")  # struct socket *
    follow(r8, off["socket.sk"], "task")
    p.mov(r9, r8)  # r9 = struct sock *
    for field, member, size in (
        (Ev.FAMILY, "__sk_common.skc_family", 2),
        (Ev.NUM, "__sk_common.skc_num", 2),
        (Ev.SADDR4, "__sk_common.skc_rcv_saddr", 4),
        (Ev.SADDR6, "__sk_common.skc_v6_rcv_saddr", 16),
        (Ev.DEV, "__sk_common.skc_bound_dev_if", 4),
        (Ev.UID, "sk_uid", 4),
        (Ev.PROTO, "sk_protocol", 2),
        (Ev.TYPE, "sk_type", 2),
    ):
        read(ev + field, size, r9, off[f"sock.{member}"])
    read(ev + Ev.FLAGS, 4, r9, lay.flags_at)
    follow(r9, off["sock.__sk_common.skc_net.net"], "task")
    read(ev + Ev.NETNS, 4, r8, off["net.ns.inum"])
    p.label("task")
    p.call(HELPER_GET_CURRENT_PID_TGID)
    p.store(8, fp, ev + Ev.TID, r0)  # low half tid, high half tgid: EVENT's TID then TGID
    p.call(HELPER_GET_CURRENT_CGROUP_ID)
    p.store(8, fp, ev + Ev.CGROUP, r0)
    p.mov(r1, fp)
    p.alu_imm(asm.ADD, r1, ev + Ev.COMM)
    p.mov_imm(r2, 16)
    p.call(HELPER_GET_CURRENT_COMM)
    p.call(HELPER_KTIME_GET_NS)
    p.store(8, fp, ev + Ev.TS, r0)
    # counters.matched++ (per CPU, no atomics: a BPF program does not nest on its CPU,
    # bpf_prog_active / the raw tracepoint's recursion check)
    p.store_imm(4, fp, Frame.KEY, 0)
    p.map_lookup(maps.counters, Frame.KEY, "out")
    p.mov(r7, r0)
    p.load(8, r1, r7, CNT_MATCHED)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(8, r7, CNT_MATCHED, r1)
    p.ld_map_fd(r1, maps.ring)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, ev)
    p.mov_imm(r3, Ev.SIZE)
    p.mov_imm(r4, 0)
    p.call(HELPER_RINGBUF_OUTPUT)
    p.jump_imm(asm.JEQ, r0, 0, "out")
    p.load(8, r1, r7, CNT_DROPPED)
    p.alu_imm(asm.ADD, r1, 1)
    p.store(8, r7, CNT_DROPPED, r1)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    return p.assemble()
