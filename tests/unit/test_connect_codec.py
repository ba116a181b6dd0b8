"""Bytecode for the client side: host conditions and OR-of-AND chains (pure)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from rebind.kernel import diag_codec as c


def ops(bc: bytes) -> list[tuple[int, int, int]]:
    """(code, yes, no) of each op header, walking the yes chain."""
    out = []
    off = 0
    while off < len(bc):
        code, yes, no = c.BC_OP.unpack_from(bc, off)
        out.append((code, yes, no))
        off += yes
    return out


def test_host_cond_layout():
    cond = c.host_cond(c.BcOp.D_COND, IPv4Address("127.0.0.1"), port=9000)
    assert cond.size == 4 + 8 + 4
    fam, plen, port = c.HOSTCOND.unpack_from(cond.payload)
    assert (fam, plen, port) == (2, 32, 9000) and cond.payload[8:] == bytes([127, 0, 0, 1])
    v6 = c.host_cond(c.BcOp.S_COND, IPv6Address("::1"), prefix_len=64)
    assert v6.size == 4 + 8 + 16 and c.HOSTCOND.unpack_from(v6.payload) == (10, 64, c.ANY_PORT)
    anyaddr = c.host_cond(c.BcOp.D_COND, None, port=0)
    assert anyaddr.size == 12 and c.HOSTCOND.unpack_from(anyaddr.payload) == (0, 0, 0)
    with pytest.raises(ValueError):
        c.host_cond(c.BcOp.S_GE, None)
    with pytest.raises(ValueError):
        c.host_cond(c.BcOp.S_COND, IPv4Address("1.2.3.4"), prefix_len=33)
    with pytest.raises(ValueError):
        c.port_cond(c.BcOp.D_COND, 1)
    with pytest.raises(ValueError):
        c.port_cond(c.BcOp.D_GE, 70000)


def test_compile_any_jumps():
    a = c.port_cond(c.BcOp.D_EQ, 9000)  # 8 bytes
    b1, b2 = c.port_cond(c.BcOp.S_GE, 10), c.port_cond(c.BcOp.S_LE, 20)
    bc = c.compile_any([[a], [b1, b2]])
    # [D_EQ 8][JMP 4][S_GE 8][S_LE 8] = 28 bytes
    assert len(bc) == 28
    assert ops(bc) == [
        (c.BcOp.D_EQ, 8, 12),  # miss -> second chain at 12
        (c.BcOp.JMP, 4, 28 - 8),  # passed -> exactly the end: accept
        (c.BcOp.S_GE, 8, 28 + 4 - 12),  # miss in the last chain -> end + 4: reject
        (c.BcOp.S_LE, 8, 28 + 4 - 20),
    ]
    assert struct.unpack_from("=H", bc, 6)[0] == 9000


def test_compile_any_rejects_empty():
    with pytest.raises(ValueError):
        c.compile_any([])
    with pytest.raises(ValueError):
        c.compile_any([[]])


def test_destination_filter_is_one_op():
    bc = c.destination_filter(IPv6Address("::1"), 443)
    assert ops(bc) == [(c.BcOp.D_COND, 28, 32)]
