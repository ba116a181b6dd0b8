"""`rebind free`'s plan and result as the lines people read: printed by `rebind free` and
captured by `rebind top`'s ``f`` key (top/keys.py), so both show the same words.

Every line may carry process-supplied text (names, unix socket paths): it is escaped
(rebind.textsafe.visible) before it reaches the terminal.
"""

from __future__ import annotations

import os
from typing import Any

import click

from rebind.model.diagnosis import fmt_seconds
from rebind.model.free import FreePlan, ObstacleKind, Target, no_owner_reason
from rebind.model.free_result import FreeResult
from rebind.model.records import socket_label
from rebind.model.validate import signal_name
from rebind.render.sockets import socket_json
from rebind.textsafe import visible


def print_plan(plan: FreePlan) -> None:
    where = plan.request.where
    echo(plan.diagnosis.headline)
    echo(f"Plan to free {where}:")
    first = signal_name(plan.signal)
    escalate = "" if first == "SIGKILL" else f", SIGKILL after {plan.grace:g}s"
    for t in plan.targets:
        echo(f"  stop     {describe_target(t)} ({first}{escalate})")
        if t.also_holds:
            echo(f"           {t.label} also holds (stopping it takes these down too):")
            for other in t.also_holds:
                echo(f"             {other}")
    if plan.leaves_orphans and not plan.destroy_blocked:
        echo("  destroy  connections the stopped processes leave behind on the port (TIME_WAIT, FIN_WAIT)")
    elif plan.leaves_orphans:
        echo(f"  wait     connections the stopped processes leave behind ({plan.destroy_blocked})")
    for r in plan.destroy:
        echo(f"  destroy  {socket_label(r)} (SOCK_DESTROY)")
    for r in plan.expiring:
        left = (
            "frees by itself"
            if r.expires_ms is None
            else f"frees in {fmt_seconds(r.expires_ms, compact=True)}"
        )
        echo(f"  wait     {socket_label(r)}: {left} ({plan.destroy_blocked})")
    for x in plan.refused:
        socks = ", ".join(sorted({socket_label(s) for s in x.sockets}))
        echo(f"  leave    {x.label}: {socks}: {x.reason}")
    _print_cannot(plan)
    if plan.obstacles and not plan.worth_acting:
        echo(f"This cannot make {where} bindable: nothing would be done.")
    elif plan.expiring:
        echo(f"After it, {where} is bindable once the leftovers above expire.")
    summary = plan.collateral_summary()
    if summary and plan.worth_acting:
        echo(f"WARNING: stopping {', '.join(t.label for t in plan.targets)} also takes down {summary}.")


def echo(line: str, *, err: bool = False) -> None:
    """One line to stdout (stderr with ``err``), control characters shown as escapes."""
    click.echo(visible(line), err=err)


def describe_target(t: Target) -> str:
    socks = ", ".join(sorted({socket_label(s) for s in t.sockets}))
    fds = ",".join(str(f) for f in sorted(set(t.fds)))
    return f"{t.label} (uid {t.uid}): {socks} via fd {fds}"


def _print_cannot(plan: FreePlan) -> None:
    for o in plan.obstacles:
        if o.kind is ObstacleKind.NOT_A_SOCKET:
            echo(f"  cannot   {o.text}")
    for r in plan.unowned:
        echo(f"  cannot   {socket_label(r)}: no visible owner")
    if plan.unowned:
        echo(f"           ({no_owner_reason(plan.diagnosis.table.scan, os.geteuid())})")


def print_result(result: FreeResult) -> None:
    where = result.plan.request.where
    if result.ok:
        echo(f"{where} is bindable now ({result.after.trial})")
        return
    echo(f"{where} is still not bindable: {result.after.trial}", err=True)
    for line in result.remaining:
        echo(f"  still held: {line}", err=True)


PLAN_SCHEMA = "rebind.free.plan/1"


def plan_json(plan: FreePlan) -> dict[str, Any]:
    """``rebind free --dry-run --json`` (docs/actions.md). Process names are JSON-escaped text."""
    r = plan.request
    return {
        "schema": PLAN_SCHEMA,
        "request": {"proto": r.proto.value, "addr": str(r.addr), "port": r.port, "where": r.where},
        "bindable": plan.bindable,
        "worth_acting": plan.worth_acting,
        "exit_code": plan.exit_code,
        "headline": plan.diagnosis.headline,
        "signal": signal_name(plan.signal),
        "grace": plan.grace,
        "stop": [
            {
                "pid": t.pid,
                "start_ticks": t.start_ticks,
                "name": t.name,
                "uid": t.uid,
                "fds": sorted(set(t.fds)),
                "sockets": [socket_json(x) for x in t.sockets],
                "also_holds": [
                    {"proto": o.proto, "state": o.state, "local": o.local, "port": o.port, "count": o.count}
                    for o in t.also_holds
                ],
            }
            for t in plan.targets
        ],
        "also_takes_down": plan.collateral_summary(),
        "destroy": [socket_json(x) for x in plan.destroy],
        "expiring": [socket_json(x) for x in plan.expiring],
        "refused": [
            {
                "pid": x.pid,
                "name": x.name,
                "reason": str(x.reason),
                "sockets": [socket_json(y) for y in x.sockets],
            }
            for x in plan.refused
        ],
        "unowned": [socket_json(x) for x in plan.unowned],
        "obstacles": [
            {"kind": o.kind.value, "text": o.text, "exit_code": o.exit_code} for o in plan.obstacles
        ],
    }
