"""`rebind why --reload PORT`: will a reload that hands over through a SO_REUSEPORT group reset
connections? Pure advice (no I/O): the caller reads the socket table and the sysctl.

A SO_REUSEPORT group is several listening sockets on one address and port; the kernel spreads new
connections over them by hash, and each socket has its own accept queue. A server that reloads by
starting the new generation's listener next to the old one and then closing the old one loses
what waits in the old queue: inet_csk_listen_stop() resets every request still queued there,
unless net.ipv4.tcp_migrate_req=1 (Linux 5.14+, reuseport_migrate_sock) moves them to another
listener of the group. Measured (tests/kernel/test_recipes_reload_check.py): 200 of 200 queued
connections reset with tcp_migrate_req=0, 0 with 1, 0 when another process still holds the old
socket's fd (the socket is not closed, so its queue stays).

The facts come from ``kernel/reload_facts.py``; the text and ``rebind.why-reload/1`` renderers
are ``render/reload.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# The fix as one shell line, safe to paste as printed (the remark is a shell comment); the kernel
# test runs it exactly as printed in a throwaway namespace (tests/kernel/test_recipes_reload_check.py).
MIGRATE_REQ_FIX = "sysctl -w net.ipv4.tcp_migrate_req=1  # Linux 5.14+; this network namespace only"

SAME_GENERATION_SECONDS = 1.0  # creators started this close together: one generation's workers


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening socket of the port, with the process that (most likely) created it."""

    local: str  # "127.0.0.1:8080"
    inode: int
    queued: int  # connections waiting in its accept queue now
    creator: str | None  # owner label of its oldest holder ("gunicorn[1234]")
    creator_start: float | None  # that holder's start, seconds (any fixed origin)


@dataclass(frozen=True, slots=True)
class Advice:
    level: Level
    text: str
    fixes: tuple[str, ...] = ()  # what to do, in words
    commands: tuple[str, ...] = ()  # shell lines that do it, each safe to paste as printed


def generations(group: Sequence[Listener]) -> list[list[Listener]]:
    """Split a group by its creators' start times: a gap of a second or more is another generation."""
    known = sorted((x for x in group if x.creator_start is not None), key=lambda x: x.creator_start or 0.0)
    out: list[list[Listener]] = []
    for x in known:
        last = out[-1][-1].creator_start if out else None
        if last is not None and (x.creator_start or 0.0) - last < SAME_GENERATION_SECONDS:
            out[-1].append(x)
            continue
        out.append([x])
    return out


def advise(listeners: Sequence[Listener], migrate_req: int | None, port: int) -> list[Advice]:
    groups: dict[str, list[Listener]] = {}
    for x in listeners:
        groups.setdefault(x.local, []).append(x)
    out: list[Advice] = []
    for local, group in sorted(groups.items()):
        if len(group) < 2:
            continue
        gens = generations(group)
        if len(gens) < 2:
            continue
        old = gens[0]
        queued = sum(x.queued for x in old)
        names = ", ".join(sorted({x.creator or "?" for x in old}))
        new = ", ".join(sorted({x.creator or "?" for g in gens[1:] for x in g}))
        what = (
            f"{local}: a SO_REUSEPORT group spans process generations (old: {names}; new: {new}); "
            f"{queued} connection(s) wait in the old listener's queue"
        )
        if migrate_req == 1:
            out.append(Advice(Level.OK, what + "; net.ipv4.tcp_migrate_req=1 moves them when it closes"))
            continue
        setting = "unknown" if migrate_req is None else str(migrate_req)
        out.append(
            Advice(
                Level.WARN,
                what + f"; net.ipv4.tcp_migrate_req={setting}: closing the old listener RESETS every "
                "connection queued in it",
                (
                    f"or run the server under `rebind run --listen {port} -- CMD`: one socket, held "
                    "across generations, so no queue is ever closed",
                    "or keep the old socket's fd open elsewhere until its queue is empty",
                ),
                (MIGRATE_REQ_FIX,),
            )
        )
    if not listeners:
        return [Advice(Level.OK, f"port {port}: nothing listens on it (TCP)")]
    if not out:
        many = any(len(g) > 1 for g in groups.values())
        text = (
            f"port {port}: no SO_REUSEPORT group spans two process generations"
            if many
            else f"port {port}: no SO_REUSEPORT group (a single listener per address)"
        )
        out.append(Advice(Level.OK, text))
    return out


def exit_status(advice: Sequence[Advice]) -> int:
    """1 when a hand-off would reset queued connections, else 0."""
    return 1 if any(a.level is Level.WARN for a in advice) else 0
