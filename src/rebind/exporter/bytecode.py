"""inet_diag bytecode for the exporter's dumps: an OR of AND-terms (pure).

``diag_codec.port_filter`` covers "local port is one of"; a scrape also needs "remote is
dst:dport" (INET_DIAG_BC_D_COND) and "local port in [lo, hi]", OR-ed together, so that each
table is walked once per scrape however many ports and destinations are watched.

Layout (inet_diag_bc_run, inet_diag_bc_audit): every op jumps ``yes`` bytes on a match and
``no`` bytes on a miss; landing exactly on the end accepts, landing 4 bytes past it rejects.
A term's ops match in sequence; the last one falls into a JMP whose ``no`` goes to the end
(accept). A miss anywhere in a term jumps to the start of the next term (reject after the last).
Every ``no`` target is the start of a term, which is on the ``yes`` chain through the JMPs, as
the audit (valid_cc) requires.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.kernel.diag_codec import BC_OP, BcOp
from rebind.model.records import IPAddress

# struct inet_diag_hostcond { __u8 family; __u8 prefix_len; int port; __be32 addr[]; }
_HOSTCOND = struct.Struct("=BBxxi")


@dataclass(frozen=True, slots=True)
class Op:
    """One condition: an op code and the bytes that follow its 4-byte header."""

    code: BcOp
    payload: bytes

    @property
    def size(self) -> int:
        return BC_OP.size + len(self.payload)


def sport_eq(port: int) -> Op:
    # The port rides in the `no` field of a second op word (inet_diag_bc_run, INET_DIAG_BC_S_EQ).
    return Op(BcOp.S_EQ, BC_OP.pack(0, 0, port))


def sport_ge(port: int) -> Op:
    return Op(BcOp.S_GE, BC_OP.pack(0, 0, port))


def sport_le(port: int) -> Op:
    return Op(BcOp.S_LE, BC_OP.pack(0, 0, port))


def remote_is(addr: IPAddress, port: int) -> Op:
    """Remote address and port equal (D_COND; an IPv4 condition also matches v4-mapped IPv6)."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, IPv4Address):
        return Op(BcOp.D_COND, _HOSTCOND.pack(socket.AF_INET, 32, port) + addr.packed)
    return Op(BcOp.D_COND, _HOSTCOND.pack(socket.AF_INET6, 128, port) + addr.packed)


def any_of(terms: Sequence[Sequence[Op]]) -> bytes:
    """Bytecode accepting a socket when every op of at least one term matches."""
    terms = [t for t in terms if t]
    if not terms:
        raise ValueError("any_of needs at least one non-empty term")
    sizes = [sum(op.size for op in t) + (4 if i < len(terms) - 1 else 0) for i, t in enumerate(terms)]
    total = sum(sizes)
    if total > 0xFFFF - 4:
        raise ValueError(f"bytecode of {total} bytes exceeds a netlink attribute")
    out = bytearray()
    for i, term in enumerate(terms):
        term_end = len(out) + sizes[i]  # start of the next term, or the end of the program
        for op in term:
            here = len(out)
            miss = (term_end - here) + (4 if i == len(terms) - 1 else 0)
            out += BC_OP.pack(op.code, op.size, miss) + op.payload
        if i < len(terms) - 1:
            out += BC_OP.pack(BcOp.JMP, 4, total - len(out))  # lands on the end: accept
    return bytes(out)
