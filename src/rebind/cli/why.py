"""`rebind why PORT` (also `rebind PORT`): why bind() fails, what works now, when it frees."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

import click

from rebind.cli.params import ADDRESS, PORT_SPEC

if TYPE_CHECKING:
    from rebind.diagnosis import Diagnosis

WHY_SCHEMA = "rebind.why/1"


@click.command(
    epilog="""\b
Examples:
  rebind 8080                       same as: rebind why 8080
  rebind why 8080 --reuseaddr       would a server that sets SO_REUSEADDR start now?
  rebind why 127.0.0.1:5353 --udp
  rebind why 8080 --addr :: --v6only
  rebind why 8080 --json | jq .verdict

\b
Exit status: 0 bindable now, 1 busy, 2 usage error.
""",
)
@click.argument("spec", type=PORT_SPEC, metavar="[ADDR:]PORT")
@click.option("--addr", type=ADDRESS, default=None, help="Address the server binds (default 0.0.0.0).")
@click.option("--udp", is_flag=True, help="A UDP socket instead of TCP.")
@click.option("--reuseaddr", is_flag=True, help="The server sets SO_REUSEADDR.")
@click.option("--reuseport", is_flag=True, help="The server sets SO_REUSEPORT.")
@click.option("--v6only", is_flag=True, help="IPv6 socket with IPV6_V6ONLY=1.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema rebind.why/1).")
@click.option(
    "--reload", "reload_check", is_flag=True, help="Would a SO_REUSEPORT hand-off reset queued connections?"
)
def why(
    spec: tuple[IPv4Address | IPv6Address | None, int],
    addr: IPv4Address | IPv6Address | None,
    udp: bool,
    reuseaddr: bool,
    reuseport: bool,
    v6only: bool,
    as_json: bool,
    reload_check: bool = False,
) -> int:
    """Explain why a server cannot bind PORT, what would work right now, and when it frees.

    rebind reads every socket on the port from the kernel (bound-but-not-listening ones too),
    the processes holding them, their SO_REUSEADDR/SO_REUSEPORT flags where it can, applies the
    kernel's bind() and listen() rules, and checks its answer with a real trial bind (a probe
    socket that binds and closes at once, never listening).
    """
    if reload_check:  # issue 13: a separate check, see rebind/cli/why_reload.py
        from rebind.cli.why_reload import run_reload_check

        return run_reload_check(spec[1], as_json)
    from rebind.diagnosis import default_request, diagnose
    from rebind.model.records import Proto

    spec_addr, port = spec
    if spec_addr is not None and addr is not None and spec_addr != addr:
        raise click.UsageError(f"two addresses given: {spec_addr} and {addr}")
    address = addr or spec_addr
    if v6only and address is None:
        address = IPv6Address("::")
    if v6only and address is not None and address.version != 6:
        raise click.UsageError("--v6only needs an IPv6 address (e.g. --addr ::)")
    req = default_request(
        port,
        addr=address,
        proto=Proto.UDP if udp else Proto.TCP,
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=True if v6only else None,
    )
    d = diagnose(req)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(why_json(d))
    else:
        print_diagnosis(d)
    return 0 if d.bindable else 1


def why_json(d: Diagnosis) -> dict[str, Any]:
    from rebind.cli.render import entry_json

    r = d.request
    return {
        "schema": WHY_SCHEMA,
        "request": {
            "proto": r.proto.value,
            "addr": str(r.addr),
            "port": r.port,
            "reuseaddr": r.reuseaddr,
            "reuseport": r.reuseport,
            "v6only": r.v6only,
            "uid": r.uid,
        },
        "bindable": d.bindable,
        "verdict": d.verdict,
        "outcome": {
            "verdict": d.outcome.verdict.value,
            "errno": d.outcome.errno,
            "stage": d.outcome.stage.value if d.outcome.stage else None,
        },
        "trial": {"ok": d.trial.ok, "errno": d.trial.errno, "error": d.trial.error_name},
        "disagreement": d.disagreement or None,
        "frees_in_ms": d.frees_in_ms,
        "blockers": [
            {
                "socket": entry_json(b.entry),
                "kind": b.kind.value,
                "stage": b.blocker.stage.value,
                "rule": str(b.blocker.rule),
                "certain": b.blocker.certain,
                "reason": b.blocker.reason,
                "reuseaddr": b.opts.reuseaddr,
                "reuseport": b.opts.reuseport,
                "flags_source": b.opts_source,
            }
            for b in d.blockers
        ],
        "attempts": [
            {
                "label": a.label,
                "reuseaddr": a.request.reuseaddr,
                "reuseport": a.request.reuseport,
                "addr": str(a.request.addr),
                "bind_ok": a.trial.ok,
                "bind_error": a.trial.error_name,
                "predicted": a.outcome.verdict.value,
                "predicted_stage": a.outcome.stage.value if a.outcome.stage else None,
                "works": a.works,
            }
            for a in d.attempts
        ],
        "fixes": [
            {"title": f.title, "why": f.why, "command": f.command, "python": f.python, "c": f.c}
            for f in d.fixes
        ],
    }


def print_diagnosis(d: Diagnosis) -> None:
    from rebind.cli.render import fmt_ms, out, owners_cell

    con = out()
    escape = con.esc
    style = "bold green" if d.bindable else "bold red"
    con.print(f"[{style}]{escape(d.verdict)}[/]")
    if d.disagreement:
        con.print(
            f"[bold red on yellow]MODEL/KERNEL DISAGREEMENT:[/] {escape(d.disagreement)} — please report"
        )
    if d.blockers:
        con.print("\n[bold]Blocking[/]")
        for b in d.blockers:
            if b.kind.value in ("privileged-port", "address-not-local"):
                con.print(f"  • {escape(b.blocker.reason)}")
                continue
            r = b.entry.socket
            remote = "" if r.remote.port == 0 else f" → {r.remote}"
            left = f", {fmt_ms(r.expires_ms)} left" if r.is_mini and r.expires_ms is not None else ""
            own = owners_cell(b.entry.owners)
            flags = _flags(b.opts.reuseaddr, b.opts.reuseport, b.opts_source)
            con.print(
                f"  • {r.proto.value} {r.state.label} {r.local}{remote}{left}"
                + (f"  held by {escape(own)}" if own else "")
                + (f"  [dim]{flags}[/]" if flags else "")
            )
            stage = "" if b.blocker.stage.value == "bind" else " (at listen())"
            sure = "" if b.blocker.certain else " [yellow](depends on a flag nobody can read)[/]"
            con.print(f"    {escape(b.blocker.reason)}{stage}{sure}")
    for note in d.outcome.notes:
        con.print(f"  [dim]note: {escape(note)}[/]")
    if d.attempts and not d.bindable and any(a.trial.ok or a.works for a in d.attempts):
        con.print("\n[bold]What works right now[/] [dim](trial bind for bind(); model for listen())[/]")
        for a in d.attempts:
            mark = "[green]✓[/]" if a.works else "[red]✗[/]"
            if not a.trial.ok:
                detail = f"bind() fails: {a.trial.error_name}"
            elif a.outcome.verdict.value == "fail":
                detail = f"bind() works, {a.outcome.stage or 'bind'}() would fail"
            else:
                detail = "works"
            con.print(f"  {mark} {a.label:<22} {detail}")
    if d.fixes:
        con.print("\n[bold]Fixes[/]")
        for i, f in enumerate(d.fixes, 1):
            con.print(f"  {i}. {escape(f.title)}")
            con.print(f"     [dim]{escape(f.why)}[/]")
            if f.command:
                con.print(f"     $ {escape(f.command)}")
            if f.python:
                con.print(f"     Python: {escape(f.python)}")
            if f.c:
                con.print(f"     C:      {escape(f.c)}")
    err = out(stderr=True)
    for w in d.table.warnings:
        err.print(f"[yellow]note:[/] {err.esc(w)}")


def _flags(reuseaddr: bool | None, reuseport: bool | None, source: str) -> str:
    if reuseaddr is None and reuseport is None:
        return "flags unknown"
    parts = []
    if reuseaddr is not None:
        parts.append(f"SO_REUSEADDR {'on' if reuseaddr else 'off'}")
    if reuseport is not None:
        parts.append(f"SO_REUSEPORT {'on' if reuseport else 'off'}")
    return ", ".join(parts) + ("" if source == "read" else f" ({source})")
