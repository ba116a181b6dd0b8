"""Shared validation and hostile-text escaping (no root)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebind.errors import UsageError
from rebind.model.validate import MAX_SECONDS, parse_port, parse_seconds
from rebind.textsafe import markup, visible


@pytest.mark.parametrize(
    "value", ["²", "1²", "٣", "", "-1", "0", "65536", "70000", True, 70000, "8080a", " "]
)
def test_bad_ports_are_usage_errors(value: object) -> None:
    with pytest.raises(UsageError):
        parse_port(value)


@pytest.mark.parametrize(("value", "port"), [("8080", 8080), (" 1 ", 1), (65535, 65535)])
def test_good_ports(value: object, port: int) -> None:
    assert parse_port(value) == port


def test_port_zero_when_allowed() -> None:
    assert parse_port("0", allow_zero=True) == 0


@pytest.mark.parametrize(
    "value", ["inf", "nan", float("inf"), float("nan"), "-1", MAX_SECONDS * 2, "x", None]
)
def test_bad_seconds_are_usage_errors(value: object) -> None:
    with pytest.raises(UsageError):
        parse_seconds(value)


def test_good_seconds() -> None:
    assert parse_seconds("2.5") == 2.5
    assert parse_seconds(MAX_SECONDS) == MAX_SECONDS


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J\x1b]0;PWN\x07", "\\x1b[2J\\x1b]0;PWN\\x07"),
        ("a\nb\tc", "a\\x0ab\\x09c"),
        ("\u202eevil", "\\u202eevil"),
        ("\x9b31m", "\\x9b31m"),
        ("nginx: worker", "nginx: worker"),
        ("bad\udcffbyte", "bad\\udcffbyte"),
        # Bidi marks (audit 2026-12-05 L5): they reorder what a terminal shows, like overrides.
        ("a\u200eb", "a\\u200eb"),
        ("\u200fevil", "\\u200fevil"),
        ("\u061c1", "\\u061c1"),
        # Other invisible format characters (Cf): zero-width space/joiner, BOM, soft hyphen, tags.
        ("a\u200bb\u200dc\ufeff", "a\\u200bb\\u200dc\\ufeff"),
        ("soft\xadhyphen", "soft\\xadhyphen"),
        ("flag\U000e0067", "flag\\U000e0067"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        # Visible non-ASCII text stays as it is.
        ("caf\u00e9 \u65e5\u672c \u00a0", "caf\u00e9 \u65e5\u672c \u00a0"),
    ],
)
def test_visible(raw: str, shown: str) -> None:
    assert visible(raw) == shown


def test_markup_escapes_rich_tags() -> None:
    from rich.text import Text

    assert Text.from_markup(markup("[/x]")).plain == "[/x]"
    assert Text.from_markup(markup("[bold]x\x1b")).plain == "[bold]x\\x1b"


@given(st.text())
def test_visible_output_has_no_controls_and_encodes(s: str) -> None:
    out = visible(s)
    out.encode("utf-8")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    # No control, format (bidi marks, zero-width), separator or surrogate character survives.
    assert not any(unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs"} for c in out)


@given(st.text(alphabet=st.characters(categories=["Cf", "Cc"])))
def test_every_format_and_control_character_is_escaped(s: str) -> None:
    out = visible(s)
    assert out.isascii()
    assert out == "".join(
        f"\\x{ord(c):02x}"
        if ord(c) <= 0xFF
        else f"\\u{ord(c):04x}"
        if ord(c) <= 0xFFFF
        else f"\\U{ord(c):08x}"
        for c in s
    )
