"""The prometheus-client Collector: gathers at scrape time, at most once per interval."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from rebind.errors import UsageError
from rebind.exporter.facts import Dest, Snapshot, Watch
from rebind.exporter.families import families
from rebind.exporter.gather import Gatherer
from rebind.model.validate import parse_seconds

SnapshotSource = Callable[[], Snapshot]
T = TypeVar("T")


def _all_of(items: Sequence[T], kind: type[T], what: str) -> tuple[T, ...]:
    if isinstance(items, str | bytes):
        raise UsageError(f"RebindCollector {what}: a sequence of {kind.__name__}, not a string")
    out = tuple(items)
    for x in out:
        if not isinstance(x, kind):
            raise UsageError(f"RebindCollector {what}: {x!r} is not a rebind.{kind.__name__}")
    return out


class RebindCollector(Collector):
    """Facts are gathered when Prometheus scrapes, never in the background, and reused for
    ``interval`` seconds: several Prometheus servers (or a scrape storm) cost one gather per
    interval. The lock serialises prometheus-client's request threads."""

    def __init__(
        self,
        watches: Sequence[Watch],
        dests: Sequence[Dest],
        *,
        interval: float = 5.0,
        gatherer: SnapshotSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watches = _all_of(watches, Watch, "watches")
        self.dests = _all_of(dests, Dest, "dests")
        # nan would never compare >= and gather once ever; negative is a typo (usage error).
        self.interval = parse_seconds(interval, what="RebindCollector interval", minimum=0.0)
        self._gather: SnapshotSource = gatherer or Gatherer(self.watches, self.dests)
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: list[Metric] | None = None
        self._at = 0.0
        self.gathers = 0

    def describe(self) -> Iterable[Metric]:
        # Registering must not scrape the kernel (CollectorRegistry calls describe()).
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._at >= self.interval:
                self._cached = families(self._gather())
                self._at = now
                self.gathers += 1
            return list(self._cached)
