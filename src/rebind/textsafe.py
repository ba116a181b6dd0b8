"""Text that another process controls (process names, command lines, user names, unit and
container names) is hostile: it may carry terminal escapes (``\\x1b[2J`` clears root's screen,
``\\x1b]0;…\\x07`` retitles it) or rich markup (``[/x]`` raises MarkupError). Everything printed
from such a source goes through :func:`visible` (plain output) or :func:`markup` (rich output).

Pure and cheap: no rich import unless :func:`markup` is called.
"""

from __future__ import annotations

import unicodedata

#: Unicode categories shown as escapes, never sent raw:
#: Cc: C0/C1 controls and DEL (tab and newline too: one record must stay on one line);
#: Cf: invisible format characters: every bidirectional control (overrides and isolates, the
#: "Trojan Source" reordering of CVE-2021-42574, and the marks U+200E LRM, U+200F RLM, U+061C
#: ALM), zero-width space/joiners, soft hyphen, BOM, tag characters. A legitimate name with a
#: zero-width joiner (some scripts and emoji sequences use one) shows it as ``\\u200d``: better
#: visible than able to hide or reorder text;
#: Zl, Zp: line and paragraph separators (a terminal or pager may break the line there);
#: Cs: lone surrogates left by ``os.fsdecode`` of non-UTF-8 bytes (they cannot be encoded).
#: Unassigned code points (Cn) stay raw: a newer terminal may know them as ordinary characters.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every control and invisible format character shown as an escape
    (``\\x1b``, ``\\u200f``), never sent raw.

    The result always encodes as UTF-8 (printing it cannot raise UnicodeEncodeError).
    """
    # Fast path: str.isprintable() is False for every category escaped here (and for a few
    # harmless ones, e.g. no-break space, which the slow path keeps).
    if text.isprintable():
        return text
    category = unicodedata.category
    return "".join(_escape_char(c) if category(c) in UNSAFE_CATEGORIES else c for c in text)


def markup(text: str) -> str:
    """:func:`visible`, then escaped for rich markup, so ``[/x]`` prints as itself."""
    from rich.markup import escape

    return escape(visible(text))
