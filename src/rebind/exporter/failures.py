"""Failure counters for the exporter, fed by `rebind trace`'s kernel program while it runs.

``rebind_bind_failures_total{port,proto,errno}``: failing bind() and listen() calls on a
watched port (``--watch``; a listen() that fails has the conflict bind() would have had at a
later stage, so it counts too). ``rebind_connect_failures_total{dst,dport,errno}``: failing
connect() calls to a watched destination (``--dest``). Labels come only from the command line
and a fixed errno set, never from what the traced calls asked for: the series are bounded by
what the operator watches (every one exported from 0). ``rebind_trace_events_dropped_total``
counts the failures the ring buffer could not hold (of every port: a drop may have been one of
ours), so a lost count is visible, never silent.

Only calls made in the exporter's own network namespace count (the program is system-wide; the
watched ports are this namespace's, as for every other metric).

:func:`classify` is pure; :class:`FailureCounters` owns the tracer and a reader thread.
"""

from __future__ import annotations

import errno as _errno
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from rebind.exporter.facts import Dest, Watch
from rebind.model.records import IPAddress, Proto, fmt_addr
from rebind.model.trace import Kind, TraceEvent

BIND_ERRNOS = (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL, _errno.EACCES)
#: EAGAIN: a UDP connect() (autobind) that found no free port.
CONNECT_ERRNOS = (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL, _errno.EAGAIN)
#: What the kernel program reports: the union (the errno label's only values).
ERRNOS = frozenset(BIND_ERRNOS + CONNECT_ERRNOS)

BIND_METRIC = "rebind_bind_failures_total"
CONNECT_METRIC = "rebind_connect_failures_total"
DROPPED_METRIC = "rebind_trace_events_dropped_total"
METRICS = (BIND_METRIC, CONNECT_METRIC, DROPPED_METRIC)

BindKey = tuple[int, Proto, int]  # port, proto, errno
ConnectKey = tuple[IPAddress, int, int]  # dst, dport, errno


def _plain(a: IPAddress) -> IPAddress:
    """An IPv4-mapped destination (a v6 socket connecting to ::ffff:a.b.c.d) as the IPv4 one."""
    mapped = getattr(a, "ipv4_mapped", None)
    return mapped if mapped is not None else a


def classify(
    ev: TraceEvent,
    ports: frozenset[tuple[int, Proto]],
    dests: frozenset[tuple[IPAddress, int]],
    netns: int | None,
) -> BindKey | ConnectKey | None:
    """The series one failing call counts in, or None (not watched, another namespace)."""
    if ev.proto is None or (netns is not None and ev.netns != netns) or ev.addr is None:
        return None
    if ev.kind in (Kind.BIND, Kind.LISTEN):
        if ev.errno in BIND_ERRNOS and (ev.port, ev.proto) in ports:
            return (ev.port, ev.proto, ev.errno)
        return None
    dst = _plain(ev.addr)
    if ev.errno in CONNECT_ERRNOS and (dst, ev.port) in dests:
        return (dst, ev.port, ev.errno)
    return None


class EventSource(Protocol):
    """What FailureCounters needs of kernel.trace.Tracer (a fake in unit tests)."""

    def read(self, timeout: float) -> list[bytes]: ...

    def counters(self) -> object: ...

    def close(self) -> None: ...


class FailureCounters(Collector):
    """Counts while it lives: a reader thread drains the ring; collect() reports the totals."""

    def __init__(
        self,
        watches: Sequence[Watch],
        dests: Sequence[Dest],
        netns: int | None,
        source: EventSource,
        decode: Callable[[bytes], TraceEvent | None],
    ) -> None:
        self.ports = frozenset((w.port, w.proto) for w in watches)
        self.dests = frozenset((_plain(d.addr), d.port) for d in dests)
        self.netns = netns
        self._source = source
        self._decode = decode
        self._lock = threading.Lock()
        self.binds: dict[BindKey, int] = {(p, pr, e): 0 for p, pr in self.ports for e in BIND_ERRNOS}
        self.connects: dict[ConnectKey, int] = {(a, p, e): 0 for a, p in self.dests for e in CONNECT_ERRNOS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rebind-failures", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.feed(self._source.read(0.25))

    def feed(self, records: Iterable[bytes]) -> None:
        for raw in records:
            ev = self._decode(raw)
            key = classify(ev, self.ports, self.dests, self.netns) if ev is not None else None
            if key is None:
                continue
            with self._lock:
                if isinstance(key[0], int):
                    self.binds[key] += 1
                else:
                    self.connects[key] += 1

    def dropped(self) -> int:
        return int(getattr(self._source.counters(), "dropped", 0))

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        bind = CounterMetricFamily(
            BIND_METRIC,
            "Failing bind() and listen() calls on a watched port in this network namespace since "
            "the exporter started, by errno (traced in the kernel; every call, however short-lived).",
            labels=["port", "proto", "errno"],
        )
        conn = CounterMetricFamily(
            CONNECT_METRIC,
            "Failing connect() calls to a watched destination in this network namespace since the "
            "exporter started, by errno (EADDRNOTAVAIL: no local port left).",
            labels=["dst", "dport", "errno"],
        )
        with self._lock:
            binds = sorted(self.binds.items(), key=lambda kv: (kv[0][0], kv[0][1].value, kv[0][2]))
            conns = sorted(
                self.connects.items(), key=lambda kv: (kv[0][0].version, int(kv[0][0]), kv[0][1], kv[0][2])
            )
        for (port, proto, err), n in binds:
            bind.add_metric([str(port), proto.value, _errno.errorcode[err]], n)
        for (dst, dport, err), n in conns:
            conn.add_metric([fmt_addr(dst), str(dport), _errno.errorcode[err]], n)
        dropped = CounterMetricFamily(
            DROPPED_METRIC,
            "Failing calls (any port) the kernel could not hand to the exporter (ring buffer full): "
            "the failure counters may be short by up to this many.",
        )
        dropped.add_metric([], self.dropped())
        return [bind, conn, dropped]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._source.close()


def start(watches: Sequence[Watch], dests: Sequence[Dest]) -> FailureCounters:
    """Attach the trace program (BPFUnavailable, one line, when this host cannot) and count."""
    from rebind.kernel.diag import current_netns
    from rebind.kernel.trace import Tracer, decode

    tracer = Tracer(ERRNOS)
    bits = tracer.layout.bits
    try:
        return FailureCounters(watches, dests, current_netns(), tracer, lambda raw: decode(raw, bits))
    except BaseException:
        tracer.close()
        raise
