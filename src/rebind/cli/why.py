"""`rebind why PORT` (also `rebind PORT`): why bind() fails, what works now, when it frees."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

import click

from rebind.cli.options import Spec, bind_options_port_optional, device_options, request_from
from rebind.cli.params import SOURCE, TARGET
from rebind.textsafe import visible

if TYPE_CHECKING:
    from rebind.diagnosis import Attempt, Diagnosis
    from rebind.model.wellknown import Findings

WHY_SCHEMA = "rebind.why/2"


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
@bind_options_port_optional
@device_options
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
    spec: Spec | None,
    addr: IPv4Address | IPv6Address | None,
    udp: bool,
    reuseaddr: bool,
    reuseport: bool,
    v6only: bool | None,
    device: str | None,
    freebind: bool,
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
        if spec is None:
            raise click.UsageError("--reload needs a PORT")
        from rebind.cli.why_reload import run_reload_check

        return run_reload_check(spec[1], as_json)
    # A new question dispatches here, before the bind request is built.
    if connect is not None or spec is None:  # the client half: rebind.cli.why_connect
        from rebind.cli.why_connect import dispatch

        return dispatch(spec, connect, source, bind_before_connect, reuseaddr, udp, as_json, probe)
    from rebind.diagnosis import diagnose
    from rebind.kernel.wellknown import findings as gather_findings

    req = request_from(spec, addr, udp, reuseaddr, reuseport, v6only, device=device, freebind=freebind)
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


def why_json(d: Diagnosis, found: Findings | None = None) -> dict[str, Any]:
    from rebind.cli.render import entry_json
    from rebind.model.localhost import finding_json
    from rebind.model.wellknown import lookalike_json, recognised_json

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
            "ifindex": r.ifindex,
            "freebind": r.freebind,
            "uid": r.uid,
        },
        "bindable": d.bindable,
        "status": d.verdict.value,
        "verdict": d.headline,
        "outcome": {
            "verdict": d.outcome.verdict.value,
            "errno": d.outcome.errno,
            "stage": d.outcome.stage.value if d.outcome.stage else None,
        },
        "trial": None
        if d.trial is None
        else {"ok": d.trial.ok, "errno": d.trial.errno, "error": d.trial.error_name},
        "disagreement": d.disagreement.text if d.disagreement else None,
        "explanation": d.disagreement.explanation or None if d.disagreement else None,
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
                "flags_source": b.provenance.value,
                "owners_seen": b.owners.value,
            }
            for b in d.blockers
        ],
        "attempts": [
            {
                "label": a.label,
                "reuseaddr": a.request.reuseaddr,
                "reuseport": a.request.reuseport,
                "addr": str(a.request.addr),
                "tried": a.trial is not None,
                "bind_ok": a.trial.ok if a.trial is not None else None,
                "bind_error": a.trial.error_name if a.trial is not None else None,
                "predicted": a.outcome.verdict.value,
                "predicted_stage": a.outcome.stage.value if a.outcome.stage else None,
                "works": a.works,
            }
            for a in d.attempts
        ],
        "notes": list(d.notes),
        "fixes": [
            {"title": f.title, "why": f.why, "command": f.command, "python": f.python, "c": f.c}
            for f in d.fixes
        ],
        # issue 20 (additive): localhost split-brain and well-known holders with their owners' fix
        "localhost": finding_json(found.localhost) if found and found.localhost else None,
        "wellknown": [recognised_json(x) for x in found.holders] if found else [],
        "lookalikes": [lookalike_json(x) for x in found.lookalikes] if found else [],
    }


def print_diagnosis(d: Diagnosis, found: Findings | None = None) -> None:
    """Print `why`'s answer. Without ``found`` (top's why screen), the known situations are
    gathered here, without the NodePort search (it runs iptables-save)."""
    from rebind.cli.render import out

    if found is None:
        from rebind.kernel.wellknown import findings

        found = findings(d.table.entries, d.request.port, d.request.proto, nat=False)
    con = out()
    for line in diagnosis_lines(d, con.esc):
        con.print(line)
    for line in findings_lines(found, con.esc):
        con.print(line)
    err = out(stderr=True)
    for w in d.table.warnings:
        err.print(f"[yellow]note:[/] {err.esc(w)}")


def diagnosis_lines(d: Diagnosis, esc_markup: Callable[[str], str] | None = None) -> list[str]:
    """Every line `rebind why` prints, as markup for ``render.out()``. Every piece of text goes
    through textsafe.visible first (process names, users and command lines are hostile: control
    characters shown as escapes), then ``esc_markup`` (rich escaping; identity for plain output).
    """
    raw = esc_markup or (lambda t: t)

    def esc(text: str) -> str:
        return raw(visible(text))

    style = "bold green" if d.bindable else "bold red"
    lines = [f"[{style}]{esc(d.headline)}[/]"]
    if d.disagreement is not None:
        lines += _disagreement_lines(d, esc)
    lines += _blocker_lines(d, esc)
    for note in d.notes:
        lines.append(f"  [dim]note: {esc(note)}[/]")
    lines += _attempt_lines(d, esc)
    if d.fixes:
        lines.append("\n[bold]Fixes[/]")
        for i, f in enumerate(d.fixes, 1):
            lines.append(f"  {i}. {esc(f.title)}")
            lines.append(f"     [dim]{esc(f.why)}[/]")
            if f.command:
                lines.append(f"     $ {esc(f.command)}")
            if f.python:
                lines.append(f"     Python: {esc(f.python)}")
            if f.c:
                lines.append(f"     C:      {esc(f.c)}")
    return lines


def findings_lines(found: Findings, esc_markup: Callable[[str], str] | None = None) -> list[str]:
    """Issue 20: the localhost split-brain note and each well-known holder's own fix, as exact
    shell lines (safe to paste: every value in them is validated and shell-quoted)."""
    raw = esc_markup or (lambda t: t)

    def esc(text: str) -> str:
        return raw(visible(text))

    lines: list[str] = []
    if found.localhost is not None:
        f = found.localhost
        head, *rest = f.lines()
        lines.append(f"\n[bold yellow]localhost:[/] {esc(head)}")
        lines += [f"  [dim]{esc(x)}[/]" for x in rest]
        lines.append(f"  fix: {esc(f.fix())}")
        lines += [f"    $ {esc(c)}" for c in f.commands()]
    for x in found.lookalikes:
        lines.append(f"\n[yellow]note:[/] {esc(x.line())}")
    for r in found.holders:
        what, explain = r.lines()
        lines.append(f"\n[bold]Well-known holder:[/] {esc(what)}")
        lines.append(f"  [dim]{esc(explain)}[/]")
        if r.withheld is not None:
            lines.append(f"  {esc(r.withheld)}")
            continue
        if r.fix:
            lines.append(f"  [bold]Its owner's fix[/] ({esc(r.entry.fix_title)}):")
            lines += [f"    $ {esc(c)}" for c in r.fix]
        if r.revert:
            lines.append("  To undo it:")
            lines += [f"    $ {esc(c)}" for c in r.revert]
        if r.fix:
            port = f"{r.port}" + (" --udp" if r.proto.value == "udp" else "")
            lines.append(f"  Then verify: $ rebind why {port} --check-fix")
    return lines


def _disagreement_lines(d: Diagnosis, esc: Callable[[str], str]) -> list[str]:
    dis = d.disagreement
    assert dis is not None
    if dis.is_bug:
        return [f"[bold red on yellow]MODEL/KERNEL DISAGREEMENT:[/] {esc(dis.text)} — please report"]
    return [
        f"[yellow]The kernel's answer wins:[/] {esc(dis.text)}.",
        f"  [dim]What explains it: {esc(dis.explanation)}.[/]",
    ]


def _blocker_lines(d: Diagnosis, esc: Callable[[str], str]) -> list[str]:
    from rebind.cli.render import fmt_ms, owners_cell
    from rebind.model.diagnosis import NO_SOCKET_KINDS

    if not d.blockers:
        return []
    lines = ["\n[bold]Blocking[/]"]
    shown: set[int] = set()
    for b in d.blockers:
        if b.kind in NO_SOCKET_KINDS:
            lines.append(f"  • {esc(b.blocker.reason)}")
            continue
        if id(b.blocker) in shown:
            continue  # a group of identical leftovers: one line and the count
        shown.add(id(b.blocker))
        r = b.entry.socket
        remote = "" if r.remote.port == 0 else f" → {r.remote}"
        if b.group > 1:
            remote = f" → {b.group} peers" if r.remote.port else f" ({b.group} sockets)"
        left = f", {fmt_ms(r.expires_ms)} left" if r.is_mini and r.expires_ms is not None else ""
        own = owners_cell(b.entry.owners)
        flags = _flags(b.opts.reuseaddr, b.opts.reuseport, b.provenance.value)
        held = f"  held by {esc(own)}" if own else _hidden(b.owners.value)
        lines.append(
            f"  • {r.proto.value} {r.state.label} {r.local}{remote}{left}{held}"
            + (f"  [dim]{esc(flags)}[/]" if flags else "")
        )
        stage = "" if b.blocker.stage.value == "bind" else " (at listen())"
        sure = "" if b.blocker.certain else " [yellow](depends on a flag nobody can read)[/]"
        lines.append(f"    {esc(b.blocker.reason)}{stage}{sure}")
    for note in d.outcome.notes:
        lines.append(f"  [dim]note: {esc(note)}[/]")
    return lines


def _hidden(view: str) -> str:
    if view == "outside-pid-namespace":
        return "  held by a process outside this PID namespace"
    if view == "unknown":
        return "  owner not visible (run as root)"
    return ""


def _attempt_lines(d: Diagnosis, esc: Callable[[str], str]) -> list[str]:
    if d.bindable or not any(a.works for a in d.attempts):
        return []
    lines = ["\n[bold]What works right now[/] [dim](kernel trial where harmless; model otherwise)[/]"]
    for a in d.attempts:
        mark = "[green]✓[/]" if a.works else "[red]✗[/]"
        lines.append(f"  {mark} {esc(a.label):<36} {attempt_detail(a)}")
    return lines


def attempt_detail(a: Attempt) -> str:
    if a.trial is not None and not a.trial.ok:
        return f"bind() fails: {a.trial.error_name}"
    verdict = a.outcome.verdict.value
    stage = a.outcome.stage.value if a.outcome.stage else "bind"
    guess = "" if a.trial is not None else " (predicted)"
    if verdict == "fail" and stage == "listen":
        return f"bind() works, listen() would fail{guess}"
    if verdict == "fail" and a.trial is None:
        return "bind() would fail (predicted)"
    if verdict == "depends" and a.trial is None:
        return "depends on a flag nobody can read"
    return f"works{guess}"


def _flags(reuseaddr: bool | None, reuseport: bool | None, source: str) -> str:
    if reuseaddr is None and reuseport is None:
        return "flags unknown"
    parts = []
    if reuseaddr is not None:
        parts.append(f"SO_REUSEADDR {'on' if reuseaddr else 'off'}")
    if reuseport is not None:
        parts.append(f"SO_REUSEPORT {'on' if reuseport else 'off'}")
    return ", ".join(parts) + ("" if source == "read" else f" ({source})")
