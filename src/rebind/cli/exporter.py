"""`rebind exporter`: port health for Prometheus (/metrics, or a textfile for node_exporter)."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import click

from rebind.cli.params import SECONDS
from rebind.errors import UsageError
from rebind.model.records import IPAddress

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from rebind.exporter.facts import Dest, Watch
    from rebind.exporter.failures import FailureCounters

#: Bounds on the command line, so a typo cannot make a cardinality (or bytecode) explosion.
MAX_WATCH = 512
MAX_DEST = 64


@click.command(
    epilog="""\b
Examples:
  rebind exporter --watch 80,443,53/udp                  serve 127.0.0.1:9811/metrics
  rebind exporter --watch 127.0.0.1:8080,[::]:9000       servers on one address, dual-stack
  rebind exporter --listen 0.0.0.0:9811 --watch 8080 --dest 10.0.0.5:5432
  rebind exporter --watch 8080 --textfile /var/lib/node_exporter/textfile/rebind.prom --once

\b
Metrics, labels and alert rules: docs/metrics.md, docs/exporter.md (rules ship in the
package: rebind/exporter/rules.yml). Exit status: 0 ok, 2 usage error, 3 cannot listen/write.
""",
)
@click.option(
    "--listen",
    "listen",
    default=f"127.0.0.1:{9811}",
    show_default=True,
    metavar="ADDR:PORT",
    help="Serve /metrics here ([::]:PORT for IPv6, 0.0.0.0:PORT for every IPv4 address).",
)
@click.option(
    "--watch",
    "watch",
    multiple=True,
    metavar="[ADDR:]PORT[/udp][,...]",
    help="Servers to watch: the address their restart binds (default 0.0.0.0; [::]:PORT for a "
    "dual-stack server) and the port (repeatable; TCP unless /udp).",
)
@click.option(
    "--dest",
    "dest",
    multiple=True,
    metavar="HOST:PORT[,...]",
    help="Destinations this host connects to: ephemeral ports left for each (repeatable). "
    "HOST is resolved once, at start-up.",
)
@click.option(
    "--interval",
    "interval",
    type=SECONDS,
    default="5",
    show_default=True,
    metavar="S",
    help="Gather at most once per S seconds (scrapes in between get the cached facts); "
    "with --textfile, rewrite it every S seconds.",
)
@click.option(
    "--textfile",
    "textfile",
    metavar="PATH",
    help="Write the metrics to PATH (*.prom) atomically instead of serving HTTP.",
)
@click.option("--once", is_flag=True, help="With --textfile: write once and exit.")
@click.option(
    "--trace",
    "trace",
    is_flag=True,
    help="Also count failing bind/listen/connect calls on the watched ports and destinations "
    "(rebind_bind_failures_total, rebind_connect_failures_total) with rebind trace's kernel "
    "program while the exporter runs (root, kernel BTF).",
)
def exporter(
    listen: str,
    watch: tuple[str, ...],
    dest: tuple[str, ...],
    interval: float,
    textfile: str | None,
    once: bool,
    trace: bool,
) -> int:
    """Export port health to Prometheus: would a restart bind, accept queues, sockets by state,
    ephemeral ports left per destination, and configuration warnings.

    Gathers at scrape time with kernel-side filters (one walk of each socket table), never
    binds or connects. Run as root, or unprivileged: what cannot be read is exported as
    rebind_exporter_missing{metric,reason}.
    """
    _need_prometheus_client()
    from rebind.exporter.collector import RebindCollector
    from rebind.exporter.serve import parse_listen, registry_with

    watches = parse_watches(watch)
    dests = parse_dests(dest)
    if once and not textfile:
        raise UsageError("--once needs --textfile PATH")
    if textfile and not once and interval < 1:
        raise UsageError("--interval must be at least 1 s when rewriting --textfile")
    host, port = parse_listen(listen)
    if trace and once:
        raise UsageError("--trace counts while the exporter runs: not with --once")
    collector = RebindCollector(watches, dests, interval=0.0 if textfile else interval)
    registry = registry_with(collector, process=not textfile)
    counters = _failure_counters(watches, dests) if trace else None
    if counters is not None:
        registry.register(counters)
    try:
        if textfile:
            return _textfile(registry, textfile, interval, once)
        return _serve(registry, host, port)
    finally:
        if counters is not None:
            counters.close()


def _failure_counters(watches: list[Watch], dests: list[Dest]) -> FailureCounters:
    """The registration hook of exporter/failures.py (off unless --trace: a root exporter then
    exports series an unprivileged one cannot; where tracing cannot run, exit 3)."""
    if not (watches or dests):
        raise UsageError("--trace counts failures on --watch ports and --dest destinations: name some")
    from rebind.exporter import failures

    return failures.start(watches, dests)


def _need_prometheus_client() -> None:
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        from rebind.errors import EnvironmentProblem

        raise EnvironmentProblem("rebind exporter needs prometheus-client: pip install 'rebind[exporter]'")


def _textfile(registry: CollectorRegistry, path: str, interval: float, once: bool) -> int:
    from rebind.exporter.serve import render, write_atomic

    stop = _stop_event()
    while True:
        write_atomic(path, render(registry))
        if once or stop.wait(interval):
            return 0


def _serve(registry: CollectorRegistry, host: str, port: int) -> int:
    from rebind.exporter.serve import start_http

    server = start_http(registry, host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"rebind exporter: serving http://{shown}:{server.server_address[1]}/metrics", err=True)
    stop = _stop_event()
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


def _stop_event() -> threading.Event:
    """SIGTERM (systemd stop, docker stop) ends the loop cleanly with status 0."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def parse_watches(values: tuple[str, ...]) -> list[Watch]:
    """``PORT``, ``ADDR:PORT`` or ``[V6ADDR]:PORT``, each with an optional ``/udp`` (or ``/tcp``):
    the address a restart of the server binds (default ``0.0.0.0``)."""
    from rebind.exporter.facts import Watch
    from rebind.model.addr import parse_ip, split_host_port
    from rebind.model.records import Proto
    from rebind.model.validate import parse_port

    out: set[Watch] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                raise UsageError(f"--watch {value!r}: empty port ([ADDR:]PORT[/udp][,...])")
            where, _, proto_text = item.partition("/")
            proto_text = proto_text.strip().lower() or "tcp"
            if proto_text not in ("tcp", "udp"):
                raise UsageError(f"--watch {item!r}: protocol must be tcp or udp")
            host, port_text = split_host_port(where, what="--watch", alone="port")
            addr = None if host is None else parse_ip(host, what=f"--watch {item!r}:")
            port = parse_port(port_text or "", what="--watch")
            w = Watch(port, Proto(proto_text)) if addr is None else Watch(port, Proto(proto_text), addr)
            out.add(w)
    if len(out) > MAX_WATCH:
        raise UsageError(f"--watch: at most {MAX_WATCH} ports and addresses (each adds series)")
    return sorted(out, key=lambda w: w.sort_key())


def parse_dests(values: tuple[str, ...]) -> list[Dest]:
    from rebind.exporter.facts import Dest
    from rebind.model.addr import split_host_port
    from rebind.model.validate import parse_port

    out: dict[tuple[IPAddress, int], Dest] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            host, port_text = split_host_port(item, what="--dest", alone="port")
            if not host or port_text is None:
                raise UsageError(f"--dest {item!r}: expected HOST:PORT ([V6ADDR]:PORT for IPv6)")
            port = parse_port(port_text, what="--dest port")
            addr = _resolve(host)
            out.setdefault((addr, port), Dest(addr, port, host))
    if len(out) > MAX_DEST:
        raise UsageError(f"--dest: at most {MAX_DEST} destinations (each adds series)")
    return sorted(out.values(), key=lambda d: d.sort_key())


def _resolve(host: str) -> IPAddress:
    from rebind.kernel.resolver import resolve_host

    return resolve_host(host, what="--dest host")
