"""`rebind free PORT`: make PORT bindable again, touching only what blocks it."""

from __future__ import annotations

import sys
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

import click

from rebind.cli.wait import Spec, bind_options, request_from

if TYPE_CHECKING:
    from rebind.actions.free import FreePlan, FreeResult


@click.command(
    epilog="""\b
Examples:
  rebind free 8080 --dry-run        show what would be signalled and destroyed
  rebind free 8080                  ask, then stop the holders and destroy leftovers
  rebind free 8080 --yes --grace 2  for scripts: SIGTERM, SIGKILL after 2 s
  rebind free 5353 --udp --signal INT

\b
Only sockets that block this bind are touched: never a process that merely has a connection
to the port, never rebind itself, its ancestors or PID 1; other users' processes only as root
with --force; outgoing connections that happen to use the port only with --outgoing.
Processes are signalled through pidfds opened against the identity seen when planning, so a
recycled pid is never hit. TIME_WAIT leftovers are destroyed with SOCK_DESTROY (root, Linux
6.0+); otherwise rebind says when they expire.
Exit status: 0 bindable now, 1 still not bindable (or declined), 2 usage error or refused.
""",
)
@bind_options
@click.option(
    "--signal", "sig", default="TERM", show_default=True, help="First signal to send (name or number)."
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait after the first signal before SIGKILL.",
)
@click.option("-y", "--yes", is_flag=True, help="Act without asking (needed when not on a terminal).")
@click.option("-n", "--dry-run", is_flag=True, help="Print the plan and do nothing.")
@click.option("--force", is_flag=True, help="As root: also signal other users' processes.")
@click.option("--outgoing", is_flag=True, help="Also stop owners of outgoing connections using the port.")
def free(
    spec: Spec,
    addr: IPv4Address | IPv6Address | None,
    udp: bool,
    reuseaddr: bool,
    reuseport: bool,
    v6only: bool,
    sig: str,
    grace: float,
    yes: bool,
    dry_run: bool,
    force: bool,
    outgoing: bool,
) -> int:
    """Make PORT bindable: stop the processes holding it, destroy TIME_WAIT leftovers, verify."""
    from rebind.actions.common import where
    from rebind.actions.free import execute_plan, make_plan, parse_signal
    from rebind.diagnosis import diagnose

    req = request_from(spec, addr, udp, reuseaddr, reuseport, v6only)
    try:
        signal = parse_signal(sig)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--signal") from None
    plan = make_plan(diagnose(req), signal=signal, grace=grace, force=force, outgoing=outgoing)
    if plan.bindable:
        click.echo(f"{where(req)} is already bindable; nothing to do")
        return 0
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if plan.has_actions and not (yes or dry_run or interactive):
        raise click.UsageError(
            "refusing to act without confirmation: not a terminal; "
            "pass --yes to act (or --dry-run to see the plan)"
        )
    print_plan(plan)
    if dry_run:
        return 0
    if not plan.has_actions:
        click.echo(f"nothing rebind may do frees {where(req)}")
        return 1
    if not yes and not click.confirm("Proceed?", default=False):
        click.echo("nothing done")
        return 1
    result = execute_plan(plan, on_event=lambda msg: click.echo(f"  {msg}"))
    print_result(result)
    return 0 if result.ok else 1


def print_plan(plan: FreePlan) -> None:
    from rebind.actions.common import socket_label, where
    from rebind.actions.free import describe_target, signal_name
    from rebind.cli.render import fmt_ms

    click.echo(plan.diagnosis.headline)
    click.echo(f"Plan to free {where(plan.request)}:")
    escalate = "" if signal_name(plan.signal) == "SIGKILL" else f", SIGKILL after {plan.grace:g}s"
    for t in plan.targets:
        click.echo(f"  stop     {describe_target(t)} ({signal_name(plan.signal)}{escalate})")
    if plan.leaves_orphans and not plan.destroy_blocked:
        click.echo(
            "  destroy  connections the stopped processes leave behind on the port (TIME_WAIT, FIN_WAIT)"
        )
    for r in plan.destroy:
        click.echo(f"  destroy  {socket_label(r)} (SOCK_DESTROY)")
    for r in plan.expiring:
        left = f"frees in {fmt_ms(r.expires_ms)}" if r.expires_ms is not None else "frees by itself"
        click.echo(f"  wait     {socket_label(r)}: {left} ({plan.destroy_blocked})")
    for x in plan.refused:
        socks = ", ".join(sorted({socket_label(s) for s in x.sockets}))
        click.echo(f"  leave    {x.label}: {socks}: {x.reason}")
    for r in plan.unowned:
        click.echo(f"  leave    {socket_label(r)}: no visible owner (another user's process, without root?)")


def print_result(result: FreeResult) -> None:
    from rebind.actions.common import where

    target = where(result.plan.request)
    if result.ok:
        click.echo(f"{target} is bindable now ({result.after.trial})")
        return
    click.echo(f"{target} is still not bindable: {result.after.trial}", err=True)
    for line in result.remaining:
        click.echo(f"  still held: {line}", err=True)
