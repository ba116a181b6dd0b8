"""`rebind free PORT`: make PORT bindable again, touching only what blocks it."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click

from rebind.cli.options import BindArgs, bind_options

if TYPE_CHECKING:
    from rebind.actions.free import FreePlan, FreeResult


@click.command(
    epilog="""\b
Examples:
  rebind free 8080 --dry-run        show what would be signalled and destroyed
  rebind free 8080                  ask, then stop the holders and destroy leftovers
  rebind free 8080 --yes --grace 2  for scripts: SIGTERM, SIGKILL after 2 s
  rebind free 5353 --udp --signal INT
  rebind free 8080 --dry-run --json the plan as JSON (schema rebind.free.plan/1)

\b
Only sockets that block this bind are touched: never a process that merely has a connection
to the port, never rebind itself, its ancestors or PID 1; other users' processes only as root
with --force; outgoing connections that happen to use the port only with --outgoing.
Processes are signalled through pidfds opened against the identity seen when planning, and
only while they still hold a blocking socket, so a recycled pid or a process that let go is
never hit. A signal stops the whole process: the plan names every other port and socket each
process holds (another server port, its connections, UDP and unix sockets) before asking.
TIME_WAIT leftovers are destroyed with SOCK_DESTROY (root, Linux 6.0+); otherwise
rebind says when they expire. When the port cannot be freed this way (a refused holder, an
owner nobody can see, a privileged port, an address that is not local) nothing is done.
\b
Exit status: 0 bindable now (--dry-run: the plan would make it so); 1 still not bindable,
declined, or held by an owner no process here shows; 2 usage error, no --yes without a
terminal, or an address that cannot be bound; 3 missing permission or kernel feature
(CAP_NET_ADMIN for SOCK_DESTROY, unreadable fd tables, a privileged port, a signal not
permitted); 5 refused: held by a process rebind will not signal.
""",
)
@bind_options
@click.option(
    "--signal", "sig", default="TERM", show_default=True, help="First signal to send (name or number)."
)
@click.option(
    "--grace",
    default="5",
    show_default=True,
    metavar="SECONDS",
    help="How long to wait after the first signal before SIGKILL.",
)
@click.option("-y", "--yes", is_flag=True, help="Act without asking (needed when not on a terminal).")
@click.option("-n", "--dry-run", is_flag=True, help="Print the plan and do nothing.")
@click.option("--force", is_flag=True, help="As root: also signal other users' processes.")
@click.option("--outgoing", is_flag=True, help="Also stop owners of outgoing connections using the port.")
@click.option(
    "--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON (schema rebind.free.plan/1)."
)
def free(
    bind: BindArgs,
    sig: str,
    grace: str,
    yes: bool,
    dry_run: bool,
    force: bool,
    outgoing: bool,
    as_json: bool,
) -> int:
    """Make PORT bindable: stop the processes holding it, destroy TIME_WAIT leftovers, verify."""
    from rebind.actions.common import where
    from rebind.actions.free import add_collateral, execute_plan, make_plan, parse_signal
    from rebind.diagnosis import diagnose
    from rebind.model.validate import parse_seconds

    if as_json and not dry_run:
        raise click.UsageError("--json prints the plan: use it with --dry-run")
    req = bind.request()
    signal = parse_signal(sig)  # UsageError: exit 2 before anything is read
    seconds = parse_seconds(grace, what="--grace")
    plan = add_collateral(
        make_plan(diagnose(req), signal=signal, grace=seconds, force=force, outgoing=outgoing)
    )
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(plan_json(plan))
        return plan.exit_code
    if plan.bindable:
        _echo(f"{where(req)} is already bindable; nothing to do")
        return 0
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if plan.worth_acting and not (yes or dry_run or interactive):
        raise click.UsageError(
            "refusing to act without confirmation: not a terminal; "
            "pass --yes to act (or --dry-run to see the plan)"
        )
    print_plan(plan)
    if dry_run:
        return plan.exit_code
    if not plan.worth_acting:
        why = plan.obstacles[0].text if plan.obstacles else "nothing rebind may do frees it"
        _echo(f"rebind cannot free {where(req)}: {why}; nothing done", err=True)
        return plan.exit_code or 1
    if not yes and not click.confirm("Proceed?", default=False):
        _echo("nothing done")
        return 1
    result = execute_plan(plan, on_event=lambda msg: _echo(f"  {msg}"))
    print_result(result)
    return result.exit_code


def _echo(line: str, *, err: bool = False) -> None:
    """Every line may carry process-supplied text (names, cmdlines): control characters are shown
    as escapes, never sent to the terminal."""
    from rebind.textsafe import visible

    click.echo(visible(line), err=err)


def print_plan(plan: FreePlan) -> None:
    from rebind.actions.common import socket_label, where
    from rebind.actions.free import ObstacleKind, describe_target, no_owner_reason, signal_name
    from rebind.cli.render import fmt_ms

    _echo(plan.diagnosis.headline)
    _echo(f"Plan to free {where(plan.request)}:")
    escalate = "" if signal_name(plan.signal) == "SIGKILL" else f", SIGKILL after {plan.grace:g}s"
    for t in plan.targets:
        _echo(f"  stop     {describe_target(t)} ({signal_name(plan.signal)}{escalate})")
        if t.also_holds:
            _echo(f"           {t.label} also holds (stopping it takes these down too):")
            for other in t.also_holds:
                _echo(f"             {other}")
    if plan.leaves_orphans and not plan.destroy_blocked:
        _echo("  destroy  connections the stopped processes leave behind on the port (TIME_WAIT, FIN_WAIT)")
    elif plan.leaves_orphans:
        _echo(f"  wait     connections the stopped processes leave behind ({plan.destroy_blocked})")
    for r in plan.destroy:
        _echo(f"  destroy  {socket_label(r)} (SOCK_DESTROY)")
    for r in plan.expiring:
        left = f"frees in {fmt_ms(r.expires_ms)}" if r.expires_ms is not None else "frees by itself"
        _echo(f"  wait     {socket_label(r)}: {left} ({plan.destroy_blocked})")
    for x in plan.refused:
        socks = ", ".join(sorted({socket_label(s) for s in x.sockets}))
        _echo(f"  leave    {x.label}: {socks}: {x.reason}")
    for o in plan.obstacles:
        if o.kind is ObstacleKind.NOT_A_SOCKET:
            _echo(f"  cannot   {o.text}")
    for r in plan.unowned:
        _echo(f"  cannot   {socket_label(r)}: no visible owner")
    if plan.unowned:
        _echo(f"           ({no_owner_reason(plan.diagnosis.table.scan, os.geteuid())})")
    if plan.obstacles and not plan.worth_acting:
        _echo(f"This cannot make {where(plan.request)} bindable: nothing would be done.")
    elif plan.expiring:
        _echo(f"After it, {where(plan.request)} is bindable once the leftovers above expire.")
    summary = plan.collateral_summary()
    if summary and plan.worth_acting:
        _echo(f"WARNING: stopping {', '.join(t.label for t in plan.targets)} also takes down {summary}.")


PLAN_SCHEMA = "rebind.free.plan/1"


def plan_json(plan: FreePlan) -> dict[str, Any]:
    """``rebind free --dry-run --json`` (docs/actions.md). Process names are JSON-escaped text."""
    from rebind.actions.common import where
    from rebind.actions.free import signal_name
    from rebind.cli.render import socket_json

    r = plan.request
    return {
        "schema": PLAN_SCHEMA,
        "request": {"proto": r.proto.value, "addr": str(r.addr), "port": r.port, "where": where(r)},
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


def print_result(result: FreeResult) -> None:
    from rebind.actions.common import where

    target = where(result.plan.request)
    if result.ok:
        _echo(f"{target} is bindable now ({result.after.trial})")
        return
    _echo(f"{target} is still not bindable: {result.after.trial}", err=True)
    for line in result.remaining:
        _echo(f"  still held: {line}", err=True)
