"""`rebind why --reload PORT`'s advice as the lines people read and as ``rebind.why-reload/1``.

A command is printed as ``  $ LINE``: LINE is one shell line, safe to paste exactly as printed
(its remark is a shell comment; tests/kernel/test_recipes_reload_check.py runs it as printed).
A fix in words is ``  fix: TEXT``. ``text_lines`` and ``to_json`` are pure; ``print_advice`` prints
the lines (coloured on a terminal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rebind.model.reload import Advice, Level

SCHEMA = "rebind.why-reload/1"


def to_json(port: int, migrate_req: int | None, advice: Sequence[Advice]) -> dict[str, Any]:
    """``fixes`` lists the commands first, as printed (additive: ``commands`` holds them alone)."""
    return {
        "schema": SCHEMA,
        "port": port,
        "tcp_migrate_req": migrate_req,
        "advice": [
            {
                "level": a.level.value,
                "text": a.text,
                "fixes": [*a.commands, *a.fixes],
                "commands": list(a.commands),
            }
            for a in advice
        ],
    }


def text_lines(advice: Sequence[Advice]) -> list[tuple[Level | None, str]]:
    """The plain text, line by line, with the level of each headline (for its colour)."""
    out: list[tuple[Level | None, str]] = []
    for a in advice:
        out.append((a.level, f"{a.level.value}: {a.text}"))
        out += [(None, f"  $ {c}") for c in a.commands]
        out += [(None, f"  fix: {f}") for f in a.fixes]
    return out


def print_advice(advice: Sequence[Advice]) -> None:
    """The lines on stdout: the level coloured on a terminal, plain otherwise; text escaped."""
    from rebind.render.console import out

    con = out()
    for level, line in text_lines(advice):
        if level is None:
            con.print(con.esc(line))
            continue
        style = "bold red" if level is Level.WARN else "bold green"
        head, _, rest = line.partition(" ")
        con.print(f"[{style}]{con.esc(head)}[/] {con.esc(rest)}")
