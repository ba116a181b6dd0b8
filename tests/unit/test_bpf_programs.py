"""The BPF program, without a kernel: saved disassembly, named stack frames, structure.

tests/data/bpf/fdtable.txt is the disassembly of the program for a fixed layout and fixed map
fds. A change to the program shows up there line by line; when it is intended, review the diff
and regenerate with:

    REBIND_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/unit/test_bpf_programs.py
"""

from __future__ import annotations

import os
import struct
from itertools import combinations
from pathlib import Path

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import programs as P

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "bpf"
MAPS = P.Maps(wanted=11, files=12, bits=13, state=14, uids=15, records=16)


#: A fixed layout (the offsets of x86_64 Linux 6.18), so that the saved disassembly depends on
#: the program only.
FAKE_OFFSETS = {
    "bpf_iter__task.task": 8,
    "cred.euid": 24,
    "fdtable.fd": 8,
    "fdtable.max_fds": 0,
    "file.f_inode": 32,
    "files_struct.fdt": 32,
    "inode.i_ino": 64,
    "inode.i_mode": 0,
    "inode.i_sb": 40,
    "net.ns.inum": 176,
    "nsproxy.net_ns": 40,
    "super_block.s_magic": 96,
    "task_struct.cred": 1736,
    "task_struct.files": 1824,
    "task_struct.group_leader": 1328,
    "task_struct.nsproxy": 1840,
    "task_struct.pid": 1264,
    "task_struct.start_boottime": 1560,
    "task_struct.tgid": 1268,
}


def fake_layout() -> P.Layout:
    return P.Layout({"bpf_iter_task": 100}, dict(FAKE_OFFSETS))


def test_the_fixed_layout_names_every_member_the_program_reads() -> None:
    assert set(FAKE_OFFSETS) == {f"{s}.{m}" for s, m, _ in P.MEMBERS}
    assert set(fake_layout().attach) == set(P.TARGETS)


def _listing(insns: bytes, funcs: tuple[tuple[str, int, int], ...]) -> str:
    starts = {at: name for name, at, _ in funcs}
    lines = []
    for n, line in enumerate(asm.disassemble(insns)):
        if n in starts:
            lines.append(f"{starts[n]}:")
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_program_matches_its_saved_disassembly() -> None:
    insns, funcs = P.build_fdtable_program(fake_layout(), MAPS)
    got = _listing(insns, funcs)
    path = GOLDEN / "fdtable.txt"
    if os.environ.get("REBIND_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert got == path.read_text(), "the program changed: see the diff, then regenerate (module doc)"


def test_fdtable_program_has_its_functions_in_order() -> None:
    insns, funcs = P.build_fdtable_program(fake_layout(), MAPS)
    assert [f[0] for f in funcs] == ["rebind_tasks", "rebind_chunk", "rebind_slot", "rebind_check"]
    starts = [f[1] for f in funcs]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(insns) // 8
    codes = [c for c, _, _, _ in struct.iter_unpack("<BBhi", insns)]
    # every function ends the program flow (exit or jump) right before the next begins
    for start in starts[1:]:
        assert codes[start - 1] in (asm.JMP | asm.EXIT, asm.JMP | asm.JA)
    # the map fds are the ones given (ld_imm64 with PSEUDO_MAP_FD)
    fds = {imm for c, regs, _, imm in struct.iter_unpack("<BBhi", insns) if c == 0x18 and regs >> 4 == 1}
    assert fds == {11, 12, 13, 14, 15, 16}


def test_stack_slots_fit_their_frame_and_overlap_only_where_declared() -> None:
    by_frame: dict[str, list[tuple[str, int, int]]] = {}
    for frame, name, off, size in P.FRAME_SLOTS:
        assert off >= -512 and off + size <= 0, (frame, name)  # MAX_BPF_STACK
        by_frame.setdefault(frame, []).append((name, off, size))
    for frame, slots in by_frame.items():
        for (a, a_off, a_size), (b, b_off, b_size) in combinations(slots, 2):
            if a_off < b_off + b_size and b_off < a_off + a_size:
                assert (frame, a, b) in P.SHARED_SLOTS or (frame, b, a) in P.SHARED_SLOTS, (frame, a, b)


def test_the_inode_buffer_sits_right_below_the_scratch_slot() -> None:
    lay = fake_layout()
    assert P.inode_span(lay) == 72  # i_ino at 64, 8 bytes
    assert P.inode_buf(lay) + P.inode_span(lay) == P.CheckFrame.SCRATCH
    assert P.inode_buf(lay) >= -512


def test_every_stack_access_of_the_programs_is_a_named_slot() -> None:
    """No magic offsets: each fp-relative access falls inside a slot of FRAME_SLOTS (or the inode buffer)."""
    lay = fake_layout()
    named = [(off, off + size) for _, _, off, size in P.FRAME_SLOTS]
    named.append((P.inode_buf(lay), P.CheckFrame.SCRATCH))
    insns, _ = P.build_fdtable_program(lay, MAPS)
    fp_copy = -1  # the register just set to fp, if the previous instruction did that
    for code, regs, off, imm in struct.iter_unpack("<BBhi", insns):
        cls, dst = code & 0x07, regs & 0xF
        base = regs >> 4 if cls == asm.LDX else regs & 0xF
        if cls in (asm.LDX, asm.STX, asm.ST) and base == asm.FP:
            size = {asm.B: 1, asm.H: 2, asm.W: 4, asm.DW: 8}[code & 0x18]
            assert any(lo <= off and off + size <= hi for lo, hi in named), (hex(code), off)
        if code == asm.ALU64 | asm.ADD | asm.K and dst == fp_copy:
            assert any(lo <= imm < hi for lo, hi in named), imm  # r = fp + slot: a pointer to it
        fp_copy = dst if code == asm.ALU64 | asm.MOV | asm.X and regs >> 4 == asm.FP else -1
