"""Facts to Prometheus metric families. Pure (no I/O); the names and labels are a contract
documented in docs/metrics.md -- change them only with a new metric name.

Cardinality is bounded by the command line: per watched port a fixed set of states, per watched
address (``--watch [ADDR:]PORT``) one bindable series and the listener series; per ``--dest`` one
series per metric. Nothing here is labelled by an address another user binds, a client port, a
process name, or anything else the scraped machine's users control (peers: top 5 + "other").
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from rebind.exporter.connect_counts import bind_held_ports, connect_counts
from rebind.exporter.facts import OTHER, TOP_PEERS, Missing, Reason, Snapshot
from rebind.exporter.port_stats import config_warnings, frees_in_seconds, listener_groups, state_counts
from rebind.exporter.restart import bindable_value, missing_facts, restart_answers
from rebind.model.records import IPAddress, fmt_addr

#: Every metric this exporter can produce (rebind_run_* come from `rebind run --metrics`).
EXPORTER_METRICS = (
    "rebind_port_bindable",
    "rebind_port_frees_in_seconds",
    "rebind_sockets",
    "rebind_port_peer_sockets",
    "rebind_listener_accept_queue",
    "rebind_listener_backlog",
    "rebind_listener_reuseport_group_size",
    "rebind_connect_free_ports",
    "rebind_connect_timewait",
    "rebind_ephemeral_range_ports",
    "rebind_ephemeral_bind_held_ports",
    "rebind_config_warning",
    "rebind_scrape_duration_seconds",
    "rebind_exporter_missing",
)


def addr_label(a: IPAddress) -> str:
    """The project's one address spelling (IPv4-mapped as ``::ffff:127.0.0.9`` on every Python)."""
    return fmt_addr(a)


def families(snap: Snapshot) -> list[Metric]:
    out: list[Metric] = []
    missing: list[Missing] = []
    out += _server(snap, missing)
    out += _listeners(snap)
    out += _client(snap, missing)
    out += _config(snap)
    out += _self(snap, missing)
    return out


def _server(snap: Snapshot, missing: list[Missing]) -> Iterable[Metric]:
    bindable = GaugeMetricFamily(
        "rebind_port_bindable",
        "1 if the server watched on addr:port, restarting now with the flags it was seen with "
        "(else SO_REUSEADDR), would get its port back; 0 if it would fail with EADDRINUSE, or if "
        "that depends on a fact nobody could read (see rebind_exporter_missing). No trial bind.",
        labels=["port", "proto", "addr"],
    )
    frees = GaugeMetricFamily(
        "rebind_port_frees_in_seconds",
        "Seconds until the last TIME_WAIT/FIN_WAIT2 leftover on the port expires (0: none left).",
        labels=["port", "proto"],
    )
    sockets = GaugeMetricFamily(
        "rebind_sockets",
        "Sockets whose local port is the watched port, by state (lower case; bound_inactive: bound, "
        "not listening).",
        labels=["port", "proto", "state"],
    )
    peers = GaugeMetricFamily(
        "rebind_port_peer_sockets",
        f"TCP connections (any state but listen) on the watched port by remote address: the "
        f'{TOP_PEERS} busiest peers per port, the rest summed as peer="{OTHER}".',
        labels=["port", "peer"],
    )
    if snap.watched is None:
        return []
    for p in snap.peers:
        peers.add_metric([str(p.key.port), p.peer], p.sockets)
    answers = restart_answers(snap)
    for a in answers:
        w = a.watch
        bindable.add_metric([str(w.port), w.proto.value, addr_label(w.addr)], bindable_value(a.judgement))
    missing += missing_facts(answers)
    for key in sorted({w.key for w in snap.watches}):
        port, proto = str(key.port), key.proto.value
        frees.add_metric([port, proto], frees_in_seconds(snap, key))
        for state, n in state_counts(snap, key).items():
            if state == "bound_inactive" and not snap.bound_inactive_visible:
                continue  # unknown, not zero: rebind_exporter_missing says why
            sockets.add_metric([port, proto, state], n)
    return [bindable, frees, sockets, peers]


