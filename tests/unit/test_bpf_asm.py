"""The eBPF assembler on fixed inputs: encodings checked against the ISA document's bytes."""

from __future__ import annotations

import struct

import pytest

from rebind.kernel.bpf import asm


def insns(raw: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per 8-byte instruction."""
    out = []
    for code, regs, off, imm in struct.iter_unpack("<BBhi", raw):
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


def test_single_instructions_encode_as_in_the_isa() -> None:
    p = asm.Program()
    p.mov_imm(asm.R0, 0)  # b7 00 00 00 00 00 00 00
    p.mov(asm.R6, asm.R1)  # bf 16 ...
    p.load(8, asm.R7, asm.R6, 24)  # 79 67 18 00 ...
    p.load(2, asm.R1, asm.R9, 0)  # 69 91 ...
    p.store(4, asm.FP, -40, asm.R1)  # 63 1a d8 ff ...
    p.store_imm(8, asm.FP, -8, 7)  # 7a 0a f8 ff 07 00 00 00
    p.alu_imm(asm.AND, asm.R1, 0o170000)  # 57 01 00 00 00 f0 00 00 (imm little-endian)
    p.alu(asm.RSH, asm.R3, asm.R2)  # 7f 23 ...
    p.call(127)  # 85 00 00 00 7f 00 00 00
    p.exit()  # 95 00 ...
    raw = p.assemble()
    assert raw[:8] == bytes.fromhex("b700000000000000")
    assert raw[8:16] == bytes.fromhex("bf16000000000000")
    assert raw[16:24] == bytes.fromhex("7967180000000000")
    assert raw[24:32] == bytes.fromhex("6991000000000000")
    assert raw[32:40] == bytes.fromhex("631ad8ff00000000")
    assert raw[40:48] == bytes.fromhex("7a0af8ff07000000")
    assert raw[48:56] == bytes.fromhex("5701000000f00000")
    assert raw[56:64] == bytes.fromhex("7f23000000000000")
    assert raw[64:72] == bytes.fromhex("850000007f000000")
    assert raw[72:80] == bytes.fromhex("9500000000000000")
    assert len(p) == 10


def test_ld_map_fd_takes_two_slots_with_pseudo_map_fd() -> None:
    p = asm.Program()
    p.ld_map_fd(asm.R1, 5)
    raw = p.assemble()
    assert insns(raw) == [(0x18, 1, asm.PSEUDO_MAP_FD, 0, 5), (0, 0, 0, 0, 0)]


def test_jumps_count_from_the_next_instruction() -> None:
    p = asm.Program()
    p.label("top")
    p.jump_imm(asm.JEQ, asm.R1, 0, "out")  # 0 -> 3: off 2
    p.jump_reg(asm.JNE, asm.R1, asm.R2, "top")  # 1 -> 0: off -2
    p.goto("out")  # 2 -> 3: off 0
    p.label("out")
    p.exit()
    got = insns(p.assemble())
    assert got[0] == (0x15, 1, 0, 2, 0)
    assert got[1] == (0x5D, 1, 2, -2, 0)
    assert got[2] == (0x05, 0, 0, 0, 0)


def test_local_calls_and_callbacks_put_the_offset_in_imm() -> None:
    p = asm.Program()
    p.ld_func(asm.R2, "cb")  # slots 0-1; cb at 4: imm 3
    p.call_local("cb")  # slot 2: imm 1
    p.exit()
    p.label("cb")
    p.exit()
    got = insns(p.assemble())
    assert got[0] == (0x18, 2, asm.PSEUDO_FUNC, 0, 3)
    assert got[2] == (0x85, 0, asm.PSEUDO_CALL, 0, 1)
    assert p.address("cb") == 4


def test_unsigned_immediates_wrap_to_s32() -> None:
    assert asm.encode(0xB7, 0, 0, 0, 0xFFFFFFFF)[4:] == b"\xff\xff\xff\xff"
    assert asm.encode(0xB7, 0, 0, 0, -1)[4:] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "kw",
    [dict(dst=11), dict(src=-1), dict(off=1 << 15), dict(imm=1 << 32), dict(imm=-(1 << 31) - 1)],
)
def test_out_of_range_fields_are_refused(kw: dict[str, int]) -> None:
    with pytest.raises(asm.AsmError):
        asm.encode(0xB7, **kw)


def test_labels_must_exist_once() -> None:
    p = asm.Program()
    p.goto("nowhere")
    with pytest.raises(asm.AsmError, match="undefined label"):
        p.assemble()
    p.label("x")
    with pytest.raises(asm.AsmError, match="twice"):
        p.label("x")


def test_disassembly_names_what_the_program_does() -> None:
    p = asm.Program()
    p.ld_map_fd(asm.R1, 5)
    p.load(8, asm.R7, asm.R6, 24)
    p.store(4, asm.FP, -40, asm.R1)
    p.store_imm(8, asm.FP, -8, 0)
    p.alu_imm(asm.ADD, asm.R2, -8)
    p.alu(asm.RSH, asm.R3, asm.R2)
    p.jump_imm(asm.JNE, asm.R0, 0, "out")
    p.call(1)
    p.call_local("out")
    p.label("out")
    p.exit()
    text = [line.strip().split("  ", 1)[1] for line in asm.disassemble(p.assemble())]
    assert text == [
        "r1 = map_fd 5",
        "(second half of ld_imm64)",
        "r7 = *(u64 *)(r6 + 24)",
        "*(u32 *)(r10 - 40) = r1",
        "*(u64 *)(r10 - 8) = 0x0",
        "r2 += -0x8",
        "r3 >>= r2",
        "if r0 != 0x0 goto 10",
        "call helper 1",
        "call pc 10",
        "exit",
    ]


def test_the_macros_are_the_sequences_every_program_shares() -> None:
    p = asm.Program()
    p.map_lookup(7, -16, "out")
    p.probe_read(-24, 8, asm.R1, 0)  # no offset: no "r3 += 0"
    p.probe_read(-32, 4, asm.R2, 40, asm.HELPER_PROBE_READ_USER)
    p.label("out")
    p.exit()
    text = [line.strip().split("  ", 1)[1] for line in asm.disassemble(p.assemble())]
    assert text == [
        "r1 = map_fd 7",
        "(second half of ld_imm64)",
        "r2 = r10",
        "r2 += -0x10",
        "call helper 1",
        "if r0 == 0x0 goto 17",
        "r3 = r1",
        "r1 = r10",
        "r1 += -0x18",
        "r2 = 0x8",
        "call helper 113",
        "r3 = r2",  # the source first: it may be r1 or r2
        "r3 += 0x28",
        "r1 = r10",
        "r1 += -0x20",
        "r2 = 0x4",
        "call helper 112",
        "exit",
    ]
