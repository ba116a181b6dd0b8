"""One seconds type: every command's duration option is parsed by ``cli/params.SecondsType``
(itself ``model/validate.parse_seconds``), so inf, nan and 1e12 get the same one-line answer
from every command, at parse time (issue 21: "one seconds type")."""

from __future__ import annotations

import importlib

import click

from rebind.cli.main import COMMANDS
from rebind.cli.params import SecondsType

#: How a duration option shows itself in --help.
DURATION_METAVARS = {"SECONDS", "S"}


def _commands() -> list[click.Command]:
    out: list[click.Command] = []
    for module, attr, _help in COMMANDS.values():
        cmd = getattr(importlib.import_module(module), attr)
        out.extend(cmd.commands.values() if isinstance(cmd, click.Group) else [cmd])
    return out


def test_every_duration_option_is_the_seconds_type() -> None:
    durations = [
        (cmd.name, p.opts[0], p.type)
        for cmd in _commands()
        for p in cmd.params
        if isinstance(p, click.Option) and p.metavar in DURATION_METAVARS
    ]
    names = {(c, o) for c, o, _ in durations}
    # The parser sees them (not vacuously green): wait, free, top, exporter and run's.
    assert {
        ("wait", "--timeout"),
        ("free", "--grace"),
        ("top", "--interval"),
        ("exporter", "--interval"),
    } <= names
    assert ("run", "--ready-timeout") in names
    assert [(c, o) for c, o, t in durations if not isinstance(t, SecondsType)] == []


def test_top_keeps_its_own_bounds() -> None:
    top = next(c for c in _commands() if c.name == "top")
    [interval] = [p for p in top.params if p.name == "interval"]
    assert isinstance(interval.type, SecondsType)
    assert (interval.type.minimum, interval.type.maximum) == (0.2, 3600)
