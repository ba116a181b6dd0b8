"""Metrics of `rebind run --metrics`: the hook API the supervisor calls."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rebind.errors import UsageError
from rebind.exporter.run_metrics import ReloadResult, RunMetrics


def _samples(run: RunMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(run.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_result_starts_at_zero_and_counts() -> None:
    run = RunMetrics()
    s = _samples(run)
    for r in ReloadResult:
        assert s[("rebind_run_reloads_total", (("result", r.value),))] == 0
    assert s[("rebind_run_generation", ())] == 0
    run.reload_finished(ReloadResult.OK, 0.2)
    run.reload_finished("not_ready_in_time", 30.0)
    run.generation(3)
    s = _samples(run)
    assert s[("rebind_run_reloads_total", (("result", "ok"),))] == 1
    assert s[("rebind_run_reloads_total", (("result", "not_ready_in_time"),))] == 1
    assert s[("rebind_run_reload_seconds_count", ())] == 2
    assert s[("rebind_run_reload_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("rebind_run_generation", ())] == 3


def test_unknown_result_is_a_bug_not_a_new_series() -> None:
    with pytest.raises(ValueError):
        RunMetrics().reload_finished("weird", 1.0)


def test_serve_over_http(free_port: int) -> None:
    run = RunMetrics()
    host, port = run.serve(f"127.0.0.1:{free_port}")
    try:
        assert (host, port) == ("127.0.0.1", free_port)
        run.generation(7)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert "rebind_run_generation 7.0" in body
    finally:
        run.close()


def test_serve_rejects_bad_addresses() -> None:
    with pytest.raises(UsageError):
        RunMetrics().serve("localhost:0")
