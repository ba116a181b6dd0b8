"""A tiny eBPF assembler (and disassembler): the handful of instructions rebind's programs need.

Encoding: Documentation/bpf/standardization/instruction-set.rst and include/uapi/linux/bpf.h.
An instruction is 8 bytes, ``struct bpf_insn {u8 code; u8 dst_reg:4, src_reg:4; s16 off;
s32 imm;}`` (little-endian, so the register byte is ``dst | src << 4``); ``ld_imm64`` takes two.
Jumps name labels; offsets are counted in instructions from the one after the jump.
"""

from __future__ import annotations

import struct

# instruction classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# sizes (loads and stores)
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
SIZE_OF = {1: B, 2: H, 4: W, 8: DW}
# modes
IMM, MEM = 0x00, 0x60
# source operand
K, X = 0x00, 0x08
# ALU operations
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0,
)  # fmt: skip
# jump operations
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0,
)  # fmt: skip
#: src_reg of ld_imm64 saying "imm is a map fd" (the verifier swaps in the map's address).
PSEUDO_MAP_FD = 1
#: src_reg of ld_imm64 saying "imm is the relative offset of a subprogram" (a callback, 5.13).
PSEUDO_FUNC = 4
#: src_reg of a call saying "imm is the relative offset of a subprogram" (bpf-to-bpf call).
PSEUDO_CALL = 1

#: enum bpf_func_id (include/uapi/linux/bpf.h): the helpers the macros below call.
HELPER_MAP_LOOKUP_ELEM = 1
HELPER_PROBE_READ_USER = 112  # Linux 5.5
HELPER_PROBE_READ_KERNEL = 113  # Linux 5.5; gpl_only

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10  # read-only frame pointer; the stack is the 512 bytes below it

_INSN = struct.Struct("<BBhi")


class AsmError(ValueError):
    pass


