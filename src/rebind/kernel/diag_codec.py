"""Sans-IO codec for NETLINK_SOCK_DIAG / inet_diag.

Structs mirror include/uapi/linux/netlink.h, sock_diag.h and inet_diag.h field for field. Parsing
dispatches on the netlink message *type* first (NLMSG_ERROR, NLMSG_DONE, then SOCK_DIAG_BY_FAMILY)
and only then looks at the family, so an error or the end of a dump is never misread as a socket.

Every malformed input raises :class:`CodecError`; kernel errors raise :class:`KernelError` with the
errno. Nothing here touches a socket.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.errors import CodecError, KernelError

# The bytecode filters (kernel/diag_filter.py), re-exported for the codec's users.
from rebind.kernel.diag_filter import ANY_PORT as ANY_PORT
from rebind.kernel.diag_filter import BC_OP as BC_OP
from rebind.kernel.diag_filter import HOSTCOND as HOSTCOND
from rebind.kernel.diag_filter import MAX_FILTER_PORTS as MAX_FILTER_PORTS
from rebind.kernel.diag_filter import BcOp as BcOp
from rebind.kernel.diag_filter import Cond as Cond
from rebind.kernel.diag_filter import compile_any as compile_any
from rebind.kernel.diag_filter import destination_filter as destination_filter
from rebind.kernel.diag_filter import host_cond as host_cond
from rebind.kernel.diag_filter import port_cond as port_cond
from rebind.kernel.diag_filter import port_filter as port_filter
from rebind.kernel.diag_filter import port_range_filter as port_range_filter

# netlink.h: the one framing (kernel/netlink.py), re-exported for the codec's users.
from rebind.kernel.netlink import NETLINK_SOCK_DIAG as NETLINK_SOCK_DIAG
from rebind.kernel.netlink import NLA_TYPE_MASK as NLA_TYPE_MASK
from rebind.kernel.netlink import NLM_F_ACK as NLM_F_ACK
from rebind.kernel.netlink import NLM_F_DUMP as NLM_F_DUMP
from rebind.kernel.netlink import NLM_F_DUMP_INTR as NLM_F_DUMP_INTR
from rebind.kernel.netlink import NLM_F_MULTI as NLM_F_MULTI
from rebind.kernel.netlink import NLM_F_REQUEST as NLM_F_REQUEST
from rebind.kernel.netlink import NLMSG_DONE as NLMSG_DONE
from rebind.kernel.netlink import NLMSG_ERROR as NLMSG_ERROR
from rebind.kernel.netlink import NLMSG_NOOP as NLMSG_NOOP
from rebind.kernel.netlink import NLMSG_OVERRUN as NLMSG_OVERRUN
from rebind.kernel.netlink import NLMSGERR as NLMSGERR
from rebind.kernel.netlink import NLMSGHDR as NLMSGHDR
from rebind.kernel.netlink import RTA as RTA
from rebind.kernel.netlink import attr as _rta
from rebind.kernel.netlink import error_of, iter_frames
from rebind.kernel.netlink import iter_attrs as iter_attrs
from rebind.kernel.netlink import message as _nlmsg
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State, Timer

# sock_diag.h
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
# inet_diag.h: the original TCP-only request type. inet_diag_dump_compat() runs it with
# sdiag_family = AF_UNSPEC, so one walk of the TCP hash tables returns IPv4 *and* IPv6 sockets;
# the v2 request needs one walk per family. Replies carry this type too.
TCPDIAG_GETSOCK = 18

IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTO_NUMBERS = {Proto.TCP: IPPROTO_TCP, Proto.UDP: IPPROTO_UDP}

# inet_diag.h: the "no cookie" value; ~0 in both halves matches any socket.
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


class Attr(enum.IntEnum):
    """enum inet_diag_attrs (response attributes)."""

    NONE = 0
    MEMINFO = 1
    INFO = 2
    VEGASINFO = 3
    CONG = 4
    TOS = 5
    TCLASS = 6
    SKMEMINFO = 7
    SHUTDOWN = 8
    DCTCPINFO = 9
    PROTOCOL = 10
    SKV6ONLY = 11
    LOCALS = 12
    PEERS = 13
    PAD = 14
    MARK = 15
    BBRINFO = 16
    CLASS_ID = 17
    MD5SIG = 18
    ULP_INFO = 19
    SK_BPF_STORAGES = 20
    CGROUP_ID = 21
    SOCKOPT = 22


class ReqAttr(enum.IntEnum):
    """enum inet_diag_req_attrs (request attributes)."""

    NONE = 0
    BYTECODE = 1
    SK_BPF_STORAGES = 2
    PROTOCOL = 3


# struct inet_diag_sockid { __be16 sport, dport; __be32 src[4], dst[4]; __u32 if; __u32 cookie[2]; }
SOCKID = struct.Struct(">HH16s16s")
SOCKID_TAIL = struct.Struct("=III")  # if, cookie[0], cookie[1] are host order
SOCKID_SIZE = SOCKID.size + SOCKID_TAIL.size  # 48
# struct inet_diag_req_v2 { __u8 family, protocol, ext, pad; __u32 states; struct inet_diag_sockid id; }
REQ_V2_HEAD = struct.Struct("=BBBxI")
# struct inet_diag_req { __u8 family, src_len, dst_len, ext; sockid id; __u32 states, dbs; }
REQ_V1_HEAD = struct.Struct("=BBBB")
REQ_V1_TAIL = struct.Struct("=II")
# struct inet_diag_msg { __u8 family, state, timer, retrans; sockid id;
#                        __u32 expires, rqueue, wqueue, uid, inode; }
MSG_HEAD = struct.Struct("=BBBB")
MSG_TAIL = struct.Struct("=IIIII")
MSG_SIZE = MSG_HEAD.size + SOCKID_SIZE + MSG_TAIL.size  # 72


@dataclass(frozen=True, slots=True)
class SockId:
    sport: int = 0
    dport: int = 0
    src: bytes = bytes(16)
    dst: bytes = bytes(16)
    ifindex: int = 0
    cookie: int = INET_DIAG_NOCOOKIE | (INET_DIAG_NOCOOKIE << 32)

    def pack(self) -> bytes:
        return SOCKID.pack(self.sport, self.dport, self.src, self.dst) + SOCKID_TAIL.pack(
            self.ifindex, self.cookie & 0xFFFFFFFF, self.cookie >> 32
        )

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, off: int) -> SockId:
        sport, dport, src, dst = SOCKID.unpack_from(buf, off)
        ifindex, c0, c1 = SOCKID_TAIL.unpack_from(buf, off + SOCKID.size)
        return cls(sport, dport, bytes(src), bytes(dst), ifindex, c0 | (c1 << 32))


# ---------------------------------------------------------------------------------------------
# Requests


#: Nested attributes of the sk_storage request and reply (include/uapi/linux/sock_diag.h).
NLA_F_NESTED = 0x8000
SK_DIAG_BPF_STORAGE_REQ_MAP_FD = 1
SK_DIAG_BPF_STORAGE = 1
SK_DIAG_BPF_STORAGE_MAP_ID = 2
SK_DIAG_BPF_STORAGE_MAP_VALUE = 3


def storage_request(map_fd: int | None) -> bytes:
    """INET_DIAG_REQ_SK_BPF_STORAGES {SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd}, or nothing."""
    if map_fd is None:
        return b""
    inner = _rta(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, struct.pack("=I", map_fd))
    return _rta(ReqAttr.SK_BPF_STORAGES | NLA_F_NESTED, inner)


def storage_values(raw: bytes) -> list[bytes]:
    """The map values in an INET_DIAG_SK_BPF_STORAGES reply (one per map asked for that holds
    a value for this socket; bpf_sk_storage_diag_put)."""
    out = []
    buf = memoryview(raw)
    for kind, nested in iter_attrs(buf, 0):
        if kind != SK_DIAG_BPF_STORAGE:
            continue
        for k, value in iter_attrs(memoryview(nested), 0):
            if k == SK_DIAG_BPF_STORAGE_MAP_VALUE:
                out.append(value)
    return out


def dump_request(
    family: Family,
    proto: Proto,
    states: int,
    *,
    bytecode: bytes | None = None,
    seq: int = 1,
    ext: int = 0,
    storage_fd: int | None = None,
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (inet_diag_req_v2) with an optional filter.

    ``storage_fd``: an sk_storage map whose value each socket's record should carry
    (birth certificates, kernel/birth.py)."""
    body = REQ_V2_HEAD.pack(family, PROTO_NUMBERS[proto], ext, states) + SockId().pack()
    if bytecode:
        body += _rta(ReqAttr.BYTECODE, bytecode)
    body += storage_request(storage_fd)
    return _nlmsg(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def dump_request_tcp_any_family(
    states: int,
    *,
    bytecode: bytes | None = None,
    sport: int = 0,
    seq: int = 1,
    storage_fd: int | None = None,
) -> bytes:
    """A TCPDIAG_GETSOCK dump: both address families in one walk of the kernel's TCP tables.

    ``sport`` (non-zero) lets inet_diag_dump_icsk() skip other ports before running bytecode.

    Kernel quirks: TCPDIAG_GETSOCK is the pre-sock_diag message type, answered through
    inet_diag's compat hook (inet_diag_rcv_msg_compat); sock_diag_rcv_msg() replies EOPNOTSUPP
    to it when inet_diag is not loaded, where SOCK_DIAG_BY_FAMILY would get ENOENT. Its replies
    carry type TCPDIAG_GETSOCK, not SOCK_DIAG_BY_FAMILY (iter_messages accepts both), and
    inet_diag_dump_compat() replaces the request's family by AF_UNSPEC: IPv4 and IPv6 sockets
    both come back.
    """
    sid = SockId(sport=sport)
    body = REQ_V1_HEAD.pack(Family.INET, 0, 0, 0) + sid.pack() + REQ_V1_TAIL.pack(states, 0)
    if bytecode:
        body += _rta(ReqAttr.BYTECODE, bytecode)
    body += storage_request(storage_fd)  # the compat path parses it too (__inet_diag_dump_start)
    return _nlmsg(TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def destroy_request(rec: SocketRecord, *, seq: int = 1) -> bytes:
    """A SOCK_DESTROY request naming exactly one socket: 4-tuple, interface and cookie.

    Needs CAP_NET_ADMIN over the socket's netns and CONFIG_INET_DIAG_DESTROY (sock_diag_destroy).
    """
    sid = SockId(
        rec.local.port,
        rec.remote.port,
        _addr_bytes(rec.local),
        _addr_bytes(rec.remote),
        rec.ifindex,
        rec.cookie if rec.cookie is not None else SockId().cookie,
    )
    body = REQ_V2_HEAD.pack(rec.family, PROTO_NUMBERS[rec.proto], 0, 0xFFFFFFFF) + sid.pack()
    return _nlmsg(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def _addr_bytes(ep: Endpoint) -> bytes:
    return ep.addr.packed.ljust(16, b"\0")


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True, slots=True)
class Done:
    """NLMSG_DONE: the dump is complete. ``interrupted`` means the table changed mid-dump."""

    seq: int
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    """NLMSG_ERROR with error 0: the request (e.g. SOCK_DESTROY) succeeded."""

    seq: int


Message = SocketRecord | Done | Ack


def _decode_addr(family: int, raw: bytes) -> IPv4Address | IPv6Address:
    if family == Family.INET:
        return IPv4Address(raw[:4])
    return IPv6Address(raw)


def decode_socket(
    proto: Proto,
    payload: memoryview,
    *,
    netns: int | None = None,
    boot_to_epoch: float | None = None,
    storage_by_cookie: Mapping[int, bytes] | None = None,
) -> SocketRecord:
    """Decode one inet_diag_msg with its attributes.

    ``boot_to_epoch`` (epoch seconds at CLOCK_BOOTTIME 0) is given when the request asked for
    the birth-certificate map: its value is then decoded into ``birth``. ``storage_by_cookie``:
    the map's values read another way (UDP sockets, whose dump does not carry them:
    kernel/birth_udp.py), for a socket whose reply has none."""
    if len(payload) < MSG_SIZE:
        raise CodecError(f"inet_diag_msg truncated: {len(payload)} < {MSG_SIZE} bytes")
    fam, state, timer, _retrans = MSG_HEAD.unpack_from(payload, 0)
    if fam not in (Family.INET, Family.INET6):
        raise CodecError(f"inet_diag_msg with unknown family {fam}")
    sid = SockId.unpack_from(payload, MSG_HEAD.size)
    expires, rqueue, wqueue, uid, inode = MSG_TAIL.unpack_from(payload, MSG_HEAD.size + SOCKID_SIZE)
    attrs = dict(iter_attrs(payload, MSG_SIZE))
    try:
        st = State(state)
    except ValueError:
        raise CodecError(f"inet_diag_msg with unknown state {state}") from None
    if proto is Proto.TCP and st is State.CLOSE:
        # A TCP socket in CLOSE is only dumped from bhash2 when TCPF_BOUND_INACTIVE was asked
        # for (inet_diag_dump_icsk, 6.8+): bound, never listened or connected.
        st = State.BOUND_INACTIVE
    tmr = Timer(timer) if timer in Timer._value2member_map_ else Timer.UNKNOWN
    mini = tmr is Timer.TIME_WAIT and st in (State.TIME_WAIT, State.FIN_WAIT2)
    v6only = None
    if (raw := attrs.get(Attr.SKV6ONLY)) is not None and len(raw) >= 1:
        v6only = bool(raw[0])
    cgroup = None
    if (raw := attrs.get(Attr.CGROUP_ID)) is not None and len(raw) >= 8:
        cgroup = struct.unpack_from("=Q", raw)[0]
    birth = None
    if boot_to_epoch is not None and (raw := attrs.get(Attr.SK_BPF_STORAGES)) is not None:
        from rebind.model.birth import decode as birth_decode

        for value in storage_values(raw):
            birth = birth_decode(value, boot_to_epoch, sid.sport) or birth
    if birth is None and storage_by_cookie and boot_to_epoch is not None and sid.cookie in storage_by_cookie:
        from rebind.model.birth import decode as birth_decode

        birth = birth_decode(storage_by_cookie[sid.cookie], boot_to_epoch, sid.sport)
    return SocketRecord(
        proto=proto,
        family=Family(fam),
        state=st,
        local=Endpoint(_decode_addr(fam, sid.src), sid.sport),
        remote=Endpoint(_decode_addr(fam, sid.dst), sid.dport),
        # Mini-sockets have neither owner nor file: the kernel reports 0 for both.
        uid=None if mini else uid,
        inode=None if mini or inode == 0 else inode,
        cookie=sid.cookie,
        ifindex=sid.ifindex,
        timer=tmr,
        # idiag_expires is in ms; meaningful only while a timer is armed.
        expires_ms=expires if tmr is not Timer.NONE else None,
        v6only=v6only,
        cgroup_id=cgroup,
        rqueue=rqueue,
        wqueue=wqueue,
        netns=netns,
        birth=birth,
    )


def iter_messages(
    data: bytes | bytearray | memoryview,
    proto: Proto,
    *,
    netns: int | None = None,
    boot_to_epoch: float | None = None,
    storage_by_cookie: Mapping[int, bytes] | None = None,
) -> Iterator[Message]:
    """Decode every netlink message in one datagram as read from the socket.
    ``storage_by_cookie``: decode_socket's."""
    for kind, flags, seq, payload in iter_frames(data):
        # Dispatch on the message type before anything else.
        if kind == NLMSG_ERROR:
            yield _decode_error(payload, seq)
        elif kind == NLMSG_DONE:
            _check_done(payload)
            yield Done(seq, bool(flags & NLM_F_DUMP_INTR))
        elif kind == NLMSG_NOOP:
            pass
        elif kind == NLMSG_OVERRUN:
            raise KernelError("netlink overrun: the kernel dropped part of the dump", _errno.ENOBUFS)
        elif kind in (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK):
            yield decode_socket(
                proto, payload, netns=netns, boot_to_epoch=boot_to_epoch, storage_by_cookie=storage_by_cookie
            )
        else:
            raise CodecError(f"unexpected netlink message type {kind}")


def _decode_error(payload: memoryview, seq: int) -> Ack:
    err = error_of(payload)
    if err == 0:
        return Ack(seq)
    code = _errno_of(err, "NLMSG_ERROR")
    raise KernelError(f"sock_diag: {os.strerror(code)} (errno {code})", code)


# include/linux/err.h: the kernel's error codes are -1 .. -MAX_ERRNO.
MAX_ERRNO = 4095


def _errno_of(err: int, where: str) -> int:
    """The errno carried by a negative netlink error field; anything else is malformed."""
    if not -MAX_ERRNO <= err < 0:
        raise CodecError(f"{where} carries an impossible error code {err}")
    return -err


def _check_done(payload: memoryview) -> None:
    # A dump's NLMSG_DONE carries an int: 0, or the negative errno that ended the dump.
    if len(payload) >= 4:
        (err,) = NLMSGERR.unpack_from(payload, 0)
        if err < 0:
            code = _errno_of(err, "NLMSG_DONE")
            raise KernelError(f"sock_diag dump failed: {os.strerror(code)} (errno {code})", code)
