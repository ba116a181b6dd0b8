"""The calibration cache: per kernel build, written atomically, never trusted when tampered with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rebind.kernel import calibrate
from rebind.kernel.calibrate import Calibration, build_key, read_cached, write_cached

KEY = "6.18.44-test-0123456789abcdef"


def test_round_trip_and_one_file_per_build(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    assert write_cached(KEY, Calibration(udp_first_match=False), d)
    assert read_cached(KEY, d) == Calibration(udp_first_match=False)
    assert read_cached("6.18.44-other-fedcba9876543210", d) is None  # another build
    assert write_cached(KEY, Calibration(udp_first_match=True), d)  # replaced by rename
    assert read_cached(KEY, d) == Calibration(udp_first_match=True)
    assert [p.name for p in Path(d).iterdir()] == [f"calibration-{KEY}.json"]  # no temp left
    assert not write_cached(KEY, Calibration(), d)  # nothing known: nothing written


def test_build_key_names_release_and_version(tmp_path: Path) -> None:
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "osrelease").write_text("6.18.44/../x\n")
    (tmp_path / "version").write_text("Linux version 6.18.44 (builder@a) #1\n")
    a = build_key(str(tmp_path))
    (tmp_path / "version").write_text("Linux version 6.18.44 (builder@b) #1\n")
    b = build_key(str(tmp_path))
    assert a.startswith("6.18.44_.._x-") and a != b and "/" not in a
    # the key's digest is sha256 (cache files written before keep their names), without hashlib
    import hashlib

    assert b.endswith("-" + hashlib.sha256(b"Linux version 6.18.44 (builder@b) #1\n").hexdigest()[:16])


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"format": 1, "build": KEY, "udp_first_match": "yes"}).encode(),
        json.dumps({"format": 1, "build": "other", "udp_first_match": True}).encode(),
        json.dumps({"format": 99, "build": KEY, "udp_first_match": True}).encode(),
        json.dumps({"format": 1, "build": KEY, "udp_first_match": True, "x": 1}).encode(),
        b" " * 5000,
    ],
)
def test_malformed_files_are_ignored(tmp_path: Path, body: bytes) -> None:
    (tmp_path / f"calibration-{KEY}.json").write_bytes(body)
    assert read_cached(KEY, str(tmp_path)) is None


def test_symlinks_and_writable_files_are_not_trusted(tmp_path: Path) -> None:
    good = tmp_path / "elsewhere.json"
    good.write_text(json.dumps({"format": 1, "build": KEY, "udp_first_match": True}))
    link = tmp_path / f"calibration-{KEY}.json"
    link.symlink_to(good)
    assert read_cached(KEY, str(tmp_path)) is None  # O_NOFOLLOW
    link.unlink()
    good.rename(link)
    assert read_cached(KEY, str(tmp_path)) == Calibration(udp_first_match=True)
    os.chmod(link, 0o666)
    assert read_cached(KEY, str(tmp_path)) is None  # anyone could have written it
    os.chmod(link, 0o644)
    os.chmod(tmp_path, 0o777)
    assert read_cached(KEY, str(tmp_path)) is None  # anyone could have replaced it
    os.chmod(tmp_path, 0o755)
    dir_link = tmp_path.parent / f"{tmp_path.name}-link"
    dir_link.symlink_to(tmp_path)
    assert read_cached(KEY, str(dir_link)) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_files_of_another_user_are_not_trusted(tmp_path: Path) -> None:
    f = tmp_path / f"calibration-{KEY}.json"
    f.write_text(json.dumps({"format": 1, "build": KEY, "udp_first_match": True}))
    os.chown(f, 65534, 65534)
    assert read_cached(KEY, str(tmp_path)) is None
    os.chown(f, 0, 0)
    os.chown(tmp_path, 65534, 65534)
    assert read_cached(KEY, str(tmp_path)) is None


def test_a_planted_temp_name_does_not_redirect_the_write(tmp_path: Path) -> None:
    """O_EXCL|O_NOFOLLOW: a symlink at the temp name makes the write fail, not follow it."""
    import threading

    target = tmp_path / "victim"
    target.write_text("keep")
    tmp = tmp_path / f".calibration-{KEY}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.symlink_to(target)
    assert not write_cached(KEY, Calibration(udp_first_match=True), str(tmp_path))
    assert target.read_text() == "keep"


def test_no_namespace_means_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(calibrate, "_memo", {})
    monkeypatch.setattr(calibrate, "run_experiments", lambda: None)
    assert calibrate.calibration(directory=str(tmp_path)) == Calibration()
    assert not list(tmp_path.iterdir())
