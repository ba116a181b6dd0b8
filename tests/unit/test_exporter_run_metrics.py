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


# ---------------------------------------------------------------------------------------------
# The bounded HTTP server (issue 18 items 2-3): HTTP semantics, the connection cap, the deadline


def _raw(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _closed_by_server(sock: object) -> bool:
    """Blocks until the server closes the connection (EOF or reset), up to the socket timeout."""
    try:
        return sock.recv(1) == b""  # type: ignore[attr-defined,no-any-return]
    except ConnectionResetError:
        return True


def test_http_answers_get_head_and_refuses_the_rest(free_port: int) -> None:
    from rebind.exporter.serve import MetricsServer

    run = RunMetrics()
    srv = MetricsServer(run.registry, "127.0.0.1", free_port)
    try:
        got = _raw(free_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"rebind_run_generation 0.0" in got
        assert b"Connection: close" in got
        head = _raw(free_port, b"HEAD / HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert _raw(free_port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert _raw(free_port, b"GET /x HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
        assert _raw(free_port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert _raw(free_port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000).startswith(b"HTTP/1.1 431")
        only = _raw(free_port, b"GET /metrics?name[]=rebind_run_generation HTTP/1.1\r\n\r\n")
        assert b"rebind_run_generation" in only and b"rebind_run_reloads_total" not in only
    finally:
        srv.server_close()


def test_past_the_cap_the_oldest_idle_connection_is_closed(free_port: int) -> None:
    import socket

    from rebind.exporter.serve import MetricsServer

    srv = MetricsServer(RunMetrics().registry, "127.0.0.1", free_port, max_connections=2, deadline_s=60)
    idle = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", free_port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finished
            idle.append(s)
        # A real scrape still gets through; the oldest idle connection pays for it.
        assert _raw(free_port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert _closed_by_server(idle[0])
        assert srv.connections <= 2
    finally:
        for s in idle:
            s.close()
        srv.server_close()


def test_a_slow_client_is_closed_at_its_deadline(free_port: int) -> None:
    import socket

    from rebind.exporter.serve import MetricsServer

    srv = MetricsServer(RunMetrics().registry, "127.0.0.1", free_port, deadline_s=0.3)
    try:
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as s:
            s.sendall(b"GET /metr")
            assert _closed_by_server(s)
        assert srv.connections == 0
    finally:
        srv.server_close()
