"""The birth-certificate program and its map's BTF (pure: bytes only, no syscalls).

Attach point, decided by measurement on 6.18.44 (docs/trace.md, "Birth certificates"):

* fexit on ``inet_bind`` / fentry on ``inet_csk_listen_start``: ``BPF_PROG_LOAD`` of even
  ``r0 = 0; exit`` fails with EPERM on this kernel (as for `rebind trace`), so not usable here.
* ``BPF_PROG_TYPE_SOCK_OPS`` on ``BPF_SOCK_OPS_TCP_LISTEN_CB`` (root cgroup too) certifies a
  TCP socket that listen() bound itself (no bind() before): sock_ops programs may call
  ``bpf_sk_storage_get`` on ``ctx->sk`` and, on 6.18, the same current-task helpers.
* ``BPF_PROG_TYPE_CGROUP_SOCK`` with expected attach type ``BPF_CGROUP_INET4_POST_BIND`` /
  ``BPF_CGROUP_INET6_POST_BIND`` (Linux 4.17) loads and attaches to the root cgroup v2: the
  hook runs in ``__inet_bind`` / ``__inet6_bind`` right after the port was taken, in the
  binder's context, with the socket as ctx, so ``bpf_sk_storage_get(map, ctx, NULL,
  F_CREATE)`` (cgroup sock programs: Linux 5.11, ``bpf_sk_storage_get_cg_sock_proto``) and
  ``bpf_get_current_{pid_tgid,comm,uid_gid,cgroup_id}`` (``cgroup_current_func_proto``) all
  work. It runs for explicit bind() only; with the listen hook below, a port taken by
  connect() or a UDP sendmsg() is the only kind without a certificate. Programs attached to a cgroup are not
  namespaced: every bind on the host, in every network namespace, gets one.

The program returns 1 (allow) always: post-bind programs may refuse a bind, this one never does.
"""

from __future__ import annotations

import struct
from typing import Final

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import btf as btfmod
from rebind.model.birth import VALUE, Flag

# enum bpf_func_id (include/uapi/linux/bpf.h)
HELPER_GET_CURRENT_PID_TGID = 14
HELPER_GET_CURRENT_UID_GID = 15
HELPER_GET_CURRENT_COMM = 16
HELPER_GET_CURRENT_CGROUP_ID = 80
HELPER_SK_STORAGE_GET = 107  # Linux 5.2; from cgroup sock programs 5.11
HELPER_KTIME_GET_BOOT_NS = 125  # Linux 5.8: CLOCK_BOOTTIME, counts suspend too
BPF_SK_STORAGE_GET_F_CREATE = 1

BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_F_NO_PREALLOC = 1  # sk_storage maps must say so (bpf_local_storage_map_alloc_check)
BPF_CGROUP_INET4_POST_BIND = 12
BPF_CGROUP_INET6_POST_BIND = 13

#: ``struct bpf_sock`` (the ctx): ``src_port``, host byte order, readable in post-bind hooks.
CTX_SRC_PORT = 44
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_CGROUP_SOCK_OPS = 3
BPF_SOCK_OPS_TCP_LISTEN_CB = 11  # Linux 4.17
#: ``struct bpf_sock_ops`` (include/uapi/linux/bpf.h): op, local_port (host order), sk (5.3).
OPS_OP = 0
OPS_LOCAL_PORT = 68
OPS_SK = 184


class Off:
    """Byte offsets of :data:`rebind.model.birth.VALUE`."""

    BOOT_NS: Final = 0
    CGROUP: Final = 8
    TID: Final = 16  # bpf_get_current_pid_tgid stored as one u64: tid, then tgid
    UID: Final = 24
    PORT: Final = 28
    FLAGS: Final = 30
    COMM: Final = 32
    SIZE: Final = 48


assert VALUE.size == Off.SIZE

#: (name, BTF type id, byte offset) of struct rebind_birth's members, for the map's BTF
#: (sk_storage maps need key and value BTF so that sock_diag can dump them; bpftool prints it).
_U64, _U32, _U16, _CHAR, _COMM, _INT = 1, 2, 3, 4, 5, 6
MEMBERS = (
    ("boot_ns", _U64, Off.BOOT_NS),
    ("cgroup_id", _U64, Off.CGROUP),
    ("tid", _U32, Off.TID),
    ("tgid", _U32, Off.TID + 4),
    ("uid", _U32, Off.UID),
    ("port", _U16, Off.PORT),
    ("flags", _U16, Off.FLAGS),
    ("comm", _COMM, Off.COMM),
)
#: Type ids in :func:`map_btf`: key ``int``, value ``struct rebind_birth``.
KEY_TYPE_ID = _INT
VALUE_TYPE_ID = 7


