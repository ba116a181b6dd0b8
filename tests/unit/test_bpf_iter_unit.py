"""bpf_iter pieces that need no kernel: program building, the per-boot layout cache."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from rebind.kernel import bpf_asm as asm
from rebind.kernel import bpf_iter as bi


def fake_layout() -> bi.Layout:
    offsets = {f"{s}.{m}": 8 * i for i, (s, m, _) in enumerate(bi._MEMBERS)}
    offsets["inode.i_mode"], offsets["inode.i_sb"], offsets["inode.i_ino"] = 0, 40, 64
    return bi.Layout({t: 100 + i for i, t in enumerate(bi._TARGETS)}, offsets)


MAPS = bi.Maps(wanted=11, files=12, bits=13, state=14, uids=15)


def test_fdtable_program_assembles_with_its_functions_in_order() -> None:
    insns, funcs = bi.build_fdtable_program(fake_layout(), MAPS)
    assert len(insns) % 8 == 0
    names = [f[0] for f in funcs]
    assert names == ["rebind_tasks", "rebind_chunk", "rebind_slot", "rebind_check"]
    starts = [f[1] for f in funcs]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(insns) // 8
    codes = [c for c, _, _, _ in struct.iter_unpack("<BBhi", insns)]
    # every function ends the program flow (exit or jump) right before the next begins
    for start in starts[1:]:
        assert codes[start - 1] in (asm.JMP | asm.EXIT, asm.JMP | asm.JA)
    # the map fds are the ones given (ld_imm64 with PSEUDO_MAP_FD)
    fds = {imm for c, regs, _, imm in struct.iter_unpack("<BBhi", insns) if c == 0x18 and regs >> 4 == 1}
    assert fds == {11, 12, 13, 14, 15}


def test_task_file_program_needs_no_functions() -> None:
    insns, funcs = bi.build_task_file_program(fake_layout(), MAPS)
    assert funcs == () and len(insns) > 0


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rebind" / "bpf-layout"
    monkeypatch.setattr(bi, "CACHE_PATH", str(path))
    return path


def test_layout_cache_round_trips(cache: Path) -> None:
    lay = fake_layout()
    bi._write_cache("boot-1 5000", lay)
    assert cache.exists() and not (cache.stat().st_mode & 0o022)
    assert bi._read_cache("boot-1 5000") == lay
    assert bi._read_cache("boot-2 5000") is None  # another boot
    assert bi._read_cache("boot-1 5001") is None  # another BTF


def test_layout_cache_refuses_what_it_should_not_trust(cache: Path) -> None:
    bi._write_cache("k", fake_layout())
    os.chmod(cache, 0o666)
    assert bi._read_cache("k") is None  # writable by others
    os.chmod(cache, 0o644)
    text = cache.read_text().splitlines()
    cache.write_text("\n".join(text[:-1]) + "\n")  # an offset missing
    assert bi._read_cache("k") is None
    cache.write_text("\n".join([*text, "offset extra.thing 1"]) + "\n")  # an unknown one
    assert bi._read_cache("k") is None
    cache.write_text("garbage\n")
    assert bi._read_cache("k") is None
