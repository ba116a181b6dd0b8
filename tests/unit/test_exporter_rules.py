"""The shipped alert rules: valid for promtool, and they fire (and stay quiet) as documented.

promtool comes from Debian's `prometheus` package, which .ci/run installs: under
--require-kernel (CI) a missing promtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import importlib.resources
import subprocess
from pathlib import Path

import pytest

from rebind.exporter.facts import Dest, EphemeralRange, Snapshot, Watch
from rebind.exporter.families import families
from rebind.exporter.run_metrics import ReloadResult, RunMetrics
from rebind.exporter.serve import registry_with, render

RULES = Path(str(importlib.resources.files("rebind.exporter") / "rules.yml"))


@pytest.fixture
def promtool(request: pytest.FixtureRequest) -> str:
    from tests.toolcheck import need_tool

    return need_tool("promtool")


def test_rules_ship_with_the_package() -> None:
    assert RULES.is_file()


def test_promtool_check_rules(promtool: str) -> None:
    res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 7 rules found" in res.stdout


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'rebind_port_bindable{{instance="h",job="rebind",port="8080",proto="tcp",addr="0.0.0.0"}}'
        values: '1 0 0 0'
      - series: 'rebind_port_bindable{{instance="h",job="rebind",port="9090",proto="tcp",addr="0.0.0.0"}}'
        values: '1 1 1 1'
      - series: 'rebind_listener_accept_queue{{instance="h",job="rebind",port="8080",addr="0.0.0.0"}}'
        values: '0 103 110 120 128'
      - series: 'rebind_listener_backlog{{instance="h",job="rebind",port="8080",addr="0.0.0.0"}}'
        values: '128 128 128 128 128'
      - series: 'rebind_listener_accept_queue{{instance="h",job="rebind",port="9090",addr="0.0.0.0"}}'
        values: '100 100 100 100 100'
      - series: 'rebind_listener_backlog{{instance="h",job="rebind",port="9090",addr="0.0.0.0"}}'
        values: '4096 4096 4096 4096 4096'
      - series: 'rebind_ephemeral_range_ports{{instance="h",job="rebind"}}'
        values: '1000x10'
      - series: 'rebind_ephemeral_bind_held_ports{{instance="h",job="rebind"}}'
        values: '0x10'
      - series: 'rebind_connect_free_ports{{instance="h",job="rebind",src="10.0.0.1",dst="10.0.0.5",dport="5432"}}'
        values: '99x10'
      - series: 'rebind_connect_free_ports{{instance="h",job="rebind",src="10.0.0.1",dst="10.0.0.6",dport="5432"}}'
        values: '500x10'
      - series: 'rebind_config_warning{{instance="h",job="rebind",kind="server_port_in_ephemeral_range"}}'
        values: '1x20'
      - series: 'rebind_config_warning{{instance="h",job="rebind",kind="ephemeral_range_odd"}}'
        values: '0x20'
      - series: 'rebind_exporter_missing{{instance="h",job="rebind",metric="rebind_port_bindable",reason="so_reuseaddr_unknown"}}'
        values: '1x20'
    alert_rule_test:
      - eval_time: 3m
        alertname: RebindRestartWouldFail
        exp_alerts:
          - exp_labels: {{severity: critical, instance: h, job: rebind, port: "8080", proto: tcp, addr: 0.0.0.0}}
            exp_annotations:
              summary: "Restarting the server on 0.0.0.0:8080/tcp would fail with EADDRINUSE (or rebind cannot tell)"
              description: "Run `rebind why 8080` on h to see what holds the port and how to free it."
      - eval_time: 4m
        alertname: RebindAcceptQueueNearlyFull
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h, job: rebind, port: "8080", addr: 0.0.0.0}}
            exp_annotations:
              summary: "Accept queue of 0.0.0.0:8080 at 128 (>= 80% of its backlog)"
              description: "The server on h is not accepting fast enough; raise its listen() backlog (and net.core.somaxconn) or add workers."
      - eval_time: 6m
        alertname: RebindEphemeralPortsLow
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h, job: rebind, src: 10.0.0.1, dst: 10.0.0.5, dport: "5432"}}
            exp_annotations:
              summary: "10.0.0.1 -> 10.0.0.5:5432: less than 10% of the ephemeral ports left"
              description: "connect() will soon fail with EADDRNOTAVAIL on h: reuse connections, add source addresses or widen net.ipv4.ip_local_port_range."
      - eval_time: 6m
        alertname: RebindEphemeralRangeHeldByBind
        exp_alerts: []
      - eval_time: 11m
        alertname: RebindConfigWarning
        exp_alerts:
          - exp_labels: {{severity: info, instance: h, job: rebind, kind: server_port_in_ephemeral_range}}
            exp_annotations:
              summary: "rebind configuration warning server_port_in_ephemeral_range on h"
              description: "See docs/metrics.md (rebind_config_warning) for what server_port_in_ephemeral_range means and how to fix it."
      - eval_time: 16m
        alertname: RebindExporterMissingMetrics
        exp_alerts:
          - exp_labels: {{severity: info, instance: h, job: rebind, metric: rebind_port_bindable, reason: so_reuseaddr_unknown}}
            exp_annotations:
              summary: "rebind exporter on h cannot (fully) produce rebind_port_bindable (so_reuseaddr_unknown)"
"""


def test_alerts_fire_as_documented(promtool: str, tmp_path: Path) -> None:
    spec = tmp_path / "rules_test.yml"
    spec.write_text(ALERT_TESTS.format(rules=RULES))
    res = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_metrics_on_the_exposition(promtool: str) -> None:
    from ipaddress import IPv4Address

    from rebind.exporter.collector import RebindCollector

    snap = Snapshot(
        watches=(Watch(8080),),
        dests=(Dest(IPv4Address("10.0.0.5"), 5432),),
        ephemeral=EphemeralRange(40000, 40009),
        sources=((Dest(IPv4Address("10.0.0.5"), 5432), IPv4Address("10.0.0.1")),),
    )
    assert families(snap)
    reg = registry_with(RebindCollector([], [], gatherer=lambda: snap), process=False)
    run = RunMetrics()
    run.reload_finished(ReloadResult.OK, 0.3)
    for text in (render(reg), run.render()):
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_dashboard_queries_only_known_metrics() -> None:
    import json
    import re

    from rebind.exporter.families import EXPORTER_METRICS

    doc = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    known = set(EXPORTER_METRICS) | {
        "rebind_port_peer_sockets",
        "rebind_run_reloads_total",
        "rebind_run_generation",
    }
    known |= {f"rebind_run_reload_seconds_{s}" for s in ("bucket", "sum", "count")}
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert exprs
    for e in exprs:
        for name in re.findall(r"\brebind_[a-z_]+", e):
            assert name in known, (name, e)
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def test_rules_query_only_known_metrics() -> None:
    import re

    from rebind.exporter.families import EXPORTER_METRICS

    known = set(EXPORTER_METRICS) | {"rebind_run_reloads_total"}
    exprs = re.findall(r"expr: (.+?)\n\s+(?:for|labels):", RULES.read_text(), re.S)
    assert len(exprs) == 7
    for e in exprs:
        for name in re.findall(r"\brebind_[a-z_]+", e):
            assert name in known, (name, e)
