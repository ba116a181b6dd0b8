"""The lookup program (find a socket by 4-tuple, copy the iterator's record) and the listening-only
iterator program, checked without a kernel: built from the fixed 6.18 layout of
test_bpf_sockiter.py. Their kernel behaviour is tests/kernel/test_why_kernel_read.py."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import socklookup as L
from rebind.kernel.bpf import sockprog as P
from rebind.model.records import Endpoint
from tests.unit.test_bpf_sockiter import MAPS, fake_layout


def _calls(insns: bytes) -> list[int]:
    return [imm for code, _, _, imm in struct.iter_unpack("<BBhi", insns) if code == asm.JMP | asm.CALL]


def _stack_offsets(insns: bytes) -> list[tuple[int, int]]:
    out = []
    for code, regs, off, _ in struct.iter_unpack("<BBhi", insns):
        cls = code & 0x07
        base = regs >> 4 if cls == asm.LDX else regs & 0xF
        if cls in (asm.LDX, asm.STX, asm.ST) and base == asm.FP:
            out.append((off, {asm.B: 1, asm.H: 2, asm.W: 4, asm.DW: 8}[code & 0x18]))
    return out


def test_the_lookup_program_releases_what_it_looks_up_and_stays_in_its_frame() -> None:
    insns = L.build_lookup_program(fake_layout(), 11, 12)
    calls = _calls(insns)
    assert calls.count(L.HELPER_SKC_LOOKUP_TCP) == 1 and calls.count(L.HELPER_SK_RELEASE) == 1
    for off, size in _stack_offsets(insns):
        assert off >= -512 and off + size <= 0
        if size == 8 and off in (L.REF_SLOT, L.ENTRY_SLOT):
            assert off % 8 == 0  # spilled pointers: aligned slots
    # the spilled slots lie below the record, outside every slot of the iterator's frame
    assert L.ENTRY_SLOT < L.REF_SLOT and L.REF_SLOT + 8 <= P.SockFrame.RECORD
    assert L.RECORD_AT + P.RECORD.size <= L.ENTRY_SIZE


def test_a_tuple_is_the_packet_to_the_socket_from_its_peer() -> None:
    local, remote = Endpoint(IPv4Address("127.0.0.1"), 9000), Endpoint(IPv4Address("127.0.0.9"), 40000)
    raw, size = L.ENTRY_IN.unpack(L._tuple(local, remote))
    assert size == 12 and raw[:12] == bytes([127, 0, 0, 9, 127, 0, 0, 1]) + struct.pack(">HH", 40000, 9000)
    local6, remote6 = Endpoint(IPv6Address("::1"), 9000), Endpoint(IPv6Address("fe80::2"), 40000)
    raw, size = L.ENTRY_IN.unpack(L._tuple(local6, remote6))
    assert (
        size == 36 and raw[:16] == IPv6Address("fe80::2").packed and raw[16:32] == IPv6Address("::1").packed
    )


def test_the_listening_program_stops_at_the_first_socket_not_listening() -> None:
    plain = P.build_sock_program(fake_layout(), MAPS, proto="tcp", count=False)
    only = P.build_sock_program(fake_layout(), MAPS, proto="tcp", count=False, listeners_only=True)
    text = asm.disassemble(only)
    assert len(only) > len(plain)
    # the state test against TCP_LISTEN, and a return of 1 (bpf_iter: stop, EAGAIN to the reader)
    assert any(f"== {P.TCP_LISTEN:#x}" in line for line in text)
    assert any("r0 = 0x1" in line for line in text)
    assert not any("r0 = 0x1" in line for line in asm.disassemble(plain))
