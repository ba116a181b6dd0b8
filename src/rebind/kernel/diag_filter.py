"""inet_diag's bytecode filters (sans-IO): the programs inet_diag_bc_run runs on each socket
of a dump, so that only the matching ones cost a message. Ops and structs mirror
include/uapi/linux/inet_diag.h (``struct inet_diag_bc_op``, ``inet_diag_hostcond``); what each
op may do is inet_diag_bc_audit's. Split from :mod:`.diag_codec`, which re-exports all of it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import Family


class BcOp(enum.IntEnum):
    """Bytecode op codes (INET_DIAG_BC_*)."""

    NOP = 0
    JMP = 1
    S_GE = 2
    S_LE = 3
    D_GE = 4
    D_LE = 5
    AUTO = 6
    S_COND = 7
    D_COND = 8
    DEV_COND = 9
    MARK_COND = 10
    S_EQ = 11
    D_EQ = 12
    CGROUP_COND = 13


# struct inet_diag_bc_op { unsigned char code, yes; unsigned short no; }
BC_OP = struct.Struct("=BBH")


def port_filter(ports: Iterable[int]) -> bytes:
    """Bytecode accepting sockets whose *local* port is any of ``ports``.

    inet_diag_bc_run jumps ``yes`` or ``no`` bytes after each op; a socket is accepted when it
    lands exactly on the end and rejected when it lands 4 bytes past it. A port op is two words,
    the second carrying the port (host order) in its ``no`` field. inet_diag_bc_audit only
    accepts ``no`` targets that lie on the ``yes`` chain, so an OR is laid out as ss does it:
    ``[S_EQ p1][JMP over the rest][S_EQ p2]...`` -- a match falls into the JMP, which always takes
    its ``no`` branch to the end; a miss skips the JMP into the next test.
    """
    plist = sorted(set(ports))
    if not plist:
        raise ValueError("port_filter needs at least one port")
    if len(plist) > MAX_FILTER_PORTS:
        raise ValueError(f"at most {MAX_FILTER_PORTS} ports per filter")
    out = bytearray()
    for i, port in enumerate(plist):
        out += BC_OP.pack(BcOp.S_EQ, 8, 12) + BC_OP.pack(0, 0, port)
        if i < len(plist) - 1:
            rest = 12 * (len(plist) - i - 1) - 4
            out += BC_OP.pack(BcOp.JMP, 4, rest + 4)
    return bytes(out)


# 12 bytes a port; the attribute length is a u16.
MAX_FILTER_PORTS = 4096


def port_range_filter(lo: int, hi: int) -> bytes:
    """Bytecode accepting local ports in [lo, hi] (S_GE then S_LE)."""
    # op1: sport >= lo ? next : reject ; op2: sport <= hi ? accept : reject
    return (
        BC_OP.pack(BcOp.S_GE, 8, 20)
        + BC_OP.pack(0, 0, lo)
        + BC_OP.pack(BcOp.S_LE, 8, 12)
        + BC_OP.pack(0, 0, hi)
    )


# struct inet_diag_hostcond { __u8 family; __u8 prefix_len; int port; __be32 addr[]; }: the int is
# 4-byte aligned, so two pad bytes; port -1 means "any port".
HOSTCOND = struct.Struct("=BBxxi")
ANY_PORT = -1


@dataclass(frozen=True, slots=True)
class Cond:
    """One bytecode test (op header added by :func:`compile_any`)."""

    code: BcOp
    payload: bytes

    @property
    def size(self) -> int:
        return BC_OP.size + len(self.payload)


def port_cond(code: BcOp, port: int) -> Cond:
    """S_/D_ GE, LE, EQ: the port travels in the ``no`` field of a second op word (host order)."""
    if code not in (BcOp.S_GE, BcOp.S_LE, BcOp.S_EQ, BcOp.D_GE, BcOp.D_LE, BcOp.D_EQ):
        raise ValueError(f"{code!r} is not a port comparison")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return Cond(code, BC_OP.pack(0, 0, port))


def host_cond(
    code: BcOp,
    addr: IPv4Address | IPv6Address | None,
    *,
    prefix_len: int | None = None,
    port: int = ANY_PORT,
) -> Cond:
    """S_COND / D_COND: address prefix and optional port (inet_diag_bc_run).

    ``addr=None`` is AF_UNSPEC: any address, so only ``port`` is compared. An AF_INET condition
    also matches IPv6 sockets on v4-mapped addresses (the kernel checks ::ffff:a.b.c.d itself).
    """
    if code not in (BcOp.S_COND, BcOp.D_COND):
        raise ValueError(f"{code!r} is not a host condition")
    if addr is None:
        return Cond(code, HOSTCOND.pack(0, 0, port))
    fam = Family.INET if addr.version == 4 else Family.INET6
    bits = 32 if addr.version == 4 else 128
    plen = bits if prefix_len is None else prefix_len
    if not 0 <= plen <= bits:
        raise ValueError(f"prefix length {plen} out of range for {addr}")
    return Cond(code, HOSTCOND.pack(fam, plen, port) + addr.packed)


def compile_any(chains: Iterable[Iterable[Cond]]) -> bytes:
    """Bytecode accepting a socket when *all* tests of *any* chain pass.

    Layout (what inet_diag_bc_audit accepts: every ``no`` target lies on the ``yes`` chain, which
    here runs straight through): each test's ``yes`` is the next op; its ``no`` is the first test
    of the next chain, or 4 bytes past the end (reject) for the last chain. A chain that passed
    ends in a JMP whose ``no`` branch (always taken) lands exactly on the end (accept).
    """
    cs = [list(c) for c in chains]
    if not cs or any(not c for c in cs):
        raise ValueError("compile_any needs non-empty chains")
    starts: list[int] = []
    off = 0
    for i, c in enumerate(cs):
        starts.append(off)
        off += sum(t.size for t in c) + (BC_OP.size if i < len(cs) - 1 else 0)
    total = off
    if total > 0xFFFF - 8:
        raise ValueError("bytecode too long for one attribute")
    out = bytearray()
    for i, c in enumerate(cs):
        miss = starts[i + 1] if i < len(cs) - 1 else total + 4
        for t in c:
            here = len(out)
            out += BC_OP.pack(t.code, t.size, miss - here) + t.payload
        if i < len(cs) - 1:
            here = len(out)
            out += BC_OP.pack(BcOp.JMP, BC_OP.size, total - here)
    assert len(out) == total
    return bytes(out)


def destination_filter(dst: IPv4Address | IPv6Address, dport: int) -> bytes:
    """Bytecode accepting sockets connected to exactly ``dst:dport`` (one D_COND)."""
    return compile_any([[host_cond(BcOp.D_COND, dst, port=dport)]])
