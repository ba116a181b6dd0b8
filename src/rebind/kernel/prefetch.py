"""Start the kernel dump for `rebind ls PORT…` / `rebind why PORT` while the CLI is importing.

For a port query the dump does not depend on anything the CLI parses, and on a large table it
is mostly kernel time spent inside send() with the GIL released (the bhash2 walk for
bound-inactive sockets alone is ~35 ms on 400k sockets). The entry point starts it before
importing click and the commands, so that walk overlaps the imports instead of following them.
This module imports nothing heavy itself: the worker thread imports the reader.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rebind.model.records import Family, Proto, SocketRecord, State


class _Job:
    def __init__(self, ports: tuple[int, ...], proto: str | None) -> None:
        self.ports = ports
        self.proto = proto  # "tcp", "udp" or None for both
        self.records: list[SocketRecord] = []
        self.failed = False
        self.sending = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rebind-prefetch", daemon=True)

    def _run(self) -> None:
        try:
            from rebind.kernel.diag import iter_sockets
            from rebind.model.records import Proto

            protos: Any = [Proto(self.proto)] if self.proto else list(Proto)
            self.sending.set()  # from here on the thread mostly waits in the kernel
            self.records.extend(iter_sockets(ports=self.ports, protos=protos))
        except BaseException:  # the normal path runs the query again and reports properly
            self.failed = True
        finally:
            self.sending.set()


_job: _Job | None = None


def start(ports: tuple[int, ...], proto: str | None = None) -> None:
    """Dump every socket on ``ports`` (all states, both families) in a background thread.

    Returns once the thread has imported the reader and is about to send the request: importing
    in parallel would only share the GIL, while the kernel walk runs without it.
    """
    global _job
    if os.environ.get("REBIND_FORCE_PROCFS") or _job is not None:
        return
    _job = _Job(tuple(sorted(set(ports))), proto)
    _job.thread.start()
    _job.sending.wait(1.0)


def take(
    ports: list[int] | None,
    protos: tuple[Proto, ...],
    families: tuple[Family, ...],
    states: frozenset[State],
) -> list[SocketRecord] | None:
    """The prefetched records if they answer exactly this query (used once), else None."""
    from rebind.model.records import Family, Proto, State

    global _job
    job = _job
    if job is None or ports is None or tuple(ports) != job.ports:
        return None
    wanted = {Proto(job.proto)} if job.proto else set(Proto)
    if set(protos) != wanted or set(families) != set(Family) or states != frozenset(State):
        return None
    _job = None
    job.thread.join()
    return None if job.failed else job.records
