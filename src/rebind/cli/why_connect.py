"""`rebind why --connect HOST:PORT`: would connect() get a local port now, and where the range went.

Exit status: 0 a connect() now would get a local port, 1 it would not (or may not), 2 bad input,
3 missing permission or kernel feature. Without ``--probe`` no packet is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rebind.model.records import process_label
from rebind.textsafe import visible

if TYPE_CHECKING:
    from rebind.cli.render import PlainOut, RichOut
    from rebind.connect_diagnosis import ConnectDiagnosis
    from rebind.model.connect import ConnectResult
    from rebind.model.records import IPAddress

# Accounting rows: (reason value, label), in the order the issue lists them.
ROWS = (
    ("reserved", "reserved (ip_local_reserved_ports)"),
    ("listener", "held by bind(): listeners"),
    ("bound-inactive", "held by bind(): bound, not listening"),
    ("bind-before-connect", "held by bind(): clients that bound their port"),
    ("overlapping-owner", "used on your address (bind(ip, 0) / UDP need an unused port)"),
    ("in-use-to-destination", "in use to this destination"),
    ("time-wait-to-destination", "TIME_WAIT to this destination, not reusable now"),
    ("time-wait-reusable", "TIME_WAIT to this destination, connect() takes it over"),
    ("time-wait-unknown", "TIME_WAIT to this destination, timestamps unknown (worst: no)"),
    ("unknown-origin", "held by clients: bind() or connect()? (worst case: bind())"),
    ("shared", "used by connections elsewhere (shareable)"),
    ("free", "unused"),
)


def run(
    target: str | tuple[str, int],
    *,
    source: str | tuple[IPAddress, int | None] | None,
    bind_before_connect: bool,
    reuseaddr: bool,
    udp: bool,
    as_json: bool,
    with_probe: bool,
) -> int:
    from rebind.connect_diagnosis import diagnose_request, resolve
    from rebind.model.connect import ConnectRequest, parse_source, parse_target

    # Parsed by the click types (cli/params.py: TARGET, SOURCE); text from other callers.
    host, port = parse_target(target) if isinstance(target, str) else target
    src, local_port = (
        (parse_source(source) if isinstance(source, str) else source) if source else (None, None)
    )
    req = ConnectRequest.create(
        resolve(host, udp=udp),
        port,
        src=src,
        proto="udp" if udp else "tcp",
        bind_before_connect=bind_before_connect,
        local_port=local_port,
        reuseaddr=reuseaddr,
    )
    d = diagnose_request(req, with_probe=with_probe)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(d.json())
    else:
        print_connect(d)
    return 0 if d.ok else 1


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.0f}%" if total else ""


def print_connect(d: ConnectDiagnosis) -> None:
    from rebind.cli.render import out

    con = out()
    esc = con.esc
    res = d.result
    style = "bold green" if res.outcome.ok else "bold red"
    con.print(f"[{style}]{esc(res.headline)}[/]")
    r = res.request
    src = f"from {r.src}" if r.src is not None else ""
    sent = "no packet sent: model + socket table" if d.probe is None else "probed: see below"
    con.print(f"  [dim]{esc(r.describe)} {esc(src)} — {sent}[/]")
    con.print(f"\n  {esc(res.outcome.explanation)}")
    for n in res.outcome.notes:
        con.print(f"  [dim]note: {esc(n)}[/]")
    if d.probe is not None:
        p = d.probe
        what = (
            f"got local port {p.local_port}"
            if p.ok
            else f"{p.stage.value if p.stage else ''}() failed: {p.error_name}"
        )
        sent = (
            "one UDP connect(): it binds a port, nothing is sent"
            if r.proto.value == "udp"
            else "one non-blocking connect(), aborted at once with SO_LINGER 0: a SYN and an RST were sent"
        )
        con.print(f"\n[bold]Probe[/] [dim]({sent})[/]")
        con.print(f"  {esc(what)}")
    if d.disagreement:
        con.print(f"[bold red on yellow]MODEL/KERNEL DISAGREEMENT:[/] {esc(d.disagreement)} — please report")
    _print_range(con, res)
    _print_time_waits(con, res)
    _print_consumers(con, res)
    _print_capacity(con, res)
    _print_fixes(con, res)
    err = out(stderr=True)
    for w in d.warnings:
        err.print(f"[yellow]note:[/] {err.esc(w)}")


def _print_range(con: PlainOut | RichOut, res: ConnectResult) -> None:
    acc = res.accounting
    lo, hi = res.effective_range
    p = con.print
    p(f"\n[bold]Where the range went[/] [dim]({lo}-{hi}, {acc.total} ports)[/]")
    for key, label in ROWS:
        n = acc.counts.get(key, 0)
        if n:
            p(f"  {label:<62} {n:>6}  {_pct(n, acc.total):>4}")
    p(f"  {'usable for this connect()':<62} {acc.usable:>6}  {_pct(acc.usable, acc.total):>4}")
    if acc.ambiguous:
        best = "" if acc.usable_best is None else f"; {acc.usable_best} usable if connect() chose them all"
        p(
            f"  [dim]{acc.ambiguous} client socket(s) in the range: inet_diag does not say whether they got "
            f"their port from bind() or connect(); counted as bind(), the worst case{best}[/]"
        )


def _print_time_waits(con: PlainOut | RichOut, res: ConnectResult) -> None:
    from rebind.cli.render import fmt_ms

    tws = res.time_waits
    if not tws:
        return
    p = con.print
    reusable = sum(1 for t in tws if t.reusable)
    unknown = sum(1 for t in tws if t.reusable is None)
    s = res.settings
    p(
        f"\n[bold]TIME_WAIT to this destination[/]: {len(tws)}, {reusable} reusable now"
        + (f", {unknown} unknown (timestamps not readable)" if unknown else "")
        + " "
        f"[dim](tcp_tw_reuse={s.tw_reuse}, tcp_timestamps={s.tcp_timestamps}, "
        f"tcp_tw_reuse_delay={s.tw_reuse_delay_ms} ms)[/]"
    )
    for t in tws[:5]:
        mark = "?" if t.reusable is None else "✓" if t.reusable else "✗"
        left = fmt_ms(t.left_ms) + " left" if t.left_ms is not None else ""
        p(f"  {mark} {t.holder.socket.local} {t.holder.socket.state.label} {left}  [dim]{t.why}[/]")
    if len(tws) > 5:
        p(f"  … {len(tws) - 5} more")


def _print_consumers(con: PlainOut | RichOut, res: ConnectResult) -> None:
    if not res.consumers:
        return
    p = con.print
    esc = con.esc
    p("\n[bold]Who holds ports of the range[/] [dim](ports: to this destination / by bind() / other)[/]")
    for c in res.consumers[:10]:
        cmd = visible(" ".join(c.cmdline) or c.name)[:60]
        user = visible(c.user) if c.user else "?"
        unit = f"  {visible(c.unit)}" if c.unit else ""
        p(
            f"  {c.to_destination:>6} / {c.by_bind:>5} / {'-' if c.other is None else c.other:>5}  "
            f"{esc(process_label(c.name, c.pid))} {esc(user)}  [dim]{esc(cmd)}{esc(unit)}[/]"
        )
    if len(res.consumers) > 10:
        p(f"  … {len(res.consumers) - 10} more processes")
    if any(c.other is None for c in res.consumers):
        p(
            "  [dim]other (-): connections elsewhere not counted, and processes holding only those "
            "not listed: the kernel's bind hash answered for those ports without reading their sockets[/]"
        )


def _print_capacity(con: PlainOut | RichOut, res: ConnectResult) -> None:
    cap = res.capacity
    if cap is None:
        return
    p = con.print
    esc = con.esc
    p("\n[bold]Capacity to this destination[/]")
    p(
        f"  sustainable: {cap.sustainable_per_s:,.1f} new connections/s "
        f"({cap.usable_for_destination} ports / {cap.time_wait_seconds:g} s "
        f"{'tcp_tw_reuse_delay' if cap.time_wait_seconds < 60 else 'TIME_WAIT'})"
    )
    if cap.observed_per_s is not None:
        p(
            f"  observed: {cap.observed_per_s:,.1f} closes/s over the last minute "
            "[dim](TIME_WAIT entries to it / 60 s; client-side closes only)[/]"
        )
    p(f"  [dim]{esc(cap.note)}[/]")


def _print_fixes(con: PlainOut | RichOut, res: ConnectResult) -> None:
    if not res.fixes:
        return
    p = con.print
    esc = con.esc

    def verbatim(text: str) -> None:
        # A line meant to be pasted is never broken by rich's wrapping at the terminal width.
        con.print(text, nowrap=True)

    p("\n[bold]Fixes[/]")
    for i, f in enumerate(res.fixes, 1):
        p(f"  {i}. {esc(f.title)}")
        p(f"     [dim]{esc(f.why)}[/]")
        if f.command:
            verbatim(f"     $ {esc(f.command)}")
        for label, code in (("Python", f.python), ("C", f.c)):
            if code:
                lines = code.splitlines()
                verbatim(f"     {label + ':':<8}{esc(lines[0])}")
                for line in lines[1:]:
                    verbatim(f"     {'':<8}{esc(line)}")


def dispatch(
    spec: object,
    connect: tuple[str, int] | None,
    source: tuple[IPAddress, int | None] | None,
    bind_before_connect: bool,
    reuseaddr: bool,
    udp: bool,
    as_json: bool,
    probe: bool,
) -> int:
    """The hook in `rebind why`: usage checks, then :func:`run`."""
    import click

    if connect is None:
        raise click.UsageError("missing PORT (or --connect HOST:PORT)")
    if spec is not None:
        raise click.UsageError("give either PORT or --connect HOST:PORT, not both")
    return run(
        connect,
        source=source,
        bind_before_connect=bind_before_connect,
        reuseaddr=reuseaddr,
        udp=udp,
        as_json=as_json,
        with_probe=probe,
    )
