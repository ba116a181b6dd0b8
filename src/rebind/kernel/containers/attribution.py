"""Each owner of a socket table with its container, systemd unit and proxy role: the cgroup and
command line first, the engines only when some owner is a container's process or a port proxy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rebind.kernel.containers.engines import EngineState, engine_state
from rebind.kernel.containers.proxies import resolve_proxy
from rebind.model.containers import ContainerRef, container_from_cgroup, unit_from_cgroup

if TYPE_CHECKING:
    from rebind.model.records import Owner, SocketTable


@dataclass(frozen=True, slots=True)
class ProcContext:
    container: ContainerRef | None = None
    unit: str | None = None


def read_context(pid: int, proc: str = "/proc") -> ProcContext:
    """Container and unit of one process, or empty when it vanished or cannot be read."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except OSError:
        return ProcContext()
    return ProcContext(container_from_cgroup(text), unit_from_cgroup(text))


def annotate_owner(o: Owner, engines: EngineState | None, proc: str = "/proc") -> Owner:
    """The owner with its container, unit and proxy role filled in (unchanged if it vanished).
    ``engines`` None: only what the process itself says (cgroup, command line)."""
    ctx = read_context(o.pid, proc)
    container, proxy = ctx.container, None
    found = resolve_proxy(o.pid, o.name, o.cmdline, o.uid, engines or EngineState(), proc)
    if found is not None:
        info, served = found
        proxy = info.kind
        container = served or container
    elif container is not None and container.name is None and engines is not None:
        container = engines.ref(container.id, container.engine)
    return replace(o, container=container, unit=ctx.unit, proxy=proxy)


def _needs_engines(owners: Iterable[Owner]) -> bool:
    """Engine state (an API round trip) is asked only when an owner is in or serves a container."""
    return any((o.container is not None and o.container.name is None) or o.proxy is not None for o in owners)


def annotate(table: SocketTable, engines: EngineState | None = None, proc: str = "/proc") -> SocketTable:
    """Every owner of ``table`` with its context; each (pid, fd) is read once, and the engines
    are asked only when some owner is a container's process or a port proxy."""
    cache: dict[tuple[int, int], Owner] = {}
    for e in table.entries:
        for o in e.owners:
            if (o.pid, o.fd) not in cache:
                cache[(o.pid, o.fd)] = annotate_owner(o, engines, proc)
    problems: tuple[str, ...] = ()
    if engines is None and _needs_engines(cache.values()):
        engines = engine_state(proc)
        problems = engines.problems
        cache = {k: annotate_owner(o, engines, proc) for k, o in cache.items()}
    entries = tuple(replace(e, owners=tuple(cache[(o.pid, o.fd)] for o in e.owners)) for e in table.entries)
    return replace(table, entries=entries, warnings=(*table.warnings, *problems))
