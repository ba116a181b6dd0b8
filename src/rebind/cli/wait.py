"""`rebind wait PORT`: until a bind with these options would succeed (or, with
--until-listening, until something accepts connections on PORT)."""

from __future__ import annotations

import sys
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

import click

from rebind.cli.options import bind_request_options
from rebind.cli.params import SECONDS

if TYPE_CHECKING:
    from rebind.diagnosis import Diagnosis
    from rebind.model.request import BindRequest

__all__ = ["wait"]


@click.command(
    epilog="""\b
Examples:
  rebind wait 8080 && ./server          start once a plain bind of 0.0.0.0:8080 works
  rebind wait 8080 --reuseaddr          ... for a server that sets SO_REUSEADDR
  rebind wait 127.0.0.1:5353 --udp --timeout 30
  rebind wait 8080 --until-listening    until something accepts connections (127.0.0.1 or ::1)

\b
"Bindable" is tested with a real bind() (a probe that never listens), not a connect: a
TIME_WAIT left by the last run blocks a restart although nothing accepts connections.
Without --timeout the wait has no limit (--timeout takes finite seconds, at most 24 days).
Exit status: 0 ready, 1 timed out, 2 usage error or bind() fails for a reason waiting
cannot fix (EINVAL...), 3 bind() needs a permission rebind lacks (EACCES: a port below
ip_unprivileged_port_start without root).
""",
)
@bind_request_options
@click.option(
    "--timeout",
    type=SECONDS,
    default=None,
    metavar="SECONDS",
    help="Give up after this long (exit 1). Default: wait without limit.",
)
@click.option("-q", "--quiet", is_flag=True, help="No output; the exit status says it all.")
@click.option(
    "--until-listening", is_flag=True, help="Wait until something accepts connections on PORT instead."
)
def wait(
    req: BindRequest,
    timeout: float | None,
    quiet: bool,
    until_listening: bool,
) -> int:
    """Wait until binding PORT would succeed: the blockers (TIME_WAIT and friends) are gone.

    On a terminal a countdown follows the blockers' own timers: a TIME_WAIT's timer runs for
    60 s (TCP_TIMEWAIT_LEN), but the port can free earlier (the TIME_WAIT is reused, destroyed,
    or killed by an RST), so the trial bind, not the countdown, decides.
    """
    if until_listening:
        for name, on in (
            ("--reuseaddr", req.reuseaddr),
            ("--reuseport", req.reuseport),
            ("--v6only", req.v6only is not None),
        ):
            if on:
                raise click.UsageError(f"{name} has no meaning with --until-listening")
        return _until_listening(req, timeout, quiet)
    return _until_bindable(req, timeout, quiet)


def _until_bindable(req: BindRequest, timeout: float | None, quiet: bool) -> int:
    from rebind.actions.wait import WaitResult, wait_bindable

    target = req.where
    if quiet:
        res: WaitResult = wait_bindable(req, timeout=timeout)
    elif sys.stderr.isatty():
        res = _with_progress(req, timeout)
    else:
        announced: list[bool] = []

        def note(d: Diagnosis, elapsed: float) -> None:
            if not announced:
                announced.append(True)
                click.echo(f"waiting for {target}: {d.headline}", err=True)

        res = wait_bindable(req, timeout=timeout, on_progress=note)
    if res.ok:
        if not quiet:
            click.echo(
                f"{target} is bindable" + (f" (waited {res.elapsed:.1f}s)" if res.elapsed >= 0.05 else "")
            )
        return 0
    if not quiet:
        _report_timeout(target, res)
    return 1


def _report_timeout(target: str, res: Any) -> None:
    from rebind.cli.render import fmt_ms, owners_cell
    from rebind.model.records import socket_label

    click.echo(
        f"rebind: timed out after {res.elapsed:.1f}s: {target} is still not bindable ({res.trial})", err=True
    )
    d = res.diagnosis
    if d is None:
        return
    for b in d.blockers:
        r = b.entry.socket
        left = f", {fmt_ms(r.expires_ms)} left" if r.is_mini and r.expires_ms is not None else ""
        owners = owners_cell(b.entry.owners, limit=8)  # escaped names (hostile text)
        click.echo(f"  {socket_label(r)}{left}" + (f"  held by {owners}" if owners else ""), err=True)


