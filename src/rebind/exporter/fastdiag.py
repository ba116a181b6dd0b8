"""A lean inet_diag dump for scrapes: fixed header fields only, no objects per socket.

``rebind.kernel.diag`` decodes every socket into a SocketRecord (addresses, attributes, enums):
right for `rebind ls`, ~20 µs a socket. A scrape on a busy host receives tens of thousands of
sockets only to count them (11k TIME_WAIT on one port in the benchmark), so this reads the
fixed part of each inet_diag_msg with one struct call and leaves the payload for a full decode
(``diag_codec.decode_socket``) of the few sockets the conflict model needs.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

from rebind.errors import CodecError, KernelError
from rebind.exporter.facts import PortTuple
from rebind.kernel import diag_codec as codec
from rebind.kernel.diag import RECV_SIZE, DiagSocket

# inet_diag_msg: family, state, timer, retrans; sockid (ports in network order, src, dst, if,
# cookie[2]); expires, rqueue, wqueue, uid, inode.
MSG = struct.Struct("=BBBBHH16s16sIIIIIIII")
_V4_MAPPED = bytes(10) + b"\xff\xff"
_NLMSG_HDR = codec.NLMSGHDR
_SOCKET_MSGS = (codec.SOCK_DIAG_BY_FAMILY, codec.TCPDIAG_GETSOCK)

#: One socket: (family, state, timer, sport, dport, src, dst, expires, rqueue, wqueue, payload)
#: with ports in host order and src/dst as 16 raw bytes (IPv4 in the first 4).
Raw = tuple[int, int, int, int, int, bytes, bytes, int, int, int, memoryview]


def addr_key(family: int, raw: bytes) -> bytes:
    """An address as compared everywhere in the exporter: 4 bytes for IPv4 and v4-mapped IPv6."""
    if family == 2:
        return raw[:4]
    return raw[12:16] if raw[:12] == _V4_MAPPED else raw


def dump(sock: DiagSocket, request: bytes) -> Iterator[Raw]:
    """Send one dump request and yield each socket's fixed fields. The payload view is valid only
    until the next item (the receive buffer is reused): decode it before asking for more."""
    ntohs = socket.ntohs
    unpack = MSG.unpack_from
    msg_size = MSG.size
    sock._sock.send(request)
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    while True:
        n = sock._sock.recv_into(buf)
        off = 0
        while off + _NLMSG_HDR.size <= n:
            length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(buf, off)
            if length < _NLMSG_HDR.size or off + length > n:
                raise CodecError(f"netlink message length {length} at offset {off} is out of bounds")
            body = off + _NLMSG_HDR.size
            if kind in _SOCKET_MSGS:
                if length - _NLMSG_HDR.size < msg_size:
                    raise CodecError("inet_diag_msg truncated")
                f = unpack(buf, body)
                yield (
                    f[0], f[1], f[2], ntohs(f[4]), ntohs(f[5]), f[6], f[7], f[11], f[12], f[13],
                    view[body : off + length],
                )  # fmt: skip
            elif kind == codec.NLMSG_DONE:
                _done(view[body : off + length])
                return
            elif kind == codec.NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", buf, body)
                if err:
                    raise KernelError(f"sock_diag: {os.strerror(-err)} (errno {-err})", -err)
            elif kind == codec.NLMSG_OVERRUN:
                raise KernelError("netlink overrun: the kernel dropped part of the dump")
            off += (length + 3) & ~3


def _done(payload: memoryview) -> None:
    if len(payload) >= 4:
        (err,) = struct.unpack_from("=i", payload)
        if err < 0:
            raise KernelError(f"sock_diag dump failed: {os.strerror(-err)} (errno {-err})", -err)


#: What a port's first socket gives first_per_port: family; sport, dport; src, dst (16 bytes);
#: the cookie's two halves (host order, as MSG).
_ONE = struct.Struct("=B3x2s2s16s16s4xII")
_U16 = struct.Struct("!H").unpack
_SPORT_AT = 4
#: nlmsghdr's length and type only.
_LEN_KIND = struct.Struct("=IH")


def first_per_port(sock: DiagSocket, request: bytes, skip: set[int]) -> dict[int, PortTuple]:
    """The first socket of each local port the dump returns, except the ports in ``skip``
    (updated with those found). For a dump that returns many sockets per port (a client host's
    connections: 100k sockets on 14k ports in bench/exporter.py) only the port is read of the
    others: two bytes a socket, nothing kept (the loop is ~0.4 us a socket; the kernel's
    message fill, ~0.9 us, is the larger part)."""
    one = _ONE.unpack_from
    head = _LEN_KIND.unpack_from
    hsize, least = _NLMSG_HDR.size, _NLMSG_HDR.size + MSG.size
    sport_at = hsize + _SPORT_AT
    socket_msgs = frozenset(_SOCKET_MSGS)
    out: dict[int, PortTuple] = {}
    sock._sock.send(request)
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    while True:
        n = sock._sock.recv_into(buf)
        off = 0
        while off + hsize <= n:
            length, kind = head(buf, off)
            if length < hsize or off + length > n:
                raise CodecError(f"netlink message length {length} at offset {off} is out of bounds")
            if kind in socket_msgs:
                if length < least:
                    raise CodecError("inet_diag_msg truncated")
                sport = buf[off + sport_at] << 8 | buf[off + sport_at + 1]  # network order
                if sport not in skip:
                    skip.add(sport)
                    fam, _sport, dport, src, dst, lo, hi = one(buf, off + hsize)
                    out[sport] = (addr_key(fam, src), addr_key(fam, dst), _U16(dport)[0], lo | hi << 32)
            elif kind == codec.NLMSG_DONE:
                _done(view[off + hsize : off + length])
                return out
            elif kind == codec.NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", buf, off + hsize)
                if err:
                    raise KernelError(f"sock_diag: {os.strerror(-err)} (errno {-err})", -err)
            elif kind == codec.NLMSG_OVERRUN:
                raise KernelError("netlink overrun: the kernel dropped part of the dump")
            off += (length + 3) & ~3
