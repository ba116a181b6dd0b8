"""The facts `rebind why --reload PORT` is judged on (model/reload.py): the port's TCP listeners,
each with the process that most likely created it, and net.ipv4.tcp_migrate_req."""

from __future__ import annotations

import os

from rebind.model.reload import Listener


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
