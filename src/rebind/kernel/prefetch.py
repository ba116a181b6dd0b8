"""Start the kernel dump for `rebind ls PORT…` / `rebind why PORT` while the CLI is importing.

For a port query the dump does not depend on anything the CLI parses, and on a large table it
is mostly kernel time spent inside send() with the GIL released (the bhash2 walk for
bound-inactive sockets alone is ~35 ms on 400k sockets). Starting it first overlaps that with
the interpreter's imports instead of adding to them.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from rebind.model.records import Family, Proto, SocketRecord, State


@dataclass
class _Job:
    ports: tuple[int, ...]
    protos: tuple[Proto, ...]
    records: list[SocketRecord] = field(default_factory=list)
    failed: bool = False
    thread: threading.Thread | None = None


_job: _Job | None = None


def start(ports: tuple[int, ...], protos: tuple[Proto, ...] = tuple(Proto)) -> None:
    """Dump every socket on ``ports`` (all states, both families) in a background thread."""
    global _job
    if os.environ.get("REBIND_FORCE_PROCFS") or _job is not None:
        return
    job = _Job(tuple(sorted(set(ports))), protos)
    job.thread = threading.Thread(target=_run, args=(job,), name="rebind-prefetch", daemon=True)
    _job = job
    job.thread.start()


def _run(job: _Job) -> None:
    try:
        from rebind.kernel.diag import iter_sockets

        job.records.extend(iter_sockets(ports=job.ports, protos=job.protos))
    except BaseException:  # the normal path will run the query again and report properly
        job.failed = True


def take(
    ports: list[int] | None,
    protos: tuple[Proto, ...],
    families: tuple[Family, ...],
    states: frozenset[State],
) -> list[SocketRecord] | None:
    """The prefetched records if they answer exactly this query (used once), else None."""
    global _job
    job = _job
    if job is None or ports is None or tuple(ports) != job.ports:
        return None
    if set(protos) != set(job.protos) or set(families) != set(Family) or states != frozenset(State):
        return None
    _job = None
    if job.thread is not None:
        job.thread.join()
    return None if job.failed else job.records
