"""`rebind why --connect --json`: one :class:`~rebind.model.connect.ConnectResult` as the
document of schema ``rebind.connect/1`` (docs/json.md), for the CLI and the Python API
(``ConnectDiagnosis.json``)."""

from __future__ import annotations

from typing import Any

from rebind.model.connect import ConnectResult
from rebind.textsafe import visible

CONNECT_SCHEMA = "rebind.connect/1"


def result_json(res: ConnectResult, *, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    r = res.request
    acc = res.accounting
    cap = res.capacity
    return {
        "schema": CONNECT_SCHEMA,
        "request": {
            "proto": r.proto.value,
            "destination": {"addr": str(r.dst), "port": r.dport},
            "source": str(r.src) if r.src is not None else None,
            "bind_before_connect": r.bind_before_connect,
            "bind_address_no_port": r.bind_address_no_port,
            "local_port": r.local_port,
            "reuseaddr": r.reuseaddr,
            "ip_local_port_range": list(r.port_range) if r.port_range else None,
        },
        "verdict": res.outcome.verdict.value,
        "ok": res.outcome.ok,
        "errno": res.outcome.errno_name if not res.outcome.ok else None,
        "stage": res.outcome.stage.value if res.outcome.stage and not res.outcome.ok else None,
        "headline": res.headline,
        "explanation": res.outcome.explanation,
        "notes": list(res.outcome.notes),
        "settings": {
            "ip_local_port_range": list(res.settings.port_range),
            "ip_local_reserved_ports_in_range": sum(
                1 for p in res.settings.reserved if res.effective_range[0] <= p <= res.effective_range[1]
            ),
            "tcp_tw_reuse": res.settings.tw_reuse,
            "tcp_tw_reuse_delay_ms": res.settings.tw_reuse_delay_ms,
            "tcp_timestamps": res.settings.tcp_timestamps,
            "ip_autobind_reuse": res.settings.autobind_reuse,
        },
        "range": {
            "low": res.effective_range[0],
            "high": res.effective_range[1],
            "total": acc.total,
            "usable": acc.usable,
            "by_reason": acc.counts,
            "first_half": {"usable": acc.first_half_usable, "total": acc.first_half_total},
            "ambiguous_sockets": acc.ambiguous,
            "usable_if_ambiguous_were_bound": acc.usable_worst,
            "usable_if_ambiguous_came_from_connect": acc.usable_best,
        },
        "time_wait_to_destination": [
            {
                "local": str(t.holder.socket.local),
                "state": t.holder.socket.state.label,
                "left_ms": t.left_ms,
                "reusable_now": t.reusable,
                "why": t.why,
            }
            for t in res.time_waits
        ],
        "consumers": [
            {
                "pid": c.pid,
                "name": visible(c.name),
                "user": visible(c.user) if c.user else None,
                "cmdline": [visible(a) for a in c.cmdline],
                "to_destination": c.to_destination,
                "by_bind": c.by_bind,
                "other": c.other,
                "unit": c.unit,
            }
            for c in res.consumers
        ],
        "capacity": None
        if cap is None
        else {
            "usable_for_destination": cap.usable_for_destination,
            "time_wait_seconds": cap.time_wait_seconds,
            "sustainable_per_s": round(cap.sustainable_per_s, 3),
            "observed_per_s": None if cap.observed_per_s is None else round(cap.observed_per_s, 3),
            "slow_path": cap.slow_path,
            "used_fraction_first_half": round(cap.used_fraction_first_half, 4),
            "note": cap.note,
        },
        "fixes": [
            {"title": f.title, "why": f.why, "python": f.python, "c": f.c, "command": f.command}
            for f in res.fixes
        ],
        "probe": probe,
    }
