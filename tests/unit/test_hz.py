"""kernel/hz.py: HZ without measuring, cheapest source first."""

from __future__ import annotations

import pytest

from rebind.kernel import hz


def test_config_line() -> None:
    cfg = b"# comment\nCONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_HZ_PERIODIC=n\n"
    assert hz.parse_config_hz(cfg) == 250
    assert hz.parse_config_hz(b"CONFIG_HZ=123\n") is None  # not a value Kconfig.hz offers
    assert hz.parse_config_hz(b"# CONFIG_HZ is not set\n") is None


def test_sources_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[str, int]] = []
    monkeypatch.setattr(hz, "_MEMO", {})
    monkeypatch.setattr(hz, "cache_key", lambda: "boot-1 123")
    monkeypatch.setattr(hz._CACHE, "read", lambda key: None)
    monkeypatch.setattr(hz._CACHE, "write", lambda key, value: writes.append((key, value)))
    monkeypatch.setattr(hz, "config_hz", lambda: 1000)
    assert hz.known_hz() == 1000
    monkeypatch.setattr(hz, "config_hz", lambda: None)
    assert hz.known_hz() == 1000  # kept for the process
    monkeypatch.setattr(hz, "_MEMO", {})
    assert hz.known_hz() is None
    monkeypatch.setattr(hz._CACHE, "read", lambda key: 300)
    assert hz.known_hz() == 300  # the boot's cache before the configuration
    monkeypatch.setattr(hz, "_MEMO", {})
    hz.remember(250)
    assert writes == [("boot-1 123", 250)] and hz.known_hz() == 250
    hz.remember(None)  # an ambiguous measurement: kept here, not for the boot
    assert hz._MEMO == {"hz": None} and len(writes) == 1 and hz.known_hz() is None


def test_the_cache_file_decodes_standard_values_only() -> None:
    assert hz._decode(["250"]) == 250
    assert hz._decode(["251"]) is None and hz._decode([]) is None and hz._decode(["x"]) is None
