"""The BPF scan's pieces that need no kernel: the per-boot layout cache (kernel/bpf/layoutcache.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rebind.kernel.bpf import scan
from rebind.kernel.bpf.layoutcache import LayoutCache
from rebind.kernel.bpf.programs import Layout
from tests.unit.test_bpf_programs import fake_layout


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rebind" / "bpf-layout"
    c = scan.LAYOUT_CACHE
    fresh = LayoutCache(str(path), c.magic, build=c.build, encode=c.encode, decode=c.decode)
    monkeypatch.setattr(scan, "LAYOUT_CACHE", fresh)
    return path


def test_layout_cache_round_trips(cache: Path) -> None:
    lay = fake_layout()
    scan.LAYOUT_CACHE.write("boot-1 5000", lay)
    assert cache.exists() and not (cache.stat().st_mode & 0o022)
    assert scan.LAYOUT_CACHE.read("boot-1 5000") == lay
    assert scan.LAYOUT_CACHE.read("boot-2 5000") is None  # another boot
    assert scan.LAYOUT_CACHE.read("boot-1 5001") is None  # another BTF


def test_layout_cache_refuses_what_it_should_not_trust(cache: Path) -> None:
    scan.LAYOUT_CACHE.write("k", fake_layout())
    os.chmod(cache, 0o666)
    assert scan.LAYOUT_CACHE.read("k") is None  # writable by others
    os.chmod(cache, 0o644)
    text = cache.read_text().splitlines()
    cache.write_text("\n".join(text[:-1]) + "\n")  # an offset missing
    assert scan.LAYOUT_CACHE.read("k") is None
    cache.write_text("\n".join([*text, "offset extra.thing 1"]) + "\n")  # an unknown one
    assert scan.LAYOUT_CACHE.read("k") is None
    cache.write_text("garbage\n")
    assert scan.LAYOUT_CACHE.read("k") is None


def test_the_cache_file_is_not_followed_through_a_link(cache: Path, tmp_path: Path) -> None:
    scan.LAYOUT_CACHE.write("k", fake_layout())
    real = tmp_path / "elsewhere"
    cache.rename(real)
    cache.symlink_to(real)
    assert scan.LAYOUT_CACHE.read("k") is None  # O_NOFOLLOW: a link planted at the name is not read
    os.unlink(cache)
    stale = Path(f"{cache}.{os.getpid()}")
    stale.symlink_to(tmp_path / "target")
    scan.LAYOUT_CACHE.write("k", fake_layout())  # O_EXCL|O_NOFOLLOW: never written through the link
    assert not (tmp_path / "target").exists()


def test_the_layout_is_read_once_per_process_and_once_per_boot(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rebind.kernel.bpf import layoutcache

    builds: list[bytes] = []

    def build(data: bytes) -> Layout:
        builds.append(data)
        return fake_layout()

    c = scan.LAYOUT_CACHE
    monkeypatch.setattr(layoutcache, "cache_key", lambda: "boot-1 5000")
    monkeypatch.setattr(layoutcache, "read_vmlinux_btf", lambda: b"btf")
    first = LayoutCache(c.path, c.magic, build=build, encode=c.encode, decode=c.decode)
    assert first.load() == fake_layout() and first.load() == fake_layout()
    assert builds == [b"btf"] and cache.exists()  # remembered in the process, written to /run
    second = LayoutCache(c.path, c.magic, build=build, encode=c.encode, decode=c.decode)
    assert second.load() == fake_layout() and builds == [b"btf"]  # another process: the file
