"""`rebind ls [PORT…]`: sockets holding ports, and every process holding each socket."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

import click

from rebind.cli.params import PORT_SPEC, STATE
from rebind.model.records import Proto, SocketTable, State

if TYPE_CHECKING:
    from rebind.model.localhost import SplitBrain


@click.command(
    epilog="""\b
Examples:
  rebind ls                    every listening or bound port (bound-inactive included)
  rebind ls -a                 every socket in every state (like ss -a)
  rebind ls 8080               everything on local port 8080: listeners, connections, TIME_WAIT
  rebind ls 127.0.0.1:8080     only sockets bound to that address
  rebind ls 80 443 --udp       UDP sockets on 80 and 443
  rebind ls 8080 --state time-wait --no-owners
  rebind ls --all-netns 8080   port 8080 in every namespace and container
  rebind ls --json | jq '.sockets[].owners[].pid'

\b
Exit status: 0 something matched, 1 nothing matched, 2 usage error, 3 missing permission
or kernel feature, 4 unusable kernel answer. A reader that stops early (| head) is no error.
JSON schema: docs/json.md (schema "rebind.ls/1").
""",
)
@click.argument("ports", nargs=-1, type=PORT_SPEC, metavar="[[ADDR:]PORT]...")
@click.option("--tcp", "tcp", is_flag=True, help="TCP sockets only.")
@click.option("--udp", "udp", is_flag=True, help="UDP sockets only.")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=STATE,
    help="Only sockets in this state (repeatable): listen, bound-inactive, established, time-wait, "
    "fin-wait-2, close-wait, unconn, ... UDP has no listen state: listen and bound-inactive also "
    "select bound UDP sockets (UNCONN), as ss does.",
)
@click.option("-l", "--listening", is_flag=True, help="Only listening TCP and bound UDP sockets.")
@click.option(
    "-a",
    "--all",
    "all_states",
    is_flag=True,
    help="Sockets in every state (connections, TIME_WAIT, ...), also without PORT. The default "
    "without PORT: listening, bound-inactive and bound UDP sockets; with PORT: every state.",
)
@click.option(
    "--all-netns",
    is_flag=True,
    help="Every network namespace on the host (each process's, and nsfs mounts such as /run/netns/* "
    "and Docker's): each socket with its namespace, owners with their container and unit. Unprivileged: "
    "only namespaces readable through /proc, with a warning naming what is hidden.",
)
@click.option("--no-owners", is_flag=True, help="Skip the /proc scan for owning processes (fast).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema rebind.ls/1).")
def ls(
    ports: tuple[tuple[IPv4Address | IPv6Address | None, int], ...],
    tcp: bool,
    udp: bool,
    states: tuple[State, ...],
    listening: bool,
    all_states: bool,
    all_netns: bool,
    no_owners: bool,
    as_json: bool,
) -> int:
    """List sockets that hold ports, with every process that holds each one.

    Without PORT: every listening or bound port, including TCP sockets that are bound but not
    listening (they block bind() yet are invisible to lsof, psutil and /proc/net/tcp). With PORT:
    every socket whose local port is PORT, in any state, filtered inside the kernel. With -a:
    every socket in every state.
    """
    if all_states and (states or listening):
        raise click.UsageError("--all shows every state: it excludes --state and --listening")
    from rebind.cli import render
    from rebind.sockets import socket_table

    protos = [p for p, on in ((Proto.TCP, tcp), (Proto.UDP, udp)) if on] or [Proto.TCP, Proto.UDP]
    chosen: set[State] | None = set(State) if all_states else set(states) if states else None
    if listening:
        chosen = (chosen or set(State)) & {State.LISTEN, State.CLOSE}
    if all_netns:
        from rebind.allns import socket_table_all_netns as socket_table
    table = socket_table(
        ports=[p for _, p in ports] if ports else None,
        protos=protos,
        states=chosen,
        owners=not no_owners,
    )
    # Before the address filter: `ls 127.0.0.1:5173` must still see the ::1 listener.
    found = {} if all_netns or no_owners or Proto.TCP not in protos else _localhost(table)
    addrs = {(a, p) for a, p in ports if a is not None}
    if addrs:
        plain = {p for a, p in ports if a is None}
        keep = tuple(
            e
            for e in table.entries
            if e.socket.port in plain or (e.socket.local.addr, e.socket.port) in addrs
        )
        table = replace(table, entries=keep)
    from rebind.kernel.ephemeral import server_port_warnings

    if warn := server_port_warnings(e.socket for e in table.entries):  # issue 10
        table = replace(table, warnings=table.warnings + warn)
    if as_json:
        render.dump_json(render.table_json(table, found))
    else:
        render.print_table(table, render.localhost_marks(found))
    return 0 if table.entries else 1


def _localhost(table: SocketTable) -> dict[int, SplitBrain]:
    """Issue 20: TCP ports whose 127.0.0.1 and ::1 reach different processes (or one family
    only). One namespace only: a split is about one host's loopback."""
    if not any(e.socket.state is State.LISTEN for e in table.entries):
        return {}
    from rebind.kernel.resolver import localhost_resolution
    from rebind.model.localhost import find_splits

    return find_splits(table.entries, localhost_resolution(0))
