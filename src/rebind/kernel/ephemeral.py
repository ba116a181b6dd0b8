"""The server-side warning of issue 10, gathered cheaply (two /proc reads, no heavy imports)."""

from __future__ import annotations

from collections.abc import Iterable

from rebind.kernel.sysctl import read
from rebind.model.ephemeral import parse_port_range, parse_reserved, server_ports_warning
from rebind.model.records import Proto, SocketRecord, State


def server_port_warnings(records: Iterable[SocketRecord], *, root: str = "/proc") -> tuple[str, ...]:
    """A warning for server sockets (listening, bound-inactive, unconnected UDP) whose port lies in
    this namespace's ``ip_local_port_range`` and is not reserved; () when there are none."""
    ports = {
        r.local.port
        for r in records
        if r.state in (State.LISTEN, State.BOUND_INACTIVE) or (r.proto is Proto.UDP and not r.remote.port)
    }
    if not ports:
        return ()
    # Two sysctls, not host_settings(): `ls` reads only what this warning needs.
    rng = parse_port_range(read("net/ipv4/ip_local_port_range", root))
    w = server_ports_warning(ports, rng, parse_reserved(read("net/ipv4/ip_local_reserved_ports", root)))
    return (w,) if w else ()
