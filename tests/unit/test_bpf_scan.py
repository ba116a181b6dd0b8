"""The BPF scan's pieces that need no kernel: the per-boot layout cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rebind.kernel.bpf import scan as bi
from tests.unit.test_bpf_programs import fake_layout


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
