"""The one netlink framing (include/uapi/linux/netlink.h): message headers, attributes and the
frame walk, shared by the sock_diag codec (kernel/diag_codec.py, and the scrape's lean reader
exporter/fastdiag.py) and the RTM_GETROUTE codec (kernel/route.py). Pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from rebind.errors import CodecError

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH

# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq; __u32 nlmsg_pid; }
NLMSGHDR = struct.Struct("=IHHII")
# struct nlmsgerr { int error; struct nlmsghdr msg; }
NLMSGERR = struct.Struct("=i")
# struct rtattr / nlattr { __u16 len; __u16 type; }
RTA = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER


def align4(n: int) -> int:
    """NLMSG_ALIGN / RTA_ALIGN: messages and attributes start on 4-byte boundaries."""
    return (n + 3) & ~3


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: the header (nlmsg_pid 0: the kernel fills in ours) and ``body``."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr/nlattr, padded to 4 bytes."""
    length = RTA.size + len(payload)
    return RTA.pack(length, kind) + payload + bytes(align4(length) - length)


def iter_frames(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, payload) of every message in one datagram; CodecError when a length
    runs past the datagram (netlink_dump() never splits a message across datagrams)."""
    buf = memoryview(data)
    off = 0
    end = len(buf)
    while off < end:
        if end - off < NLMSGHDR.size:
            raise CodecError(f"{end - off} trailing bytes are too short for a netlink header")
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(buf, off)
        if length < NLMSGHDR.size or off + length > end:
            raise CodecError(f"netlink message length {length} at offset {off} is out of bounds")
        yield kind, flags, seq, buf[off + NLMSGHDR.size : off + length]
        off += align4(length)


def iter_attrs(buf: memoryview, off: int) -> Iterator[tuple[int, bytes]]:
    """Walk rtattrs from ``off`` to the end of ``buf`` (type without the NLA_F_* bits)."""
    end = len(buf)
    while off + RTA.size <= end:
        length, kind = RTA.unpack_from(buf, off)
        if length < RTA.size or off + length > end:
            raise CodecError(f"attribute of length {length} at offset {off} overruns its message")
        yield kind & NLA_TYPE_MASK, bytes(buf[off + RTA.size : off + length])
        off += align4(length)


def error_of(payload: memoryview) -> int:
    """The (negative errno, or 0) int an NLMSG_ERROR or a dump's NLMSG_DONE carries."""
    if len(payload) < NLMSGERR.size:
        raise CodecError("NLMSG_ERROR truncated")
    (err,) = NLMSGERR.unpack_from(payload, 0)
    return int(err)
