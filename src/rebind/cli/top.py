"""`rebind top [PORT...]`: a live, full-screen view of ports (Textual, imported only here)."""

from __future__ import annotations

import sys

import click

from rebind.cli.params import SecondsType

NOT_A_TERMINAL = (
    "rebind top needs a terminal (stdout is not one); for scripts use `rebind ls [PORT...]` "
    "or `rebind ls --json`"
)


@click.command(
    epilog="""\b
Examples:
  rebind top                    every listening or bound port
  rebind top 8080 8443          these ports: connections, TIME_WAIT countdowns, queues
  rebind top 8080 --record ports.jsonl --interval 2
  rebind history ports.jsonl 8080

\b
Keys: w why, f free (shows the plan, asks before signalling), W wait until bindable,
r reload (a port served by `rebind run --control`), / filter, Esc clear filter, q quit.
Column bind: ✓ a plain bind()+listen() of 0.0.0.0:PORT works now, ✗ it does not, ✓ra only with
SO_REUSEADDR, ? depends on flags the kernel does not report. Judged by rebind's conflict model
over the socket table: watching never creates a socket. Details: docs/top.md.
Exit status: 0 on quit, 2 usage error (e.g. not a terminal), 3 missing permission or feature.
""",
)
@click.argument("ports", nargs=-1, metavar="[PORT]...")
@click.option(
    "--all", "all_ports", is_flag=True, help="Also every listening or bound port (default without PORT)."
)
@click.option(
    "--interval",
    type=SecondsType(0.2, maximum=3600),
    default="1",
    metavar="SECONDS",
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--record",
    metavar="FILE",
    help="Append events (ports appearing/disappearing, owner changes) to FILE as JSON lines.",
)
@click.option(
    "--record-max",
    default="32M",
    metavar="SIZE",
    show_default=True,
    help="Rotate the --record FILE to FILE.1 when it would grow past SIZE (64K-1T).",
)
@click.option("--no-owners", is_flag=True, help="Skip the owner scan (cheaper; no process names).")
def top(
    ports: tuple[str, ...],
    all_ports: bool,
    interval: float,
    record: str | None,
    record_max: str,
    no_owners: bool,
) -> int:
    """Watch ports live: each socket's state, TIME_WAIT time left, accept queues, SO_REUSEPORT
    groups, owners, and whether a bind would succeed now; act with one key."""
    from rebind.errors import UsageError
    from rebind.model.validate import parse_port

    plist = [parse_port(p, what="PORT") for p in ports]
    from rebind.top.record import parse_size

    max_bytes = parse_size(record_max, what="--record-max")
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise UsageError(NOT_A_TERMINAL)
    from rebind.top.record import Recorder
    from rebind.top.sampler import Sampler

    sampler = Sampler(plist, all_ports=all_ports, owners=not no_owners, interval=interval)
    recorder = Recorder(record, max_bytes) if record else None
    try:
        from rebind.top.app import TopApp

        code = TopApp(sampler, interval, recorder).run()
    finally:
        if recorder is not None:
            recorder.close()
    return code or 0
