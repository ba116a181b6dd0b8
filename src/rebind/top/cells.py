"""The cells of `rebind top`'s table: one port's rows as rich ``Text`` (never markup), and the
width left for the owners column. Rich only: no Textual here."""

from __future__ import annotations

from rich.text import Text

from rebind.top.model import PortView, SocketRow, bar, fmt_left, left_now, row_owners_text

_SHORT = {
    "BOUND_INACTIVE": "BOUND",
    "ESTABLISHED": "ESTAB",
    "NEW_SYN_RECV": "SYN_RECV",
}
_STYLE = {
    "LISTEN": "bold green",
    "BOUND": "bold magenta",
    "TIME_WAIT": "yellow",
    "FIN_WAIT2": "yellow",
    "CLOSE_WAIT": "red",
    "UNCONN": "green",
}
_MARK_STYLE = {"✓": "bold green", "✗": "bold red", "✓ra": "yellow", "?": "yellow"}
COLUMNS = ("port", "bind", "state", "addr", "left", "queue", "owners")


def state_text(row: SocketRow) -> Text:
    label = _SHORT.get(row.state.name, row.state.label)
    t = Text(label, style=_STYLE.get(label, ""))
    if row.group > 1:
        t.append(f" rp{row.group}", style="cyan")  # SO_REUSEPORT group on this address
    if row.count > 1:
        t.append(f" ×{row.count}")
    return t


def row_cells(view: PortView, row: SocketRow | None, first: bool, now: float, snap_mono: float) -> list[Text]:
    """The cells of one table row (all Text: nothing here is parsed as markup)."""
    port = Text(str(view.key) if first else "")
    if first and view.localhost:
        port.append(f" {view.localhost}", style="yellow")  # issue 20: localhost split-brain
    mark = view.bindable.mark
    bind = Text(mark if first else "", style=_MARK_STYLE.get(mark, ""))
    if row is None:
        return [
            port,
            bind,
            Text("-", style="dim"),
            Text(""),
            Text(""),
            Text(""),
            Text("nothing on this port"),
        ]
    left = left_now(row.left_ms, row.sampled or snap_mono, now)
    return [
        port,
        bind,
        state_text(row),
        Text(row.addr),
        Text(fmt_left(left), style="yellow"),
        Text(bar(row.queue, row.backlog, width=6)),
        Text(row_owners_text(row)),
    ]


#: DataTable's default cell padding: one cell each side of every column.
CELL_PADDING = 1
#: Never squeeze the owners column below this (past it the table scrolls sideways instead).
MIN_OWNERS_WIDTH = 12


def owners_width(rows: list[list[Text]], total: int) -> int:
    """Cells left for the owners column (the last) once the other columns take what their
    widest cell or header needs, so owners are shortened with an ellipsis rather than cut off
    by the screen's edge (80 columns). One cell is kept for a vertical scrollbar."""
    used = 0
    for i, name in enumerate(COLUMNS[:-1]):
        widest = max([len(name), *(r[i].cell_len for r in rows)])
        used += widest + 2 * CELL_PADDING
    return max(MIN_OWNERS_WIDTH, total - used - 2 * CELL_PADDING - 1)
