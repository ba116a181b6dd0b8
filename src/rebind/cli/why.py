"""`rebind why PORT` (also `rebind PORT`): why bind() fails, what works now, when it frees."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

import click

from rebind.cli.options import BindArgs, bind_args_options
from rebind.cli.params import SOURCE, TARGET

if TYPE_CHECKING:
    from rebind.diagnosis import Diagnosis
    from rebind.model.wellknown import Findings


@click.command(
    epilog="""\b
Examples:
  rebind 8080                       same as: rebind why 8080
  rebind why 8080 --reuseaddr       would a server that sets SO_REUSEADDR start now?
  rebind why 127.0.0.1:5353 --udp
  rebind why 8080 --addr :: --v6only
  rebind why 8080 --addr fe80::1%eth0
  rebind why 8080 --json | jq .verdict
  rebind why --connect 127.0.0.1:5432          can a new connection get a local port now?
  rebind why --connect db:5432 --from 10.0.0.9 --bind-before-connect
  rebind why 53 --udp --check-fix             after applying a printed fix: is the port free now?

\b
Exit status: 0 bindable now, 1 busy (or cannot be bound), 2 usage error.
With --check-fix: 0 the well-known holder is gone and the bind works, 1 not yet.
With --connect: 0 a connect() would get a port, 1 it would not, 3 missing permission.
""",
)
@bind_args_options(port_optional=True, device=True)
@click.option(
    "--connect", type=TARGET, metavar="HOST:PORT", help="Client side: can connect() get a local port?"
)
@click.option(
    "--from", "source", type=SOURCE, metavar="ADDR[:PORT]", help="--connect: bind ADDR (and a fixed PORT)."
)
@click.option("--bind-before-connect", is_flag=True, help="--connect: bind(ADDR, 0) before connect().")
@click.option("--probe", is_flag=True, help="--connect: one real connect(), aborted at once.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema rebind.why/2).")
@click.option(
    "--reload", "reload_check", is_flag=True, help="Would a SO_REUSEPORT hand-off reset queued connections?"
)
@click.option(
    "--check-fix",
    is_flag=True,
    help="After applying a well-known holder's fix: verify it no longer holds PORT and the bind works.",
)
def why(
    bind: BindArgs,
    connect: tuple[str, int] | None,
    source: tuple[IPv4Address | IPv6Address, int | None] | None,
    bind_before_connect: bool,
    probe: bool,
    as_json: bool,
    reload_check: bool = False,
    check_fix: bool = False,
) -> int:
    """Explain why a server cannot bind PORT, what would work right now, and when it frees.

    rebind reads every socket on the port from the kernel (bound-but-not-listening ones too),
    the processes holding them, their SO_REUSEADDR/SO_REUSEPORT flags where it can, applies the
    kernel's bind() and listen() rules, and checks its answer with trial binds (probe sockets
    that bind and close at once, never listening) -- only those that cannot change the kernel's
    answer to any later bind on the port.
    """
    if reload_check:  # issue 13: a separate check, see rebind/cli/why_reload.py
        if bind.spec is None:
            raise click.UsageError("--reload needs a PORT")
        from rebind.cli.why_reload import run_reload_check

        return run_reload_check(bind.spec[1], as_json)
    # A new question dispatches here, before the bind request is built.
    if connect is not None or bind.spec is None:  # the client half: rebind.cli.why_connect
        from rebind.cli.why_connect import dispatch

        return dispatch(
            bind.spec, connect, source, bind_before_connect, bind.reuseaddr, bind.udp, as_json, probe
        )
    from rebind.gcpause import gc_paused

    # The whole answer without the cyclic GC (as kernel/facts.py gathers): a port's ten thousand
    # TIME_WAITs become as many holders, groups and blocker infos, none in a cycle, and the
    # collections they trigger walked them all again (~10 ms of `why 9000`; docs/benchmarks.md).
    with gc_paused():
        return _why_port(bind, as_json, check_fix)


def _why_port(bind: BindArgs, as_json: bool, check_fix: bool) -> int:
    from rebind.diagnosis import diagnose
    from rebind.kernel.wellknown import findings as gather_findings
    from rebind.render.why import print_diagnosis, why_json

    req = bind.request()
    d = diagnose(req)
    # iptables-save already ran for diagnose()'s NAT notes: look for a NodePort Service only when
    # they found a KUBE-NODEPORTS rule (one more run of it on every free port costs ~20 ms).
    nodeport = any("KUBE-NODEPORTS" in n for n in d.notes)
    found = gather_findings(d.table.entries, req.port, req.proto, nat=nodeport)
    if check_fix:
        return _check_fix(d, found, as_json)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(why_json(d, found))
    else:
        print_diagnosis(d, found)
    return 0 if d.bindable else 1


def _check_fix(d: Diagnosis, found: Findings, as_json: bool) -> int:
    """Issue 20: after a well-known holder's fix, the holder is gone and the bind works."""
    from rebind.cli.render import dump_json, out
    from rebind.render.why import why_json

    still = list(found.holders)
    fixed = d.bindable and not still
    if as_json:
        doc = why_json(d, found)
        doc["check_fix"] = {"fixed": fixed, "still_held_by": [r.entry.id for r in still]}
        dump_json(doc)
        return 0 if fixed else 1
    con = out()
    port = f"{d.request.port}/{d.request.proto.value}"
    if fixed:
        con.print(f"[bold green]fixed: no well-known holder on {port}, and {con.esc(d.headline)}[/]")
        return 0
    con.print(f"[bold red]not fixed yet: {con.esc(d.headline)}[/]")
    for r in still:
        con.print(f"  still there: {con.esc(r.lines()[0])}")
    return 1