def map_btf() -> bytes:
    """BTF for the map: ``int`` key and ``struct rebind_birth`` value (include/uapi/linux/btf.h)."""
    strings = bytearray(b"\0")

    def name(s: str) -> int:
        at = len(strings)
        strings.extend(s.encode() + b"\0")
        return at

    def integer(n: str, size: int, signed: bool = False) -> bytes:
        enc = (1 << 24) if signed else 0  # BTF_INT_SIGNED in bits 24-27
        return struct.pack("<IIII", name(n), btfmod.KIND_INT << 24, size, enc | size * 8)

    types = bytearray()
    types += integer("u64", 8)  # 1
    types += integer("u32", 4)  # 2
    types += integer("u16", 2)  # 3
    types += integer("char", 1)  # 4
    # 5: char[16] (struct btf_array {type, index_type, nelems})
    types += struct.pack("<III", 0, btfmod.KIND_ARRAY << 24, 0) + struct.pack("<III", _CHAR, _U32, 16)
    types += integer("int", 4, signed=True)  # 6
    # 7: struct rebind_birth (member offsets in bits; kind_flag 0: no bitfields)
    types += struct.pack("<III", name("rebind_birth"), btfmod.KIND_STRUCT << 24 | len(MEMBERS), Off.SIZE)
    for member, type_id, at in MEMBERS:
        types += struct.pack("<III", name(member), type_id, at * 8)
    header = struct.pack("<HBBIIIII", btfmod.BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + bytes(types) + bytes(strings)


def build_program(map_fd: int, hook: int) -> bytes:
    """The program of one hook (:class:`rebind.model.birth.Flag`): fill the socket's
    certificate, and allow (post-bind programs may refuse a bind; these never do).

    BIND4/BIND6 (``CGROUP_SOCK``, post-bind): ctx is the socket (``struct bpf_sock``).
    LISTEN (``SOCK_OPS``): runs for every sock_ops callback of every TCP socket; only
    ``BPF_SOCK_OPS_TCP_LISTEN_CB`` (called by ``__inet_listen_sk`` in the listener's context
    once it listens) goes on, and only a socket that no bind() certified yet (one that listen()
    bound to a port of its own choosing) gets a certificate: a bind()'s is kept. It never
    writes ``reply``, so the TCP callbacks that read one (RTO, window, ECN) get 0, as with no
    program at all (``tcp_call_bpf``).

    r6 ctx, then the socket (the sk_storage_get owner argument); r7 the map value; r8 the port.
    """
    p = asm.Program()
    r0, r1, r2, r3, r4, r6, r7, r8 = asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8
    if hook == Flag.LISTEN:
        p.load(4, r2, r1, OPS_OP)
        p.jump_imm(asm.JNE, r2, BPF_SOCK_OPS_TCP_LISTEN_CB, "out")
        p.load(4, r8, r1, OPS_LOCAL_PORT)
        p.load(8, r6, r1, OPS_SK)
        p.jump_imm(asm.JEQ, r6, 0, "out")
    else:
        p.mov(r6, r1)
        p.load(4, r8, r6, CTX_SRC_PORT)
    p.ld_map_fd(r1, map_fd)
    p.mov(r2, r6)
    p.mov_imm(r3, 0)  # no initial value: the new storage is zeroed
    p.mov_imm(r4, BPF_SK_STORAGE_GET_F_CREATE)
    p.call(HELPER_SK_STORAGE_GET)
    p.jump_imm(asm.JEQ, r0, 0, "out")  # no memory for it: the call goes on uncertified
    p.mov(r7, r0)
    if hook == Flag.LISTEN:
        p.load(2, r1, r7, Off.FLAGS)
        p.jump_imm(asm.JNE, r1, 0, "out")  # bind() certified it: that is who chose the port
    p.call(HELPER_GET_CURRENT_PID_TGID)
    p.store(8, r7, Off.TID, r0)
    p.call(HELPER_GET_CURRENT_UID_GID)
    p.store(4, r7, Off.UID, r0)  # the low half is the uid
    p.call(HELPER_GET_CURRENT_CGROUP_ID)
    p.store(8, r7, Off.CGROUP, r0)
    p.mov(r1, r7)
    p.alu_imm(asm.ADD, r1, Off.COMM)
    p.mov_imm(r2, 16)
    p.call(HELPER_GET_CURRENT_COMM)
    p.store(2, r7, Off.PORT, r8)
    p.call(HELPER_KTIME_GET_BOOT_NS)
    p.store(8, r7, Off.BOOT_NS, r0)
    # flags last: a dump racing the call sees 0 there and shows no certificate (model.birth.decode)
    p.store_imm(2, r7, Off.FLAGS, hook)
    p.label("out")
    p.mov_imm(r0, 1)
    p.exit()
    return p.assemble()