def _with_progress(req: BindRequest, timeout: float | None) -> Any:
    import time

    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
    from rich.text import Text

    from rebind.actions.wait import wait_bindable
    from rebind.cli.render import console, fmt_ms

    class Countdown(ProgressColumn):
        """Time left until the last timed blocker expires, re-computed at every refresh."""

        def render(self, task: Task) -> Text:
            deadline = task.fields.get("deadline")
            if deadline is None:
                return Text("no timer", style="dim")
            # The kernel's timer as last read: the port can free earlier (TIME_WAIT reuse,
            # SOCK_DESTROY, an RST) or later (a retransmitted FIN re-arms the timer in
            # tcp_timewait_state_process); the trial bind decides, this only informs.
            return Text(f"{fmt_ms(max(int((deadline - time.monotonic()) * 1000), 0))} left")

    con = console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        Countdown(),
        console=con,
        transient=True,
    ) as progress:
        task = progress.add_task(f"waiting for {req.where}", total=None, deadline=None)

        def update(d: Diagnosis, elapsed: float) -> None:
            first = d.blockers[0].entry.socket.state.label if d.blockers else "blocked"
            more = f" +{len(d.blockers) - 1}" if len(d.blockers) > 1 else ""
            desc = f"waiting for {req.where} ({first}{more})"
            if d.frees_in_ms is None:
                # An untimed holder (a live listener): no countdown, just a pulsing bar.
                progress.update(task, description=desc, total=None, deadline=None)
                return
            # The bar spans from the start of the wait to the last TIME_WAIT's expiry.
            total = elapsed + d.frees_in_ms / 1000
            deadline = time.monotonic() + d.frees_in_ms / 1000
            progress.update(task, description=desc, total=total, completed=elapsed, deadline=deadline)

        return wait_bindable(req, timeout=timeout, on_progress=update)


def _until_listening(req: BindRequest, timeout: float | None, quiet: bool) -> int:
    from rebind.actions.wait import LOOPBACKS, wait_listening
    from rebind.model.records import Proto, fmt_addr

    port, udp, address = req.port, req.proto is Proto.UDP, _connect_address(req)
    shown = " or ".join(
        fmt_addr(a) for a in ((address,) if address and not address.is_unspecified else LOOPBACKS)
    )
    what = f"port {port}/{'udp' if udp else 'tcp'} on {shown}"
    if not quiet and not sys.stderr.isatty():
        click.echo(f"waiting for something to {'bind' if udp else 'accept connections on'} {what}", err=True)
    if not quiet and sys.stderr.isatty():
        from rebind.cli.render import console

        with console(stderr=True).status(f"waiting for a server on {what}"):
            res = wait_listening(port, addr=address, proto="udp" if udp else "tcp", timeout=timeout)
    else:
        res = wait_listening(port, addr=address, proto="udp" if udp else "tcp", timeout=timeout)
    if res.ok:
        if not quiet:
            answered = fmt_addr(res.answered) if res.answered is not None else "?"
            click.echo(f"{answered} port {port} is {'bound' if udp else 'accepting connections'}")
        return 0
    if not quiet:
        click.echo(f"rebind: timed out after {res.elapsed:.1f}s: nothing serves {what}", err=True)
    return 1


def _connect_address(req: BindRequest) -> IPv4Address | IPv6Address:
    """The address a client connects to: the request's, with a link-local address's scope back
    on it (the request keeps it as ``ifindex``; connect() needs it in the address)."""
    import socket

    if not (isinstance(req.addr, IPv6Address) and req.addr.is_link_local and req.ifindex):
        return req.addr
    try:
        scope = socket.if_indextoname(req.ifindex)
    except OSError:  # the interface went away since the request was built
        scope = str(req.ifindex)
    return IPv6Address(f"{req.addr}%{scope}")
