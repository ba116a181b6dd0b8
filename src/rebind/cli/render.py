"""Rendering: stable JSON for scripts (docs/json.md), rich tables for terminals.

rich is imported only when a table is printed, so `--json` and scripted use stay light.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from rebind.model.birth import text as birth_text
from rebind.model.birth import to_json as birth_json
from rebind.model.containers import ContainerRef
from rebind.model.records import (
    Endpoint,
    Owner,
    OwnerScanReport,
    SocketEntry,
    SocketRecord,
    SocketTable,
    fmt_addr,
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
from rebind.textsafe import visible

if TYPE_CHECKING:
    from rebind.model.localhost import SplitBrain

LS_SCHEMA = "rebind.ls/1"


def endpoint_json(ep: Endpoint) -> dict[str, Any]:
    return {"addr": fmt_addr(ep.addr), "port": ep.port}


def owner_json(o: Owner) -> dict[str, Any]:
    return {
        "pid": o.pid,
        "fd": o.fd,
        "name": o.name,
        "cmdline": list(o.cmdline),
        "user": o.user,
        "uid": o.uid,
        "ppid": o.ppid,
        "start_time": o.start_time,
        "container": container_json(o.container),
        "unit": o.unit,
        "proxy": o.proxy.value if o.proxy else None,
    }


def container_json(c: ContainerRef | None) -> dict[str, Any] | None:
    return None if c is None else {"engine": c.engine.value, "id": c.id, "name": c.name, "user": c.user}


def socket_json(r: SocketRecord) -> dict[str, Any]:
    return {
        "proto": r.proto.value,
        "family": r.family.label,
        "state": r.state.label,
        "local": endpoint_json(r.local),
        "remote": endpoint_json(r.remote),
        "expires_ms": r.expires_ms,
        "timer": r.timer.name.lower(),
        "uid": r.uid,
        "inode": r.inode,
        "cookie": r.cookie,
        "ifindex": r.ifindex,
        "v6only": r.v6only,
        "cgroup_id": r.cgroup_id,
        "netns": r.netns,
        # issue 19 (additive): who bound it, when (rebind trace --install; null otherwise)
        "birth": birth_json(r.birth),
    }


def entry_json(e: SocketEntry, *, with_owners: bool = True) -> dict[str, Any]:
    d = socket_json(e.socket)
    d["netns_name"] = e.netns_name
    d["owners"] = [owner_json(o) for o in e.owners] if with_owners else None
    return d


def scan_json(s: OwnerScanReport) -> dict[str, int]:
    return {
        "scanned": s.scanned,
        "inaccessible": s.inaccessible,
        "vanished": s.vanished,
        "other_netns": s.other_netns,
    }


def table_json(t: SocketTable, localhost: Mapping[int, SplitBrain] | None = None) -> dict[str, Any]:
    from rebind.render.findings import finding_json

    return {
        "schema": LS_SCHEMA,
        "source": t.source,
        "sockets": [entry_json(e, with_owners=t.owners_scanned) for e in t.entries],
        "owner_scan": scan_json(t.scan) if t.owners_scanned else None,
        "warnings": list(t.warnings),
        # issue 20 (additive): TCP ports whose localhost reaches different servers, or one family
        "localhost": [finding_json(f) for _, f in sorted((localhost or {}).items())],
    }


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
        head.append("bound by")
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
            row.append(birth_text(r.birth, now) if r.birth is not None else "")
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
