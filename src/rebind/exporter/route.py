"""The source address the kernel's route to a destination selects (``ip route get DST``).

One RTM_GETROUTE request over NETLINK_ROUTE; sends no packet and binds no port (a UDP
connect() would autobind one, which a scrape must not do). Unprivileged.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import IPAddress

NETLINK_ROUTE = 0
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
RTA_DST = 1
RTA_PREFSRC = 7
_NLMSGHDR = struct.Struct("=IHHII")
# struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type; __u32 flags; }
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_seq = itertools.count(1)


class NoRoute(Exception):
    def __init__(self, dst: IPAddress, err: int) -> None:
        super().__init__(f"no route to {dst}: {errno_mod.errorcode.get(err, err)}")
        self.errno = err


def request(dst: IPAddress, seq: int) -> bytes:
    fam = socket.AF_INET if isinstance(dst, IPv4Address) else socket.AF_INET6
    raw = dst.packed
    rta = _RTA.pack(_RTA.size + len(raw), RTA_DST) + raw
    body = _RTMSG.pack(fam, len(raw) * 8, 0, 0, 0, 0, 0, 0, 0) + rta
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def parse_reply(buf: bytes, seq: int, dst: IPAddress) -> IPAddress | None:
    """The RTA_PREFSRC of the RTM_NEWROUTE answer; None when the route names no source."""
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > len(buf):
            break
        body = buf[off + _NLMSGHDR.size : off + length]
        off += (length + 3) & ~3
        if mseq != seq:
            continue
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", body)
            if err:
                raise NoRoute(dst, -err)
            continue
        if kind != RTM_NEWROUTE:
            continue
        fam = body[0]
        a = _RTMSG.size
        while a + _RTA.size <= len(body):
            alen, akind = _RTA.unpack_from(body, a)
            if alen < _RTA.size:
                break
            if akind == RTA_PREFSRC:
                raw = bytes(body[a + _RTA.size : a + alen])
                return IPv4Address(raw) if fam == socket.AF_INET else IPv6Address(raw)
            a += (alen + 3) & ~3
        return None
    return None


def source_for(dst: IPAddress) -> IPAddress | None:
    """Raises NoRoute when the kernel has no route (ENETUNREACH, EHOSTUNREACH...)."""
    if isinstance(dst, IPv6Address) and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    seq = next(_seq)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as s:
        s.settimeout(2.0)
        s.send(request(dst, seq))
        # A non-dump request gets one answer in one datagram (rtnetlink_rcv_msg).
        return parse_reply(s.recv(1 << 16), seq, dst)
