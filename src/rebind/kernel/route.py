"""The source address the kernel's route to a destination selects (``ip route get DST``): the
one RTM_GETROUTE codec, for `why --connect` (kernel/connect_facts.py) and the exporter.

One request over NETLINK_ROUTE; sends no packet and binds no port (a UDP connect() would
autobind one, which a scrape must not do, and fails with EAGAIN exactly when the ephemeral range
is full). Unprivileged. Framing: kernel/netlink.py.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

from rebind.errors import CodecError
from rebind.kernel.netlink import (
    NETLINK_ROUTE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RTA,
    attr,
    error_of,
    iter_frames,
    message,
)
from rebind.model.records import IPAddress

# rtnetlink.h: RTM_NEWROUTE / RTM_GETROUTE, struct rtmsg, RTA_DST / RTA_PREFSRC.
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTA_DST = 1
RTA_PREFSRC = 7
# struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type; __u32 flags; }
_RTMSG = struct.Struct("=BBBBBBBBI")
_seq = itertools.count(1)


class NoRoute(Exception):
    def __init__(self, dst: IPAddress, err: int) -> None:
        super().__init__(f"no route to {dst}: {errno_mod.errorcode.get(err, err)}")
        self.errno = err


def request(dst: IPAddress, seq: int) -> bytes:
    fam = socket.AF_INET if isinstance(dst, IPv4Address) else socket.AF_INET6
    raw = dst.packed
    body = _RTMSG.pack(fam, len(raw) * 8, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, raw)
    return message(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


def parse_reply(buf: bytes, seq: int, dst: IPAddress) -> IPAddress | None:
    """The RTA_PREFSRC of the RTM_NEWROUTE answer; None when the route names no source (or the
    answer is malformed); NoRoute for the kernel's error (ENETUNREACH, EHOSTUNREACH...)."""
    try:
        for kind, _flags, mseq, body in iter_frames(buf):
            if mseq != seq:
                continue
            if kind == NLMSG_ERROR:
                err = error_of(body)
                if err:
                    raise NoRoute(dst, -err)
                continue
            if kind == RTM_NEWROUTE:
                return _prefsrc(body)
    except CodecError:
        return None
    return None


def _prefsrc(body: memoryview) -> IPAddress | None:
    if len(body) < _RTMSG.size:
        return None
    fam = body[0]
    a = _RTMSG.size
    while a + RTA.size <= len(body):
        alen, akind = RTA.unpack_from(body, a)
        if alen < RTA.size:
            return None
        raw = bytes(body[a + RTA.size : a + alen])
        if akind == RTA_PREFSRC and len(raw) == (4 if fam == socket.AF_INET else 16):
            return IPv4Address(raw) if fam == socket.AF_INET else IPv6Address(raw)
        a += (alen + 3) & ~3
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
