"""Text output shared by the CLI and the TUI: a markup printer that is rich on a colour terminal
and plain text otherwise, markup escaping without importing rich, and the small cells (time
left, owners) that several renderers show. rich is imported only when a colour console prints."""

from __future__ import annotations

import os
import re
import sys
from typing import IO, Any

from rebind.model.records import Owner, owner_label
from rebind.textsafe import visible


def fmt_ms(ms: int | None) -> str:
    """A table cell: compact, empty for no timer."""
    from rebind.model.diagnosis import fmt_seconds

    return "" if ms is None else fmt_seconds(ms, compact=True)


def owners_cell(owners: tuple[Owner, ...], limit: int = 4) -> str:
    if not owners:
        return ""
    labels: list[str] = []
    for o in owners:
        lab = owner_label(o)
        if lab not in labels:
            labels.append(lab)
    extra = len(labels) - limit
    shown = ", ".join(labels[:limit])
    return f"{shown}, +{extra} more" if extra > 0 else shown


def use_color(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return stream.isatty()


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    color = use_color(stream)
    return Console(
        file=stream,
        # color_system=None: no escapes at all (no_color alone still writes bold/underline).
        color_system="auto" if color else None,
        no_color=not color,
        highlight=False,
        emoji=False,  # ":fire:" in a process name stays text
        force_terminal=color if color else None,
        soft_wrap=False,
        width=None if stream.isatty() else 200,
    )


# rich's markup grammar (rich.markup.RE_TAGS and escape()), so that plain and rich output read
# the same markup the same way without importing rich: "[::]:80" and "python3[12]" are no tags.
_RICH_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
_RICH_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def escape_markup(text: str) -> str:
    """``text`` shown as itself by rich markup: rich.markup.escape, without importing rich."""
    out = _RICH_ESCAPE.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", text)
    return out + "\\" if out.endswith("\\") and not out.endswith("\\\\") else out


def strip_markup(markup: str) -> str:
    """The text rich would print for ``markup``, without styles (tags dropped, escapes undone)."""
    parts: list[str] = []
    pos = 0
    for m in _RICH_TAG.finditer(markup):
        full, escapes, _ = m.groups()
        parts.append(markup[pos : m.start()])
        pos = m.end()
        backslashes, escaped = divmod(len(escapes), 2)
        parts.append("\\" * backslashes)
        if escaped:
            parts.append(full[len(escapes) :])
    parts.append(markup[pos:])
    return "".join(parts)


class PlainOut:
    """Markup-stripping printer for pipes and NO_COLOR: no rich import, no escapes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def esc(self, text: str) -> str:
        """Text from outside (process names, messages) made safe to embed in markup."""
        return escape_markup(visible(text))

    def print(self, text: str = "", *, nowrap: bool = False) -> None:
        self.stream.write(strip_markup(text) + "\n")  # never wrapped


class RichOut:
    def __init__(self, stderr: bool) -> None:
        self.con = console(stderr)

    def esc(self, text: str) -> str:
        """Text from outside (process names, messages) made safe to embed in markup."""
        return escape_markup(visible(text))

    def print(self, text: str = "", *, nowrap: bool = False) -> None:
        """``nowrap``: one line whatever the terminal's width (a command split over two lines is
        not pasteable); the terminal folds it for display, the copied text stays whole."""
        self.con.print(text, soft_wrap=nowrap)


def out(stderr: bool = False) -> PlainOut | RichOut:
    """A printer for rich-style markup: rich on a colour terminal, plain text otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    return RichOut(stderr) if use_color(stream) else PlainOut(stream)
