"""Text that another process controls (process names, command lines, user names, unit and
container names) is hostile: it may carry terminal escapes (``\\x1b[2J`` clears root's screen,
``\\x1b]0;…\\x07`` retitles it) or rich markup (``[/x]`` raises MarkupError). Everything printed
from such a source goes through :func:`visible` (plain output) or :func:`markup` (rich output).

Pure and cheap: no rich import unless :func:`markup` is called.
"""

from __future__ import annotations

import re

# C0 controls except none (tab and newline too: one record must stay on one line), DEL, C1
# controls, and the bidirectional overrides/isolates that reorder what a terminal shows
# ("Trojan Source", CVE-2021-42574), plus line/paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group(0)
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), never sent raw.

    Surrogates left by ``os.fsdecode`` of non-UTF-8 bytes are shown as ``\\udcXX`` so the result
    always encodes as UTF-8 (printing it cannot raise UnicodeEncodeError).
    """
    out = _UNSAFE.sub(_escape_char, text)
    if any("\ud800" <= c <= "\udfff" for c in out):
        out = "".join(f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in out)
    return out


def markup(text: str) -> str:
    """:func:`visible`, then escaped for rich markup, so ``[/x]`` prints as itself."""
    from rich.markup import escape

    return escape(visible(text))