def encode(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    if not (0 <= dst <= 10 and 0 <= src <= 10):
        raise AsmError(f"bad register r{dst}/r{src}")
    if not -(1 << 15) <= off < 1 << 15:
        raise AsmError(f"offset {off} does not fit s16")
    if not -(1 << 31) <= imm < 1 << 32:
        raise AsmError(f"immediate {imm} does not fit 32 bits")
    if imm >= 1 << 31:
        imm -= 1 << 32  # an unsigned 32-bit pattern, stored as the s32 it is
    return _INSN.pack(code, dst | src << 4, off, imm)


class Program:
    """Instructions appended in order; ``label()`` marks a jump target."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, int, int, int, str | None]] = []
        self._labels: dict[str, int] = {}

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self._code.append((code, dst, src, off, imm, None))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)

    # dst = src / dst = imm (64-bit)
    def mov(self, dst: int, src: int) -> None:
        self._emit(ALU64 | MOV | X, dst, src)

    def mov_imm(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | MOV | K, dst, imm=imm)

    def alu_imm(self, op: int, dst: int, imm: int) -> None:
        self._emit(ALU64 | op | K, dst, imm=imm)

    def alu(self, op: int, dst: int, src: int) -> None:
        self._emit(ALU64 | op | X, dst, src)

    # dst = *(size *)(src + off)
    def load(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(LDX | MEM | SIZE_OF[size], dst, src, off)

    # *(size *)(dst + off) = src
    def store(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(STX | MEM | SIZE_OF[size], dst, src, off)

    # *(size *)(dst + off) = imm
    def store_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(ST | MEM | SIZE_OF[size], dst, off=off, imm=imm)

    def jump_imm(self, op: int, dst: int, imm: int, target: str) -> None:
        """if (dst <op> imm) goto target (64-bit compare)."""
        self._code.append((JMP | op | K, dst, 0, 0, imm, target))

    def jump_reg(self, op: int, dst: int, src: int, target: str) -> None:
        self._code.append((JMP | op | X, dst, src, 0, 0, target))

    def goto(self, target: str) -> None:
        self._code.append((JMP | JA, 0, 0, 0, 0, target))

    def call(self, helper: int) -> None:
        """Call helper number ``helper`` (enum bpf_func_id); args r1-r5, result r0."""
        self._emit(JMP | CALL, imm=helper)

    def call_local(self, target: str) -> None:
        """Call the subprogram at ``target`` (a bpf-to-bpf call, Linux 4.16)."""
        self._code.append((JMP | CALL, 0, PSEUDO_CALL, 0, 0, target))

    def ld_func(self, dst: int, target: str) -> None:
        """dst = the subprogram at ``target``, as a callback argument (e.g. for bpf_loop)."""
        self._code.append((LD | IMM | DW, dst, PSEUDO_FUNC, 0, 0, target))
        self._emit(0)

    def exit(self) -> None:
        self._emit(JMP | EXIT)

    def ld_map_fd(self, dst: int, map_fd: int) -> None:
        """dst = the map behind ``map_fd`` (a two-slot ld_imm64)."""
        self._emit(LD | IMM | DW, dst, PSEUDO_MAP_FD, imm=map_fd)
        self._emit(0)  # second half: the upper 32 bits of the immediate, here 0

    # -- macros: the sequences every program of rebind repeats -----------------------------

    def map_lookup(self, map_fd: int, key_off: int, missing: str) -> None:
        """r0 = bpf_map_lookup_elem(map, fp + key_off); goto ``missing`` when there is no entry.
        Clobbers r1-r5 (a helper call)."""
        self.ld_map_fd(R1, map_fd)
        self.mov(R2, FP)
        self.alu_imm(ADD, R2, key_off)
        self.call(HELPER_MAP_LOOKUP_ELEM)
        self.jump_imm(JEQ, R0, 0, missing)

    def probe_read(
        self, dst_off: int, size: int, src: int, src_off: int, helper: int = HELPER_PROBE_READ_KERNEL
    ) -> None:
        """fp + dst_off = ``size`` bytes at src + src_off (bpf_probe_read_kernel, or _user);
        r0 = 0 or a negative error. r3 is set first: ``src`` may be r1 or r2."""
        self.mov(R3, src)
        if src_off:
            self.alu_imm(ADD, R3, src_off)
        self.mov(R1, FP)
        self.alu_imm(ADD, R1, dst_off)
        self.mov_imm(R2, size)
        self.call(helper)

    def assemble(self) -> bytes:
        out = []
        for at, (code, dst, src, off, imm, target) in enumerate(self._code):
            if target is not None:
                if target not in self._labels:
                    raise AsmError(f"undefined label {target!r}")
                rel = self._labels[target] - (at + 1)
                if code == JMP | CALL or code == LD | IMM | DW:
                    imm = rel  # subprogram calls and references count in imm
                else:
                    off = rel
            out.append(encode(code, dst, src, off, imm))
        return b"".join(out)

    def address(self, label: str) -> int:
        """Instruction index of a label (a subprogram's start, for BTF func_info)."""
        return self._labels[label]

    def __len__(self) -> int:
        return len(self._code)


# -- disassembly: for the saved-disassembly test and for reading a program ---------------------

_ALU_SYM = {ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=", RSH: ">>=",
            MOD: "%=", XOR: "^=", MOV: "=", ARSH: "s>>="}  # fmt: skip
_JMP_SYM = {JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=", JLT: "<",
            JLE: "<="}  # fmt: skip
_SIZE_NAME = {B: "u8", H: "u16", W: "u32", DW: "u64"}


def _imm(imm: int) -> str:
    return f"{imm:#x}" if imm >= 0 else f"-{-imm:#x}"


def _operand(src: int, imm: int, code: int) -> str:
    """The source of an ALU or jump instruction: a register (X) or the immediate (K)."""
    return f"r{src}" if code & X else _imm(imm)


def _mem(code: int, reg: int, off: int) -> str:
    return f"*({_SIZE_NAME[code & 0x18]} *)(r{reg} {'-' if off < 0 else '+'} {abs(off)})"


def disassemble(raw: bytes) -> list[str]:
    """One line per instruction slot, in the kernel verifier's notation (``r1 = *(u64 *)(r6 + 8)``).

    Jump and call targets are printed as absolute instruction indexes; only the instructions
    :class:`Program` emits are named, anything else prints as raw fields.
    """
    out: list[str] = []
    slots = list(_INSN.iter_unpack(raw))
    for at, (code, regs, off, imm) in enumerate(slots):
        dst, src = regs & 0xF, regs >> 4
        cls, op = code & 0x07, code & 0xF0
        text = f"raw code={code:#04x} dst=r{dst} src=r{src} off={off} imm={imm}"
        if at > 0 and slots[at - 1][0] == LD | IMM | DW:
            text = "(second half of ld_imm64)"
        elif code == LD | IMM | DW:
            what = {PSEUDO_MAP_FD: "map_fd", PSEUDO_FUNC: "func"}.get(src, "imm64")
            value = at + 1 + imm if src == PSEUDO_FUNC else imm
            text = f"r{dst} = {what} {value}"
        elif cls == ALU64 and op in _ALU_SYM:
            text = f"r{dst} {_ALU_SYM[op]} {_operand(src, imm, code)}"
        elif cls == LDX and code & 0xE0 == MEM:
            text = f"r{dst} = {_mem(code, src, off)}"
        elif cls == STX and code & 0xE0 == MEM:
            text = f"{_mem(code, dst, off)} = r{src}"
        elif cls == ST and code & 0xE0 == MEM:
            text = f"{_mem(code, dst, off)} = {_imm(imm)}"
        elif code == JMP | JA:
            text = f"goto {at + 1 + off}"
        elif code == JMP | CALL:
            text = f"call pc {at + 1 + imm}" if src == PSEUDO_CALL else f"call helper {imm}"
        elif code == JMP | EXIT:
            text = "exit"
        elif cls == JMP and op in _JMP_SYM:
            text = f"if r{dst} {_JMP_SYM[op]} {_operand(src, imm, code)} goto {at + 1 + off}"
        out.append(f"{at:4d}: {code:02x} {regs:02x} {off & 0xFFFF:04x} {imm & 0xFFFFFFFF:08x}  {text}")
    return out
