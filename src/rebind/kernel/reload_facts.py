"""The facts `rebind why --reload PORT` is judged on (model/reload.py): the port's TCP listeners,
each with the process that most likely created it, and net.ipv4.tcp_migrate_req."""

from __future__ import annotations

import os

from rebind.model.reload import Listener

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def read_migrate_req() -> int | None:
    try:
        with open(MIGRATE_REQ) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None  # before Linux 5.14 there is no such knob: as good as 0


def listeners(port: int) -> list[Listener]:
    from rebind.model.records import Proto, State, owner_label
    from rebind.sockets import socket_table

    ticks = os.sysconf("SC_CLK_TCK")
    table = socket_table(ports=[port], protos=[Proto.TCP], states=[State.LISTEN])
    out = []
    for e in table.entries:
        r = e.socket
        timed = [o for o in e.owners if o.start_ticks is not None]
        creator = min(timed, key=lambda o: o.start_ticks or 0) if timed else None
        start = creator.start_ticks / ticks if creator and creator.start_ticks is not None else None
        label = owner_label(creator) if creator else None
        out.append(Listener(str(r.local), r.inode or 0, r.rqueue, label, start))
    return out
