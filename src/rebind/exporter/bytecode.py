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
    #: Match when the condition does NOT hold. Only the last op of a whole program may be
    #: negated. It is followed by a JMP: a match (yes) runs into the JMP, whose ``no`` (taken at
    #: run time: inet_diag_bc_run) lands past the end, reject; a miss (no) lands exactly on the
    #: end, accept. inet_diag_bc_audit follows ``yes`` only (to exactly the end: the JMP's
    #: yes = 4), and checks a ``no`` target with valid_cc only when it lies before the end.
    negate: bool = False

    @property
    def size(self) -> int:
        return BC_OP.size + len(self.payload) + (BC_OP.size if self.negate else 0)


def sport_eq(port: int) -> Op:
    # The port rides in the `no` field of a second op word (inet_diag_bc_run, INET_DIAG_BC_S_EQ).
    return Op(BcOp.S_EQ, BC_OP.pack(0, 0, port))


def sport_ge(port: int) -> Op:
    return Op(BcOp.S_GE, BC_OP.pack(0, 0, port))


def sport_le(port: int) -> Op:
    return Op(BcOp.S_LE, BC_OP.pack(0, 0, port))


def dport_ge(port: int) -> Op:
    return Op(BcOp.D_GE, BC_OP.pack(0, 0, port))


def dport_le(port: int) -> Op:
    return Op(BcOp.D_LE, BC_OP.pack(0, 0, port))


def port_bound_explicitly() -> Op:
    """The socket's port came from a bind() naming it (SOCK_BINDPORT_LOCK): the negation of
    INET_DIAG_BC_AUTO (``!(userlocks & SOCK_BINDPORT_LOCK)``; userlocks is 0 for TIME_WAIT and
    request socks, which never match). Only as the program's last op (see Op.negate)."""
    return Op(BcOp.AUTO, b"", negate=True)


def port_autobound() -> Op:
    """The socket's port did not come from a bind() naming it: INET_DIAG_BC_AUTO
    (``!(userlocks & SOCK_BINDPORT_LOCK)``; TIME_WAIT and request socks always match). connect()
    chose it, or bind(ip, 0) did: inet_diag cannot tell these apart (the bind bucket can)."""
    return Op(BcOp.AUTO, b"")


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


@dataclass(frozen=True, slots=True)
class Group:
    """Alternatives behind a guard: the guard's ops must all match, then any one term.

    A socket that fails the guard skips the whole group at once: with a guard "local port in
    [min, max] of the watched ports", the ~200k sockets of a busy host that match nothing run 2
    ops instead of one per port (inet_diag_bc_run runs for every socket of the walk).
    """

    guard: tuple[Op, ...]
    terms: tuple[tuple[Op, ...], ...]


def program(groups: Sequence[Group]) -> bytes:
    """Bytecode accepting a socket when, for some group, its guard and one of its terms match."""
    groups = [g for g in groups if g.terms]
    if not groups:
        raise ValueError("program needs at least one group with terms")
    # Sizes first: every jump is relative, to the start of the next term or group, or the end.
    layout: list[tuple[Op | None, int]] = []  # (op, group index); None = JMP to the accepting end
    for gi, g in enumerate(groups):
        layout += [(op, gi) for op in g.guard]
        for term in g.terms:
            layout += [(op, gi) for op in term]
            layout.append((None, gi))
    if layout and layout[-1][0] is None:
        layout.pop()  # the last term falls through to the end: accept
    total = sum(4 if op is None else op.size for op, _ in layout)
    if total > 0xFFFF - 4:
        raise ValueError(f"bytecode of {total} bytes exceeds a netlink attribute")
    # Offsets of every group start and every term start, to aim the misses.
    group_start: list[int] = []
    term_starts: list[list[int]] = []
    off = 0
    for gi, g in enumerate(groups):
        group_start.append(off)
        off += sum(op.size for op in g.guard)
        starts = []
        for ti, term in enumerate(g.terms):
            starts.append(off)
            off += sum(op.size for op in term)
            if not (gi == len(groups) - 1 and ti == len(g.terms) - 1):
                off += 4
        term_starts.append(starts)
    reject = total + 4

    def next_group(gi: int) -> int:
        return group_start[gi + 1] if gi + 1 < len(groups) else reject

    out = bytearray()
    for gi, g in enumerate(groups):
        for op in g.guard:  # a guard miss skips the group
            out += BC_OP.pack(op.code, op.size, next_group(gi) - len(out)) + op.payload
        for ti, term in enumerate(g.terms):
            miss = term_starts[gi][ti + 1] if ti + 1 < len(g.terms) else next_group(gi)
            for op in term:
                if op.negate:
                    if len(out) + op.size != total:
                        raise ValueError("only the last op of a program may be negated")
                    head = BC_OP.size + len(op.payload)
                    out += BC_OP.pack(op.code, head, op.size) + op.payload  # miss: accept
                    out += BC_OP.pack(BcOp.JMP, BC_OP.size, 2 * BC_OP.size)  # match: reject
                    continue
                out += BC_OP.pack(op.code, op.size, miss - len(out)) + op.payload
            if len(out) < total:
                out += BC_OP.pack(BcOp.JMP, 4, total - len(out))  # matched: accept
    assert len(out) == total
    return bytes(out)
