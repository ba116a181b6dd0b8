"""`rebind why PORT`'s text: the headline, the blockers with the rule that decides, the notes,
what works right now, the ranked fixes, and the known situations (localhost split-brain,
well-known holders: render/findings.py). `rebind why` prints it; `rebind top`'s why screen
captures it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rebind.render.console import fmt_ms, out, owners_cell
from rebind.render.findings import finding_json, findings_lines, lookalike_json, recognised_json
from rebind.render.sockets import entry_json
from rebind.textsafe import visible

if TYPE_CHECKING:
    from rebind.diagnosis import Attempt, Diagnosis
    from rebind.model.wellknown import Findings


WHY_SCHEMA = "rebind.why/2"


def print_diagnosis(d: Diagnosis, found: Findings | None = None) -> None:
    """Print `why`'s answer. Without ``found`` (top's why screen), the known situations are
    gathered here, without the NodePort search (it runs iptables-save)."""
    if found is None:
        from rebind.kernel.wellknown import findings

        found = findings(d.table.entries, d.request.port, d.request.proto, nat=False)
    con = out()
    for line in [*diagnosis_lines(d, con.esc), *findings_lines(found, con.esc)]:
        con.print(line, nowrap=is_fix_line(line))
    err = out(stderr=True)
    for w in d.table.warnings:
        err.print(f"[yellow]note:[/] {err.esc(w)}")


#: The lines that carry something to paste: shell commands, code lines, a fix with a command.
_FIX_LINE = re.compile(r"^\s*(?:\d+\. )?(?:\$ |Python: |C: |fix: |Then verify: \$ )")


def is_fix_line(line: str) -> bool:
    """A line printed as one line at any terminal width (rich would otherwise wrap it)."""
    return _FIX_LINE.match(line) is not None


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
    from rebind.model.birth import phrase as birth_phrase
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
        if r.birth is not None:
            held += f"  {esc(birth_phrase(r.birth, time.time()))}"
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


def why_json(d: Diagnosis, found: Findings | None = None) -> dict[str, Any]:
    """`rebind why --json` (schema ``rebind.why/2``, docs/json.md)."""
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
