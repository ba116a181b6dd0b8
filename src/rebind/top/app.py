"""The Textual application behind `rebind top` (imported only by that command: Textual's import
cost never reaches `rebind ls` or `rebind --version`).

Every process-supplied string reaches the screen as a rich ``Text`` built from
:func:`rebind.textsafe.visible` output, never as markup: a process named ``[red]x`` or
``\\x1b]0;pwned\\x07`` shows as those characters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Input, RichLog, Static

from rebind.textsafe import visible
from rebind.top import keys
from rebind.top.cells import COLUMNS, owners_width, row_cells
from rebind.top.events import Event, EventKind, describe, diff
from rebind.top.model import PortKey, PortView, Snapshot, SocketRow, cut, filter_ports, row_owners_text
from rebind.top.record import Recorder, RecordStopped
from rebind.top.sampler import Sampler
from rebind.top.screens import TextScreen


class TopApp(App[int]):
    TITLE = "rebind top"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("w", "why", "why"),
        Binding("f", "free", "free"),
        Binding("W", "wait", "wait"),
        Binding("r", "reload", "reload"),
        Binding("slash", "filter", "filter"),
        Binding("q", "quit_top", "quit"),
        Binding("ctrl+c", "quit_top", "quit", show=False, priority=True),
        Binding("escape", "clear_filter", "clear filter", show=False),
    ]
    DEFAULT_CSS = """
    #status { height: 1; background: $boost; }
    #ports { height: 1fr; }
    #events-title { height: 1; text-style: bold; }
    #events { height: 5; }
    #filter { display: none; height: 3; }
    #filter.shown { display: block; }
    """

    def __init__(self, sampler: Sampler, interval: float, recorder: Recorder | None = None) -> None:
        super().__init__()
        self.sampler = sampler
        self.interval = interval
        self.recorder = recorder
        self.snapshot: Snapshot | None = None
        self.prev: dict[PortKey, PortView] | None = None
        self.query_text = ""
        self.selected: PortKey | None = None
        self.row_keys: list[PortKey] = []
        self.stop = threading.Event()
        self.error = ""
        self.refreshes = 0

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(Text("rebind top: reading the socket table…"), id="status")
        table: DataTable[Text] = DataTable(id="ports", cursor_type="row", zebra_stripes=False)
        yield table
        yield Static(Text("Events"), id="events-title")
        yield RichLog(id="events", max_lines=500, wrap=False, markup=False)
        yield Input(
            placeholder="filter: port, state, process, user… (Enter to apply, Esc to clear)", id="filter"
        )
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#ports", DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        threading.Thread(target=self._sample_loop, name="rebind-top-sampler", daemon=True).start()
        table.focus()

    # -- sampling (a thread: kernel reads never block the keys) ---------------------------------

    def _sample_loop(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                snap = self.sampler.sample()
                err = ""
            except Exception as exc:  # shown in the status line; the next refresh tries again
                snap, err = None, f"refresh failed: {exc}"
            try:
                self.call_from_thread(self.show, snap, err)
            except RuntimeError:
                return  # the app is gone
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # slower than the interval: start the next one now, do not pile up
                next_at, delay = time.monotonic(), 0.0
            if self.stop.wait(delay):
                return

    def show(self, snap: Snapshot | None, err: str) -> None:
        self.error = err
        if snap is not None:
            self.refreshes += 1
            cur = snap.by_key()
            events = diff(self.prev, cur, snap.taken_at)
            before = {k: v.localhost for k, v in (self.prev or {}).items()}
            new_split = [v for k, v in cur.items() if v.localhost and v.localhost != before.get(k)]
            self.prev = cur
            self.snapshot = snap
            self._log_events(events)
            self._log_localhost(new_split)
        self.render_table()
        self.render_status()

    def _log_events(self, events: list[Event]) -> None:
        if self.recorder is not None and events:
            try:
                self.recorder.write(events)
            except OSError as exc:
                self.error = f"--record: {exc.strerror}; recording stopped"
                self.recorder.close()
                self.recorder = None
            except RecordStopped as exc:
                self.error = visible(f"--record: {exc}; recording stopped")
                self.recorder.close()
                self.recorder = None
        log = self.query_one("#events", RichLog)
        initial = [e for e in events if e.initial]
        if initial:
            held = sum(1 for e in initial if e.kind is EventKind.APPEARED)
            log.write(Text(f"{describe(initial[0], with_date=False)[:8]}  {held} port(s) held at start"))
        for e in events:
            if not e.initial:
                log.write(Text(describe(e, with_date=False)))

    def _log_localhost(self, views: list[PortView]) -> None:
        """Issue 20: an event line when a port's localhost becomes split (or one-family)."""
        log = self.query_one("#events", RichLog)
        for v in views:
            log.write(Text(f"{v.key}: {v.localhost} (127.0.0.1 and ::1 differ; press w for why)"))

    # -- drawing --------------------------------------------------------------------------------

    def visible_ports(self) -> tuple[PortView, ...]:
        if self.snapshot is None:
            return ()
        return filter_ports(self.snapshot.ports, self.query_text)

    def render_table(self) -> None:
        table: DataTable[Text] = self.query_one("#ports", DataTable)
        snap = self.snapshot
        if snap is None:
            return
        keep = self.selected
        now = time.monotonic()
        built: list[tuple[list[Text], SocketRow | None, PortKey]] = []
        for view in self.visible_ports():
            rows: list[SocketRow | None] = list(view.rows) or [None]
            for i, row in enumerate(rows):
                built.append((row_cells(view, row, i == 0, now, snap.mono), row, view.key))
        width = owners_width([cells for cells, _, _ in built], table.size.width or self.size.width)
        # Columns too: DataTable never shrinks an auto-width column, so after a resize to fewer
        # columns (or a long cell that is gone) the owners would be cut by the screen's edge.
        table.clear(columns=True)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.row_keys = []
        for cells, row, key in built:
            text = row_owners_text(row, width) if row is not None else cut(cells[-1].plain, width)
            table.add_row(*cells[:-1], Text(text))
            self.row_keys.append(key)
        if self.row_keys:
            target = self.row_keys.index(keep) if keep in self.row_keys else 0
            table.move_cursor(row=target, animate=False)
            self.selected = self.row_keys[target]

    def render_status(self) -> None:
        snap = self.snapshot
        parts = ["rebind top"]
        if snap is not None:
            shown = len(self.visible_ports())
            parts.append(f"{shown} port(s)" + (f" of {len(snap.ports)}" if shown != len(snap.ports) else ""))
            parts.append(f"every {self.interval:g}s, last {snap.cpu_s * 1000:.0f} ms CPU")
            if snap.wall_s > self.interval:
                parts.append(f"SLOWED DOWN: a refresh takes {snap.wall_s:.1f}s")
            slow = self.sampler.slowed()
            if slow:
                parts.append("to save CPU: " + ", ".join(f"{k} every {v:.0f}s" for k, v in slow.items()))
            if snap.source != "netlink":
                parts.append(f"source {snap.source}")
        if self.query_text:
            parts.append(f"filter: {self.query_text}")
        line = Text(" · ".join(parts))
        if self.error:
            line.append(f" · {self.error}", style="bold red")
        elif snap is not None and snap.warnings:
            line.append(f" · {snap.warnings[0]}", style="yellow")
        self.query_one("#status", Static).update(line)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if 0 <= event.cursor_row < len(self.row_keys):
            self.selected = self.row_keys[event.cursor_row]

    def current(self) -> PortView | None:
        if self.snapshot is None or self.selected is None:
            return None
        return self.snapshot.by_key().get(self.selected)

    def on_resize(self) -> None:
        self.render_table()

    # -- filter ---------------------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.value = self.query_text
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_text = event.value.strip()
        event.input.remove_class("shown")
        self.query_one("#ports", DataTable).focus()
        self.render_table()
        self.render_status()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("shown")
        self.query_text = ""
        self.query_one("#ports", DataTable).focus()
        self.render_table()
        self.render_status()

    # -- keys that act --------------------------------------------------------------------------

    def _in_thread(self, fn: Callable[[], Any], done: Callable[[Any], None], screen: TextScreen) -> None:
        def run() -> None:
            try:
                result = fn()
            except Exception as exc:  # one line on the screen, never a traceback
                self.call_from_thread(screen.add, visible_error(exc))
                return
            self.call_from_thread(done, result)

        threading.Thread(target=run, daemon=True).start()

    def _screen(self, title: str, first: str) -> tuple[TextScreen, PortView] | None:
        view = self.current()
        if view is None:
            self.notify("select a port first")
            return None
        screen = TextScreen(title.format(key=view.key), [first.format(key=view.key)])
        self.push_screen(screen)
        return screen, view

    def action_why(self) -> None:
        got = self._screen("why {key}", "diagnosing {key}…")
        if got is None:
            return
        screen, view = got
        self._in_thread(lambda: keys.why(view.key), lambda d: screen.set_lines(keys.why_lines(d)), screen)

    def action_free(self) -> None:
        got = self._screen("free {key}", "planning: what blocks {key}, who may be signalled…")
        if got is None:
            return
        screen, view = got

        def planned(plan: Any) -> None:
            lines, question = keys.free_confirmation(plan)
            screen.set_lines(lines)
            if question is not None:
                screen.ask(question, lambda yes: go(plan, yes))

        def go(plan: Any, yes: bool) -> None:
            if not yes:
                screen.add("nothing done")
                return
            screen.add("freeing…")
            say = lambda msg: self.call_from_thread(screen.add, f"  {msg}")  # noqa: E731
            self._in_thread(
                lambda: keys.run_free(plan, say),
                lambda res: screen.extend(keys.result_lines(res)),
                screen,
            )

        self._in_thread(lambda: keys.free_plan(view.key), planned, screen)

    def action_wait(self) -> None:
        got = self._screen("wait {key}", "waiting until a bind() of {key} succeeds (trial binds)… Esc stops")
        if got is None:
            return
        screen, view = got
        cancel = threading.Event()
        screen.on_close = cancel.set
        start = time.monotonic()

        def loop() -> str:
            while not cancel.is_set():
                res = keys.wait_step(view.key, timeout=1.0)
                if res.ok:
                    return f"{view.key} is bindable now (after {time.monotonic() - start:.1f}s)"
                line = keys.wait_status(res, time.monotonic() - start)
                self.call_from_thread(screen.set_lines, [screen.lines[0], line])
            return "stopped"

        def done(msg: str) -> None:
            screen.add(msg)
            self.bell()

        self._in_thread(loop, done, screen)

    def action_reload(self) -> None:
        got = self._screen("reload {key}", "looking for the `rebind run` serving {key}…")
        if got is None:
            return
        screen, view = got

        def find() -> tuple[keys.Supervisor | str, str]:
            sup = keys.find_supervisor(view)
            if isinstance(sup, str):
                return sup, ""
            return sup, keys.control(sup, "status", 5.0)

        def found(res: tuple[keys.Supervisor | str, str]) -> None:
            sup, status = res
            if isinstance(sup, str):
                screen.add(f"cannot reload: {visible(sup)}")
                return
            screen.add(f"rebind run pid {sup.pid}, control socket {visible(sup.control)}")
            screen.add(f"status: {status}")
            screen.ask("Start a new generation (rebind reload)? y/n", lambda yes: go(sup, yes))

        def go(sup: keys.Supervisor, yes: bool) -> None:
            if not yes:
                screen.add("nothing done")
                return
            screen.add("reloading (waits until the new generation is ready)…")
            self._in_thread(lambda: keys.control(sup, "reload", 120.0), screen.add, screen)

        self._in_thread(find, found, screen)

    def action_quit_top(self) -> None:
        self.stop.set()
        self.exit(0)

    def on_unmount(self) -> None:
        self.stop.set()


def visible_error(exc: BaseException) -> str:
    return f"error: {visible(str(exc))}"
