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
from typing import TYPE_CHECKING

from rebind.errors import CodecError, KernelError
from rebind.exporter.facts import PortTuple
from rebind.kernel import diag_codec as codec
from rebind.kernel.diag import RECV_SIZE, DiagSocket

if TYPE_CHECKING:
    from rebind.exporter.tally import Tally

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
            elif _control(kind, view[body : off + length]):
                return
            off += (length + 3) & ~3


def _done(payload: memoryview) -> None:
    if len(payload) >= 4:
        (err,) = struct.unpack_from("=i", payload)
        if err < 0:
            raise KernelError(f"sock_diag dump failed: {os.strerror(-err)} (errno {-err})", -err)


def _control(kind: int, payload: memoryview) -> bool:
    """A message of the dump that is not a socket: True at its end (NLMSG_DONE); an error or an
    overrun raises; anything else (NLMSG_NOOP) is skipped. Called only for these rare messages,
    so the per-socket loops stay inline."""
    if kind == codec.NLMSG_DONE:
        _done(payload)
        return True
    if kind == codec.NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", payload)
        if err:
            raise KernelError(f"sock_diag: {os.strerror(-err)} (errno {-err})", -err)
    elif kind == codec.NLMSG_OVERRUN:
        raise KernelError("netlink overrun: the kernel dropped part of the dump")
    return False


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
            elif _control(kind, view[off + hsize : off + length]):
                return out
            off += (length + 3) & ~3


#: What the connection scan reads of each socket: state, timer; sport and dport (4 raw bytes,
#: network order); src, dst; expires (inet_diag_msg after its family byte; if and cookie
#: skipped). For IPv4 the addresses' first 4 bytes only (the key, as addr_key).
_CONN4 = struct.Struct("=BBx4s4s12x4s12x12xI")
_CONN6 = struct.Struct("=BBx4s16s16s12xI")
_TW_TIMER, _TIME_WAIT = 3, 6  # Timer.TIME_WAIT, State.TIME_WAIT
#: A timewait mini-socket: TIME_WAIT, or an orphaned FIN_WAIT2 (SocketRecord.is_mini).
_MINI = (6, 5)


def scan_conns(sock: DiagSocket, request: bytes, tally: Tally) -> list[bytes]:
    """The connection walk fed to ``tally``: exactly :meth:`Tally.conn` for each socket (the
    unit tests hold the two equal), in one loop over the receive buffer -- no tuple, generator
    step or call per socket: ~17k sockets a scrape in bench/exporter.py, whose per-socket Python
    was the scrape's largest part after the kernel's walk. Returns the payloads (copies) of the
    sockets the conflict model needs, for ``diag_codec.decode_socket``."""
    unpack4, unpack6, head = _CONN4.unpack_from, _CONN6.unpack_from, _LEN_KIND.unpack_from
    hsize, least = _NLMSG_HDR.size, _NLMSG_HDR.size + MSG.size
    socket_msgs = frozenset(_SOCKET_MSGS)
    tcp_ports, listeners, kept = tally.tcp_ports, tally.listeners, tally.kept
    seen, tw_max = tally.conn_seen, tally.tw_max_ms
    dests, usage, bind_held = tally.dests, tally.usage, tally.bind_held
    dest_ports = frozenset(p for _a, p in dests)
    lo, hi = tally.range
    wild4, wild6, mapped = bytes(4), bytes(16), _V4_MAPPED
    wanted: list[bytes] = []
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
                if buf[off + hsize] == 2:  # AF_INET
                    st, timer, ports, src, dst, expires = unpack4(buf, off + hsize + 1)
                else:
                    st, timer, ports, src, dst, expires = unpack6(buf, off + hsize + 1)
                    if src[:12] == mapped:
                        src = src[12:]
                    if dst[:12] == mapped:
                        dst = dst[12:]
                sport, dport = ports[0] << 8 | ports[1], ports[2] << 8 | ports[3]
                mini = timer == _TW_TIMER and st in _MINI
                if sport in tcp_ports:  # Tally.conn, inlined
                    key = (sport, st, dst)
                    seen[key] = seen.get(key, 0) + 1
                    if mini:
                        if expires > tw_max.get(sport, -1):
                            tw_max[sport] = expires
                        child = True
                    else:
                        keys = listeners.get(sport, ())
                        child = dport != 0 and (src in keys or wild4 in keys or wild6 in keys)
                    if not child or (sport, mini, src) not in kept:
                        if child:
                            kept.add((sport, mini, src))
                        wanted.append(bytes(view[off + hsize : off + length]))
                d = dests.get((dst, dport)) if dport in dest_ports else None
                if d is not None:
                    live, tw = usage.setdefault((d, src), (set(), set()))
                    (tw if mini or st == _TIME_WAIT else live).add(sport)
                elif sport not in tcp_ports and lo <= sport <= hi:
                    bind_held.add(sport)
            elif _control(kind, view[off + hsize : off + length]):
                return wanted
            off += (length + 3) & ~3
