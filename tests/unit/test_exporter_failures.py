"""exporter/failures.py: which failing call counts in which series (pure), and the collector."""

from __future__ import annotations

import errno
import shutil
import subprocess
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from rebind.exporter.facts import Dest, Watch
from rebind.exporter.failures import FailureCounters, classify
from rebind.model.records import Proto
from rebind.model.trace import Kind, TraceEvent

NS = 4026532000
PORTS = frozenset({(8080, Proto.TCP), (53, Proto.UDP)})
DESTS = frozenset({(IPv4Address("10.0.0.5"), 5432)})


def ev(kind: Kind = Kind.BIND, port: int = 8080, err: int = errno.EADDRINUSE, **kw: Any) -> TraceEvent:
    base: dict[str, Any] = dict(
        kind=kind, errno=err, pid=1, tid=1, comm="x", cgroup_id=1, netns=NS, family=2,
        proto=Proto.TCP, fd=3, addr=IPv4Address("0.0.0.0"), port=port,
    )  # fmt: skip
    base.update(kw)
    return TraceEvent(**base)


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (ev(), (8080, Proto.TCP, errno.EADDRINUSE)),
        (ev(Kind.LISTEN), (8080, Proto.TCP, errno.EADDRINUSE)),  # listen's conflict counts too
        (ev(port=8081), None),  # not watched
        (ev(proto=Proto.UDP), None),  # 8080/udp is not watched
        (ev(port=53, proto=Proto.UDP, err=errno.EACCES), (53, Proto.UDP, errno.EACCES)),
        (ev(err=errno.EINVAL), None),  # not an errno of the label set
        (ev(netns=NS + 1), None),  # another namespace
        (ev(proto=None), None),
        (
            ev(Kind.CONNECT, 5432, errno.EADDRNOTAVAIL, addr=IPv4Address("10.0.0.5")),
            (IPv4Address("10.0.0.5"), 5432, errno.EADDRNOTAVAIL),
        ),
        (
            ev(Kind.CONNECT, 5432, errno.EADDRNOTAVAIL, addr=IPv6Address("::ffff:10.0.0.5"), family=10),
            (IPv4Address("10.0.0.5"), 5432, errno.EADDRNOTAVAIL),
        ),  # a v6 socket's mapped destination
        (ev(Kind.CONNECT, 5433, errno.EADDRNOTAVAIL, addr=IPv4Address("10.0.0.5")), None),
        (ev(Kind.CONNECT, 5432, errno.EACCES, addr=IPv4Address("10.0.0.5")), None),
    ],
)
def test_classify(event: TraceEvent, key: object) -> None:
    assert classify(event, PORTS, DESTS, NS) == key


class FakeSource:
    def __init__(self) -> None:
        self.closed = False

    def read(self, timeout: float) -> list[bytes]:
        return []

    def counters(self) -> object:
        return type("C", (), {"dropped": 2})()

    def close(self) -> None:
        self.closed = True


def test_collector_counts_and_exports_every_series_from_zero() -> None:
    events = {b"a": ev(), b"b": ev(), b"c": ev(port=9), b"d": ev(Kind.CONNECT, 5432, errno.EAGAIN,
              addr=ip_address("10.0.0.5"), proto=Proto.UDP)}  # fmt: skip
    src = FakeSource()
    fc = FailureCounters(
        [Watch(8080), Watch(53, Proto.UDP)], [Dest(IPv4Address("10.0.0.5"), 5432)], NS, src, events.get
    )
    try:
        fc.feed([b"a", b"b", b"c", b"d", b"unknown"])
        reg = CollectorRegistry()
        reg.register(fc)
        text = generate_latest(reg).decode()
    finally:
        fc.close()
    assert src.closed
    assert 'rebind_bind_failures_total{errno="EADDRINUSE",port="8080",proto="tcp"} 2.0' in text
    assert 'rebind_bind_failures_total{errno="EACCES",port="53",proto="udp"} 0.0' in text
    assert 'rebind_connect_failures_total{dport="5432",dst="10.0.0.5",errno="EAGAIN"} 1.0' in text
    assert "rebind_trace_events_dropped_total 2.0" in text
    assert (
        text.count("rebind_bind_failures_total{") == 2 * 3
        and text.count("rebind_connect_failures_total{") == 3
    )
    promtool = shutil.which("promtool")
    if promtool:
        res = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
        )
        assert res.returncode == 0, res.stdout + res.stderr
