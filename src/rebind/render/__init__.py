"""Renderers that both the CLI (rebind.cli) and the TUI (rebind.top) call: one per question, no
click and no Textual here, so nothing below the CLI imports it (issue 21).

``console``: the markup printer and shared cells; ``why``: `rebind why`'s text.
"""
