"""Metrics of `rebind run --metrics ADDR:PORT`: reloads, their duration, the serving generation.

The supervisor owns when things happen; this module owns the names. Calls the supervisor makes:

* ``RunMetrics.serve(addr)`` once at start-up (addr as for ``--metrics``; parse with
  :func:`rebind.exporter.serve.parse_listen` at option-parsing time for exit 2 on bad input);
* ``.generation(n)`` when generation ``n`` becomes ready (it now serves);
* ``.reload_finished(ReloadResult.X, seconds)`` when a generation start after the first ends:
  ready (OK), spawn failed, exited before ready, or not ready in time; ``seconds`` from the start
  of the generation to that moment;
* ``.close()`` at exit.
"""

from __future__ import annotations

import enum
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.registry import CollectorRegistry


class ReloadResult(enum.StrEnum):
    OK = "ok"
    FAILED_TO_START = "failed_to_start"
    EXITED_BEFORE_READY = "exited_before_ready"
    NOT_READY_IN_TIME = "not_ready_in_time"


#: Reloads take from milliseconds (a pre-forked server) to the ready timeout (30 s default).
RELOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RunMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reloads = Counter(
            "rebind_run_reloads",
            "Generation starts after the first, by how they ended.",
            ["result"],
            registry=self.registry,
        )
        for r in ReloadResult:
            self.reloads.labels(result=r.value)  # exported as 0 from the start, so rate() works
        self.reload_seconds = Histogram(
            "rebind_run_reload_seconds",
            "Seconds from a new generation's start until it was ready (or failed).",
            buckets=RELOAD_BUCKETS,
            registry=self.registry,
        )
        self._generation = Gauge(
            "rebind_run_generation",
            "The number of the generation now serving (0: none yet).",
            registry=self.registry,
        )
        self._server: Any = None

    def reload_finished(self, result: ReloadResult | str, seconds: float) -> None:
        res = ReloadResult(result)
        self.reloads.labels(result=res.value).inc()
        self.reload_seconds.observe(max(0.0, seconds))

    def generation(self, n: int) -> None:
        self._generation.set(n)

    def serve(self, addr: str) -> tuple[str, int]:
        """Start the HTTP endpoint (daemon thread); ``addr`` as ``--metrics`` takes it."""
        from rebind.exporter.serve import parse_listen, start_http

        host, port = parse_listen(addr, what="--metrics")
        self._server = start_http(self.registry, host, port)
        return host, int(self._server.server_address[1])

    def render(self) -> bytes:
        from rebind.exporter.serve import render

        return render(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
