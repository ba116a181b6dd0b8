"""The full screens `rebind top` opens over its table (why, free, wait, reload)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static


class TextScreen(Screen[None]):
    """A full screen of text (why, free, wait, reload) with an optional y/n question."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "close", "back"),
        Binding("y", "answer(True)", "yes", show=False),
        Binding("n", "answer(False)", "no", show=False),
    ]
    DEFAULT_CSS = """
    TextScreen #title { height: 1; background: $boost; text-style: bold; }
    TextScreen #body { height: 1fr; }
    TextScreen #hint { height: 1; color: $text-muted; }
    """

    def __init__(self, title: str, lines: list[str] | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.lines: list[str] = list(lines or [])
        self.question: Callable[[bool], None] | None = None
        self.on_close: Callable[[], None] | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text(self.title_text), id="title")
        with VerticalScroll(id="body"):
            yield Static(Text("\n".join(self.lines)), id="text")
        yield Static(Text("Esc/q: back"), id="hint")

    def _render_body(self) -> None:
        if not self.is_attached:
            return
        self.query_one("#text", Static).update(Text("\n".join(self.lines)))
        hint = "y: proceed   n/Esc: cancel" if self.question else "Esc/q: back"
        self.query_one("#hint", Static).update(Text(hint))

    def set_lines(self, lines: list[str]) -> None:
        self.lines = list(lines)
        self._render_body()

    def add(self, line: str) -> None:
        self.lines.append(line)
        self._render_body()

    def extend(self, lines: list[str]) -> None:
        self.lines.extend(lines)
        self._render_body()

    def ask(self, question: str, then: Callable[[bool], None]) -> None:
        self.lines.append("")
        self.lines.append(question)
        self.question = then
        self._render_body()

    def action_answer(self, yes: bool) -> None:
        then, self.question = self.question, None
        if then is None:
            return
        self._render_body()
        then(yes)

    def action_close(self) -> None:
        if self.question is not None:
            self.action_answer(False)
        if self.on_close is not None:
            self.on_close()
        self.dismiss()
