"""Per-port figures of one scrape that need no conflict model: when the port frees, sockets by
state, the listeners' accept queues, and configuration warnings. Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from rebind.exporter.facts import PortKey, Snapshot, Watch, norm
from rebind.model.records import IPAddress, Proto, SocketRecord, State


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return (a.version, int(a))


def frees_in_seconds(snap: Snapshot, key: PortKey) -> float:
    """Seconds until the last timed leftover (TIME_WAIT, orphaned FIN_WAIT2) on the port expires:
    after that, even a server without SO_REUSEADDR binds, unless a live socket holds the port.
    0 when none is left."""
    return dict(snap.tw_expires_ms).get(key, 0) / 1000.0


def state_label(s: State) -> str:
    """Lower-case state names: ``ss`` spelling with underscores (bound_inactive, time_wait)."""
    return s.label.lower()


#: The states each protocol's sockets can be in, as exported (a zero is exported for each, so
#: alerts need no ``absent()``). NEW_SYN_RECV shares syn_recv's label.
TCP_STATES = tuple(s for s in State if s not in (State.CLOSE, State.NEW_SYN_RECV))
UDP_STATES = (State.CLOSE, State.ESTABLISHED)


def state_counts(snap: Snapshot, key: PortKey) -> dict[str, int]:
    states = TCP_STATES if key.proto is Proto.TCP else UDP_STATES
    out = {state_label(s): 0 for s in states}
    for (k, state), n in snap.counts:
        if k == key:
            label = state_label(state)
            out[label] = out.get(label, 0) + n
    return out


@dataclass(frozen=True, slots=True)
class ListenerGroup:
    """The TCP listeners on one address and port: one socket, or a SO_REUSEPORT group."""

    port: int
    addr: IPAddress
    size: int
    #: The fullest member's accept queue and backlog (a reuseport group balances by hash, so one
    #: member can overflow while the sum looks fine).
    accept_queue: int
    backlog: int


def listener_groups(records: Sequence[SocketRecord], watches: Sequence[Watch]) -> list[ListenerGroup]:
    """The listeners on each watched TCP address (only those: labels come from the command line,
    never from what other users bind). For listeners, inet_diag reports sk_ack_backlog as rqueue
    and sk_max_ack_backlog as wqueue (inet_diag_msg_common_fill / tcp_diag_get_info)."""
    wanted = {(w.port, norm(w.addr)): w.addr for w in watches if w.proto is Proto.TCP}
    groups: dict[tuple[int, IPAddress], list[SocketRecord]] = {}
    for r in records:
        if r.proto is Proto.TCP and r.state is State.LISTEN:
            addr = wanted.get((r.local.port, norm(r.local.addr)))
            if addr is not None:
                groups.setdefault((r.local.port, addr), []).append(r)
    out = []
    for (port, addr), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _addr_key(kv[0][1]))):
        fullest = max(members, key=_fill)
        out.append(ListenerGroup(port, addr, len(members), fullest.rqueue, fullest.wqueue))
    return out


def _fill(m: SocketRecord) -> tuple[float, int]:
    return (m.rqueue / m.wqueue if m.wqueue else float(m.rqueue > 0), m.rqueue)


# --------------------------------------------------------------------------------------------
# Configuration warnings


class WarningKind(enum.StrEnum):
    #: A watched server port inside ip_local_port_range and not in ip_local_reserved_ports:
    #: an outgoing connection can take it while the server is down (kubernetes#111682).
    SERVER_PORT_IN_EPHEMERAL_RANGE = "server_port_in_ephemeral_range"
    #: ip_local_port_range holds an odd number of ports: each connect() cannot reach one end
    #: (connect-rules.md C1).
    EPHEMERAL_RANGE_ODD = "ephemeral_range_odd"
    #: The socket table came from /proc/net: bound-inactive sockets (which block binds) are invisible.
    SOCKET_TABLE_FROM_PROCFS = "socket_table_from_procfs"


def config_warnings(snap: Snapshot) -> dict[WarningKind, int]:
    """Each kind's count (0 when fine; every kind is always exported)."""
    out = dict.fromkeys(WarningKind, 0)
    if snap.ephemeral is not None:
        inside = {w.port for w in snap.watches if w.port in snap.ephemeral}
        out[WarningKind.SERVER_PORT_IN_EPHEMERAL_RANGE] = len(inside)
        out[WarningKind.EPHEMERAL_RANGE_ODD] = (snap.ephemeral.hi - snap.ephemeral.lo + 1) % 2
    out[WarningKind.SOCKET_TABLE_FROM_PROCFS] = int(snap.source == "procfs")
    return out
