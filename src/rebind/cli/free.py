"""`rebind free PORT`: make PORT bindable again, touching only what blocks it.

The plan and the result are worded by ``render/free.py`` (which `rebind top` shares); the plan
as JSON (``--dry-run --json``) is here."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from rebind.cli.options import bind_request_options
from rebind.cli.params import SECONDS

if TYPE_CHECKING:
    from rebind.model.request import BindRequest


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
@bind_request_options
@click.option(
    "--signal", "sig", default="TERM", show_default=True, help="First signal to send (name or number)."
)
@click.option(
    "--grace",
    type=SECONDS,
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
    req: BindRequest,
    sig: str,
    grace: float,
    yes: bool,
    dry_run: bool,
    force: bool,
    outgoing: bool,
    as_json: bool,
) -> int:
    """Make PORT bindable: stop the processes holding it, destroy TIME_WAIT leftovers, verify."""
    from rebind.actions.free import execute_plan, plan_free
    from rebind.model.validate import parse_signal
    from rebind.render.free import echo, plan_json, print_plan, print_result

    if as_json and not dry_run:
        raise click.UsageError("--json prints the plan: use it with --dry-run")
    signal = parse_signal(sig)  # UsageError: exit 2 before anything is read
    plan = plan_free(req, signal=signal, grace=grace, force=force, outgoing=outgoing)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(plan_json(plan))
        return plan.exit_code
    if plan.bindable:
        echo(f"{req.where} is already bindable; nothing to do")
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
        echo(f"rebind cannot free {req.where}: {why}; nothing done", err=True)
        return plan.exit_code or 1
    if not yes and not click.confirm("Proceed?", default=False):
        echo("nothing done")
        return 1
    result = execute_plan(plan, on_event=lambda msg: echo(f"  {msg}"))
    print_result(result)
    return result.exit_code
