"""Rendering: stable JSON for scripts (docs/json.md), rich tables for terminals.

rich is imported only when a table is printed, so `--json` and scripted use stay light.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from rebind.model.birth import phrase as birth_phrase
from rebind.model.records import (
    SocketTable,
)
from rebind.render.console import PlainOut as PlainOut
from rebind.render.console import RichOut as RichOut
from rebind.render.console import console as console
from rebind.render.console import escape_markup as escape_markup
from rebind.render.console import fmt_ms as fmt_ms
from rebind.render.console import out as out
from rebind.render.console import owners_cell as owners_cell
from rebind.render.console import strip_markup as strip_markup
from rebind.render.console import use_color as use_color
from rebind.render.sockets import LS_SCHEMA as LS_SCHEMA
from rebind.render.sockets import entry_json as entry_json
from rebind.render.sockets import socket_json as socket_json
from rebind.render.sockets import table_json as table_json
from rebind.textsafe import visible

if TYPE_CHECKING:
    from rebind.model.localhost import SplitBrain


def dump_json(doc: Any, out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    json.dump(doc, out, indent=2)
    out.write("\n")


_STATE_STYLE = {
    "LISTEN": "bold green",
    "BOUND_INACTIVE": "bold magenta",
    "TIME_WAIT": "yellow",
    "FIN_WAIT2": "yellow",
    "CLOSE_WAIT": "red",
    "UNCONN": "green",
}


def localhost_marks(found: Mapping[int, SplitBrain]) -> dict[tuple[int, str], str]:
    """(port, local endpoint) -> the mark `ls` shows on that listener's row: every listener of a
    split port; a one-family port only when its listener is bound to the loopback address itself
    (a dev server on localhost, not sshd on 0.0.0.0) and some client is refused through the name
    localhost (model.localhost.loopback_only)."""
    from rebind.model.localhost import loopback_only

    marks: dict[tuple[int, str], str] = {}
    for port, f in found.items():
        if not loopback_only(f):
            continue
        for side in (f.v4, f.v6):
            for e in side.listeners:
                marks[(port, str(e.socket.local))] = f.kind.marker
    return marks


def _rows(
    t: SocketTable, marks: Mapping[tuple[int, str], str] | None = None
) -> tuple[list[str], list[list[str]]]:
    many_ns = len({e.socket.netns for e in t.entries}) > 1
    births = any(e.socket.birth is not None for e in t.entries)
    now = time.time()
    marks = marks or {}
    head = ["proto", "state", "local", "remote", "left", "uid"] + (["owners"] if t.owners_scanned else [])
    if births:
        head.append("birth")
    if marks:
        head.append("note")
    if many_ns:
        head.insert(0, "netns")
    rows = []
    for e in t.entries:
        r = e.socket
        remote = "" if r.remote.port == 0 and r.remote.addr.is_unspecified else str(r.remote)
        row = [] if not many_ns else [visible(e.netns_name) if e.netns_name else f"net:{r.netns}"]
        row += [
            r.proto.value + ("6" if r.family.label == "ipv6" else ""),
            r.state.label,
            str(r.local),
            remote or "*",
            fmt_ms(r.expires_ms) if r.is_mini else "",
            "" if r.uid is None else str(r.uid),
        ]
        if t.owners_scanned:
            row.append(owners_cell(e.owners) or ("-" if r.is_mini else ""))
        if births:
            row.append(birth_phrase(r.birth, now) if r.birth is not None else "")
        if marks:
            listening = r.state.label == "LISTEN" and r.proto.value == "tcp"
            row.append(marks.get((r.port, str(r.local)), "") if listening else "")
        rows.append(row)
    return head, rows


def print_table(t: SocketTable, marks: Mapping[tuple[int, str], str] | None = None) -> None:
    head, rows = _rows(t, marks)
    if not rows:
        for w in t.warnings:
            sys.stderr.write(f"note: {visible(w)}\n")
        return  # nothing matched: exit status 1 says so; no bare header for scripts to skip
    if not use_color():
        # Piped or NO_COLOR: plain aligned columns, without importing rich (start-up time matters).
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
        for row in [head, *rows]:
            cells = [
                c.rjust(w) if head[i] in ("left", "uid") else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            sys.stdout.write("  ".join(cells).rstrip() + "\n")
        for w in t.warnings:
            sys.stderr.write(f"note: {visible(w)}\n")
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in head:
        tab.add_column(col, no_wrap=col != "owners", justify="right" if col in ("left", "uid") else "left")
    for row in rows:
        # Text cells, never markup: an owner named "[/x]" is a name, not a closing tag.
        texts = [Text(c) for c in row]
        state = head.index("state")
        texts[state].stylize(_STATE_STYLE.get(row[state], ""))
        tab.add_row(*texts)
    console().print(tab)
    err = console(stderr=True)
    for w in t.warnings:
        err.print(Text.assemble(("note:", "yellow"), " ", visible(w)))