def _listeners(snap: Snapshot) -> Iterable[Metric]:
    queue = GaugeMetricFamily(
        "rebind_listener_accept_queue",
        "Connections waiting in the accept queue of the fullest listener on addr:port (sk_ack_backlog).",
        labels=["port", "addr"],
    )
    backlog = GaugeMetricFamily(
        "rebind_listener_backlog",
        "The accept-queue limit of that listener (listen() backlog capped by net.core.somaxconn).",
        labels=["port", "addr"],
    )
    group = GaugeMetricFamily(
        "rebind_listener_reuseport_group_size",
        "Listening sockets on addr:port (more than 1: a SO_REUSEPORT group).",
        labels=["port", "addr"],
    )
    if snap.watched is None:
        return []
    for g in listener_groups(snap.watched, snap.watches):
        labels = [str(g.port), addr_label(g.addr)]
        queue.add_metric(labels, g.accept_queue)
        backlog.add_metric(labels, g.backlog)
        group.add_metric(labels, g.size)
    return [queue, backlog, group]


def _client(snap: Snapshot, missing: list[Missing]) -> Iterable[Metric]:
    out: list[Metric] = []
    rng = snap.ephemeral
    if rng is None:
        return out
    size = GaugeMetricFamily(
        "rebind_ephemeral_range_ports",
        "Ports connect() may choose from: ip_local_port_range minus ip_local_reserved_ports.",
    )
    size.add_metric([], rng.size)
    out.append(size)
    if snap.bound_in_range is None:
        return out
    held = bind_held_ports(snap.bound_in_range, rng, snap.bind_held_conn | snap.origins.bind_made)
    held_m = GaugeMetricFamily(
        "rebind_ephemeral_bind_held_ports",
        "Ports of the ephemeral range held by bind() (TCP listeners, bound-inactive sockets and "
        "connections whose port bind() named): connect() skips them for every destination.",
    )
    held_m.add_metric([], len(held))
    out.append(held_m)
    unknown = Missing("rebind_connect_free_ports", Reason.PORT_ORIGIN_UNKNOWN)
    if snap.origins.unknown:  # a lower bound: those ports may be bind-held too
        missing.append(Missing("rebind_ephemeral_bind_held_ports", Reason.PORT_ORIGIN_UNKNOWN))
    if snap.usage is None or not snap.dests:
        return out
    free = GaugeMetricFamily(
        "rebind_connect_free_ports",
        "Ports a TCP connect() from src to dst:dport can take now (range minus reserved, bind-held, "
        "and ports whose 4-tuple is in use or in TIME_WAIT).",
        labels=["src", "dst", "dport"],
    )
    tw = GaugeMetricFamily(
        "rebind_connect_timewait",
        "TIME_WAIT entries from src to dst:dport on ports of the range.",
        labels=["src", "dst", "dport"],
    )
    for dest, src in snap.sources:
        if src is None:
            continue
        c = connect_counts(dest, src, snap.usage, rng, held, snap.origins.unknown)
        labels = [addr_label(src), addr_label(dest.addr), str(dest.port)]
        free.add_metric(labels, c.free)
        if c.undecided and unknown not in missing:
            missing.append(unknown)  # not counted free for want of the fact, never optimistic
        tw.add_metric(labels, c.timewait)
    return [*out, free, tw]


def _config(snap: Snapshot) -> Iterable[Metric]:
    m = GaugeMetricFamily(
        "rebind_config_warning",
        "Configuration that will cause bind or connect failures, by kind (0: fine). See docs/metrics.md.",
        labels=["kind"],
    )
    for kind, n in config_warnings(snap).items():
        m.add_metric([kind.value], n)
    return [m]


def _self(snap: Snapshot, facts: Iterable[Missing] = ()) -> Iterable[Metric]:
    d = GaugeMetricFamily(
        "rebind_scrape_duration_seconds",
        "Wall time the exporter took to gather the facts of this scrape.",
    )
    d.add_metric([], snap.duration_s)
    missing = GaugeMetricFamily(
        "rebind_exporter_missing",
        "1 for each metric this exporter could not produce, and why (e.g. netlink_unavailable, "
        "permission_denied, no_route), or could answer only with 0 for want of a fact "
        "(metric=rebind_port_bindable, reason=so_reuseaddr_unknown, ...).",
        labels=["metric", "reason"],
    )
    for m in sorted({*snap.missing, *facts}):
        missing.add_metric([m.metric, m.reason.value], 1)
    return [d, missing]
