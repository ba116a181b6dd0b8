"""The known situations `why` adds after its diagnosis (issue 20): the localhost split-brain
note and each well-known holder with its owner's fix, as the lines people read and as JSON.

The localhost object (docs/json.md, "localhost") is carried by ``rebind.why/2`` for its port and
by ``rebind.ls/1`` for every port with a finding; the well-known holders and look-alikes by
``rebind.why/2``. What the findings are, and their words, is the model's
(:mod:`rebind.model.localhost`, :mod:`rebind.model.wellknown`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rebind.model.localhost import Reach, SplitBrain
from rebind.model.records import Family
from rebind.textsafe import visible

if TYPE_CHECKING:  # the catalogue's model: imported where a port has owners (kernel/wellknown.py)
    from rebind.model.findings import Findings
    from rebind.model.wellknown import Lookalike, Recognised


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


def finding_json(f: SplitBrain) -> dict[str, object]:
    def side(r: Reach) -> dict[str, object]:
        return {
            "addr": str(r.addr),
            "refused": r.refused,
            "listeners": [str(e.socket.local) for e in r.listeners],
            "pids": sorted(r.pids),
        }

    def fam(f: Family | None) -> str | None:
        return None if f is None else ("::1" if f is Family.INET6 else "127.0.0.1")

    return {
        "port": f.port,
        "kind": f.kind.value,
        "ipv4": side(f.v4),
        "ipv6": side(f.v6),
        "resolver_order": [fam(x) for x in f.resolution.order],
        "hosts_lines": [
            {"line": h.lineno, "addr": h.addr, "names": list(h.names)} for h in f.resolution.hosts
        ],
        "clients": [{"client": a.client, "reaches": fam(a.reaches)} for a in f.audiences],
        "text": list(f.lines()),
        "fix": f.fix(),
        "commands": list(f.commands()),
    }


def recognised_json(r: Recognised) -> dict[str, object]:
    return {
        "id": r.entry.id,
        "name": r.entry.name,
        "package": r.entry.package or None,
        "port": r.port,
        "proto": r.proto.value,
        "pid": r.pid,
        "unit": r.unit,
        "via": r.via,
        "explain": r.entry.explain,
        "fix_title": r.entry.fix_title,
        "fix": list(r.fix) if r.withheld is None else [],
        "revert": list(r.revert) if r.withheld is None else [],
        "withheld": r.withheld,
    }


def lookalike_json(x: Lookalike) -> dict[str, object]:
    return {"pid": x.pid, "name": x.name, "like": x.entry.id, "reason": x.reason}
