"""`rebind pick`: print a port that is bindable now and that no outgoing connection will take."""

from __future__ import annotations

import os
import sys
import warnings
from ipaddress import IPv4Address, IPv6Address

import click

from rebind.cli.params import ADDRESS, SecondsType


@click.command(
    epilog="""\b
Examples:
  PORT=$(rebind pick)                   a free TCP port outside the ephemeral range
  rebind pick --both --range 20000-20999
  PORT=$(rebind pick --hold 30)         keep it reserved until the app binds it (SO_REUSEADDR)

\b
The port lies outside net.ipv4.ip_local_port_range and ip_local_reserved_ports, so connect()
and bind(port 0) never hand it out. If the range leaves no such port free (e.g. with
ip_local_port_range 1024-65535), a reserved port, then one inside the ephemeral range, is
printed instead, with a warning on stderr saying why it is at risk.
Pickers running at the same time get different ports.
With --hold a background process keeps a SO_REUSEADDR socket bound (never listening) on the
port for SECONDS, or until another socket binds it: only an app that also sets SO_REUSEADDR
can bind it meanwhile (see docs/actions.md for the trade-off).
Exit status: 0 picked, 1 nothing free in range, 2 usage error, 3 every port in range is
privileged (below ip_unprivileged_port_start) and rebind is not root.
""",
)
@click.option("--udp", is_flag=True, help="A UDP port instead of TCP.")
@click.option("--both", is_flag=True, help="A port free for TCP and UDP.")
@click.option("--addr", type=ADDRESS, default=None, help="Only this address must be free (default: all).")
@click.option("--v6only", is_flag=True, help="With an IPv6 --addr: check with IPV6_V6ONLY=1.")
@click.option(
    "--range", "port_range", metavar="LO-HI", default=None, help="Pick from this range (default 10000-65535)."
)
@click.option(
    "--hold",
    type=SecondsType(positive=True),
    default=None,
    metavar="SECONDS",
    help="Keep the port reserved in the background (SO_REUSEADDR, bound, not listening).",
)
@click.option(
    "--lease",
    type=SecondsType(),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Other pickers skip this port for SECONDS (0: no lease).",
)
def pick(
    udp: bool,
    both: bool,
    addr: IPv4Address | IPv6Address | None,
    v6only: bool,
    port_range: str | None,
    hold: float | None,
    lease: float,
) -> int:
    """Print a port that is bindable now, outside the ephemeral range."""
    from rebind.actions.pick import PortRiskWarning, parse_range, pick_port

    if udp and both:
        raise click.UsageError("--udp and --both exclude each other")
    if v6only and (addr is None or addr.version != 6):
        raise click.UsageError("--v6only needs an IPv6 --addr (e.g. --addr ::)")
    rng = parse_range(port_range) if port_range is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PortRiskWarning)  # said below, as one line of ours
        picked = pick_port(
            "both" if both else "udp" if udp else "tcp",
            addr=addr,
            port_range=rng,
            v6only=True if v6only else None,
            hold=hold is not None,
            lease=max(lease, hold or 0),
        )
    if picked.risk:
        click.echo(f"rebind: warning: {picked.risk}", err=True)
    click.echo(picked.port)
    sys.stdout.flush()
    if hold is not None:
        _hold_in_background(picked, hold)
    return 0


def _hold_in_background(picked: object, seconds: float) -> None:
    """Fork a holder that outlives us, so `PORT=$(rebind pick --hold 30)` returns at once."""
    from rebind.actions.pick import PickedPort, hold_until

    assert isinstance(picked, PickedPort)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the holder
        try:
            os.setsid()
            # Let go of the caller's pipes: command substitution waits for their EOF.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            hold_until(picked, seconds)
        finally:
            os._exit(0)
    click.echo(
        f"holding port {picked.port} for {seconds:g}s in pid {pid} (until something else binds it)", err=True
    )
    picked.release()  # our copies only: the holder's fds keep the sockets bound
