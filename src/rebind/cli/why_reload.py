"""`rebind why --reload PORT`: would closing an old generation's listener reset connections?"""

from __future__ import annotations

import os
from typing import Any

from rebind.supervisor.reload_check import Advice, Level, Listener


def read_migrate_req() -> int | None:
    """net.ipv4.tcp_migrate_req; None before Linux 5.14 (no such knob: as good as 0)."""
    from rebind.kernel.sysctl import read_int

    return read_int("net/ipv4/tcp_migrate_req")


def listeners(port: int) -> list[Listener]:
    from rebind.kernel.walk import table as socket_table
    from rebind.model.query import SocketQuery
    from rebind.model.records import Proto, State, owner_label

    ticks = os.sysconf("SC_CLK_TCK")
    table = socket_table(SocketQuery.create(ports=[port], protos=[Proto.TCP], states=[State.LISTEN]))
    out = []
    for e in table.entries:
        r = e.socket
        timed = [o for o in e.owners if o.start_ticks is not None]
        creator = min(timed, key=lambda o: o.start_ticks or 0) if timed else None
        start = creator.start_ticks / ticks if creator and creator.start_ticks is not None else None
        label = owner_label(creator) if creator else None
        out.append(Listener(str(r.local), r.inode or 0, r.rqueue, label, start))
    return out


def run_reload_check(port: int, as_json: bool) -> int:
    from rebind.supervisor.reload_check import advise

    advice = advise(listeners(port), read_migrate_req(), port)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(_json(port, advice))
    else:
        _print(advice)
    return 1 if any(a.level is Level.WARN for a in advice) else 0


def _json(port: int, advice: list[Advice]) -> dict[str, Any]:
    return {
        "schema": "rebind.why-reload/1",
        "port": port,
        "tcp_migrate_req": read_migrate_req(),
        "advice": [{"level": a.level.value, "text": a.text, "fixes": list(a.fixes)} for a in advice],
    }


def _print(advice: list[Advice]) -> None:
    from rebind.cli.render import out

    con = out()
    for a in advice:
        style = "bold red" if a.level is Level.WARN else "bold green"
        con.print(f"[{style}]{a.level.value}:[/] {con.esc(a.text)}")
        for fix in a.fixes:
            con.print(f"  fix: {con.esc(fix)}")
