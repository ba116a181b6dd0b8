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
  work. It runs for explicit bind() only (not for an autobind).
* ``BPF_PROG_TYPE_CGROUP_SOCK_ADDR`` on ``BPF_CGROUP_INET4_CONNECT`` / ``INET6_CONNECT``
  (before connect() chooses a port) and ``BPF_CGROUP_UDP4_SENDMSG`` / ``UDP6_SENDMSG`` (after a
  send's autobind), with a ``BPF_CGROUP_INET_SOCK_CREATE`` marker: ports connect() and UDP
  sends choose (:func:`build_program` says how each tells a port it should certify).
* The map is ``BPF_F_CLONE``: a connection the kernel makes for a listener starts with a copy of
  the listener's certificate, which the sock_ops program marks ACCEPTED.
* :func:`build_udp_reader`: the ``bpf_iter__udp`` program that reads UDP sockets' certificates
  back (inet_diag does not return them for UDP).

Programs attached to a cgroup are not namespaced: every such call on the host, in every network
namespace, gets one. The programs return 1 (allow) always: post-bind, connect and sendmsg
programs may refuse the call, these never do.
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
#: A socket the kernel clones (a connection accept() returns: sk_clone_lock) gets a copy of its
#: listener's value (bpf_sk_storage_clone, Linux 5.3). A map made without it stays without it.
BPF_F_CLONE = 1 << 9
MAP_FLAGS = BPF_F_NO_PREALLOC | BPF_F_CLONE
BPF_CGROUP_INET4_POST_BIND = 12
BPF_CGROUP_INET6_POST_BIND = 13

#: ``struct bpf_sock`` (the ctx): ``src_port``, host byte order, readable in post-bind hooks.
CTX_SRC_PORT = 44
CTX_PROTOCOL = 12  # readable in every cgroup sock hook
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_CGROUP_SOCK_OPS = 3
BPF_SOCK_OPS_TCP_LISTEN_CB = 11  # Linux 4.17
BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB = 5  # Linux 4.13; tcp_init_transfer, always called
#: ``struct bpf_sock_ops`` (include/uapi/linux/bpf.h): op, local_port (host order), sk (5.3).
OPS_OP = 0
OPS_LOCAL_PORT = 68
OPS_SK = 184
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
#: ``struct bpf_sock_addr`` (the connect hooks' ctx): protocol, and the socket (``struct bpf_sock``).
ADDR_PROTOCOL = 36
ADDR_SK = 64
IPPROTO_TCP = 6
IPPROTO_UDP = 17


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
    certificate, and allow (post-bind and connect programs may refuse the call; these never do).

    BIND4/BIND6 (``CGROUP_SOCK``, post-bind): ctx is the socket (``struct bpf_sock``).
    LISTEN (``SOCK_OPS``): runs for every sock_ops callback of every TCP socket; two go on:

    * ``BPF_SOCK_OPS_TCP_LISTEN_CB`` (called by ``__inet_listen_sk`` in the listener's context
      once it listens): only a socket that no bind() certified yet (one that listen() bound to a
      port of its own choosing) gets a certificate: a bind()'s is kept.
    * ``BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`` (``tcp_init_transfer`` of a connection the
      listener completed, in softirq: no task to name): the connection carries a copy of its
      listener's certificate (the map is ``BPF_F_CLONE``); the program marks it ``ACCEPTED``,
      so readers say "accepted on a socket bound by ..." and not that it was bound itself. It
      creates nothing: a connection of an uncertified listener stays without.

    It never writes ``reply``, so the TCP callbacks that read one (RTO, window, ECN) get 0, as
    with no program at all (``tcp_call_bpf``).
    CONNECT (``CGROUP_SOCK_ADDR``, ``BPF_CGROUP_INET4_CONNECT`` / ``INET6_CONNECT``): runs in
    the connecting task before the protocol's connect (``__inet_stream_connect`` for TCP,
    ``inet_dgram_connect`` for UDP, both via ``pre_connect``), so it still sees the socket
    without a port (``src_port`` 0) when connect() is about to choose one (TCP:
    ``inet_hash_connect``; UDP: ``inet_autobind`` right after the hook): only then, and for TCP
    and UDP sockets only, it certifies (port 0: the reader takes the socket's own). A socket
    bound before, by bind() (certified or not, e.g. before ``--install``), is left alone.

    CREATED (``CGROUP_SOCK``, ``BPF_CGROUP_INET_SOCK_CREATE``, in socket()): gives every UDP
    socket made while installed an empty storage marked CREATED: not a certificate (readers
    ignore it), only the proof that the socket is younger than the install, which SEND needs.
    SEND (``CGROUP_SOCK_ADDR``, ``BPF_CGROUP_UDP4_SENDMSG`` / ``UDP6_SENDMSG``, run by
    ``udp_sendmsg`` / ``udpv6_sendmsg`` for a send with a destination on an unconnected socket,
    in the sender's context): by then ``inet_send_prepare`` has autobound a socket without a
    port, and nothing in ``struct bpf_sock`` tells that port from one bind() gave it before the
    install. The marker does: a socket that was made while installed and still has no
    certificate was bound by neither bind() nor connect() (their hooks would have written one),
    so its port is the autobind's; the first such send certifies it. A socket made before the
    install stays without (never a wrong name).

    r6 ctx, then the socket (the sk_storage_get owner argument); r7 the map value; r8 the port.
    """
    p = asm.Program()
    r0, r1, r2, r3, r4, r6, r7, r8 = asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8
    if hook == Flag.LISTEN:
        p.load(4, r2, r1, OPS_OP)
        p.jump_imm(asm.JEQ, r2, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, "accepted")
        p.jump_imm(asm.JNE, r2, BPF_SOCK_OPS_TCP_LISTEN_CB, "out")
        p.load(4, r8, r1, OPS_LOCAL_PORT)
        p.load(8, r6, r1, OPS_SK)
        p.jump_imm(asm.JEQ, r6, 0, "out")
    elif hook == Flag.CREATED:
        p.load(4, r2, r1, CTX_PROTOCOL)
        p.jump_imm(asm.JNE, r2, IPPROTO_UDP, "out")
        p.mov(r2, r1)
        p.ld_map_fd(r1, map_fd)
        p.mov_imm(r3, 0)
        p.mov_imm(r4, BPF_SK_STORAGE_GET_F_CREATE)
        p.call(HELPER_SK_STORAGE_GET)
        p.jump_imm(asm.JEQ, r0, 0, "out")
        p.store_imm(2, r0, Off.FLAGS, Flag.CREATED)
        p.label("out")
        p.mov_imm(r0, 1)
        p.exit()
        return p.assemble()
    elif hook == Flag.SEND:
        p.load(4, r2, r1, ADDR_PROTOCOL)
        p.jump_imm(asm.JNE, r2, IPPROTO_UDP, "out")
        p.load(8, r6, r1, ADDR_SK)
        p.jump_imm(asm.JEQ, r6, 0, "out")
        p.load(4, r8, r6, CTX_SRC_PORT)
        p.ld_map_fd(r1, map_fd)
        p.mov(r2, r6)
        p.mov_imm(r3, 0)
        p.mov_imm(r4, 0)  # only a socket the create hook marked
        p.call(HELPER_SK_STORAGE_GET)
        p.jump_imm(asm.JEQ, r0, 0, "out")
        p.load(2, r1, r0, Off.FLAGS)
        p.jump_imm(asm.JNE, r1, Flag.CREATED, "out")  # certified already, by bind() or connect()
    elif hook == Flag.CONNECT:
        p.load(4, r2, r1, ADDR_PROTOCOL)
        p.jump_imm(asm.JEQ, r2, IPPROTO_TCP, "stream")
        p.jump_imm(asm.JNE, r2, IPPROTO_UDP, "out")
        p.label("stream")
        p.load(8, r6, r1, ADDR_SK)
        p.jump_imm(asm.JEQ, r6, 0, "out")
        p.load(4, r8, r6, CTX_SRC_PORT)
        p.jump_imm(asm.JNE, r8, 0, "out")  # bound already: connect() keeps that port
    else:
        p.mov(r6, r1)
        p.load(4, r8, r6, CTX_SRC_PORT)
    if hook != Flag.SEND:
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
    if hook == Flag.LISTEN:
        p.goto("out")
        p.label("accepted")
        p.load(8, r6, r1, OPS_SK)
        p.jump_imm(asm.JEQ, r6, 0, "out")
        p.ld_map_fd(r1, map_fd)
        p.mov(r2, r6)
        p.mov_imm(r3, 0)
        p.mov_imm(r4, 0)  # the listener's copy, or nothing: never a new certificate here
        p.call(HELPER_SK_STORAGE_GET)
        p.jump_imm(asm.JEQ, r0, 0, "out")
        p.load(2, r1, r0, Off.FLAGS)
        p.jump_imm(asm.JEQ, r1, 0, "out")
        p.alu_imm(asm.OR, r1, Flag.ACCEPTED)
        p.store(2, r0, Off.FLAGS, r1)
    p.label("out")
    p.mov_imm(r0, 1)
    p.exit()
    return p.assemble()


#: The UDP reader's record: the socket cookie (as inet_diag reports it), then the map value.
READ_RECORD: Final = struct.Struct(f"<Q{VALUE.size}s")


def build_udp_reader(map_fd: int, *, udp_sk: int, meta: int, seq: int) -> bytes:
    """A ``bpf_iter__udp`` program writing, for each UDP socket of the iterator's network
    namespace that has a certificate, one :data:`READ_RECORD` (cookie, value).

    inet_diag's UDP dump does not return socket storage (``inet_sk_diag_fill`` returns before
    it for sockets without a connection part), so ``ls`` reads UDP sockets' certificates here.
    ``bpf_sk_storage_get`` from an iterator (``bpf_sk_storage_tracing_allowed``: BPF_TRACE_ITER)
    with flags 0 only looks: it never creates one. ``udp_sk``, ``meta``, ``seq``: byte offsets of
    ``bpf_iter__udp.udp_sk``, ``.meta`` and ``bpf_iter_meta.seq`` (vmlinux BTF, as for
    kernel/bpf/sockprog.py).

    r6 ctx, r7 the socket, r8 the value.
    """
    from rebind.kernel.bpf.sockprog import HELPER_GET_SOCKET_COOKIE, HELPER_SEQ_WRITE

    p = asm.Program()
    r0, r1, r2, r3, r4, r6, r7, r8, fp = (
        asm.R0, asm.R1, asm.R2, asm.R3, asm.R4, asm.R6, asm.R7, asm.R8, asm.FP,
    )  # fmt: skip
    rec = -READ_RECORD.size
    p.mov(r6, r1)
    p.load(8, r7, r6, udp_sk)
    p.jump_imm(asm.JEQ, r7, 0, "out")  # the final call, from seq stop
    p.ld_map_fd(r1, map_fd)
    p.mov(r2, r7)
    p.mov_imm(r3, 0)
    p.mov_imm(r4, 0)
    p.call(HELPER_SK_STORAGE_GET)
    p.jump_imm(asm.JEQ, r0, 0, "out")
    p.mov(r8, r0)
    for off in range(0, VALUE.size, 8):
        p.load(8, r1, r8, off)
        p.store(8, fp, rec + 8 + off, r1)
    p.mov(r1, r7)
    p.call(HELPER_GET_SOCKET_COOKIE)
    p.store(8, fp, rec, r0)
    p.load(8, r1, r6, meta)
    p.load(8, r1, r1, seq)
    p.mov(r2, fp)
    p.alu_imm(asm.ADD, r2, rec)
    p.mov_imm(r3, READ_RECORD.size)
    p.call(HELPER_SEQ_WRITE)
    p.label("out")
    p.mov_imm(r0, 0)
    p.exit()
    return p.assemble()
