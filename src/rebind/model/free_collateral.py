"""What else stopping a process takes down: the other sockets it holds, grouped. Pure.

`rebind free` signals whole processes, not sockets: before asking "Proceed?" the plan names every
other port a target serves, its connections, its unix sockets (``actions/free.py`` reads them
from /proc and one socket dump; this module only groups and words them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from rebind.model.records import LISTENING_STATES, Proto, SocketRecord
from rebind.textsafe import visible

#: More entries than this per target are summarised as "+N more".
MAX_OTHER_SOCKETS = 50
#: ``OtherSocket.local`` of a target's outgoing connections (grouped: one entry per state).
OUTGOING = "(outgoing)"


@dataclass(frozen=True, slots=True)
class OtherSocket:
    """A socket a target holds besides the ones that block the port: the signal that stops the
    target takes it down too (another server port, its connections, a UDP socket, a unix
    socket). Alike connections are one entry with a count."""

    #: ``tcp``, ``udp``, ``unix``, or ``socket`` (not identified here: another network
    #: namespace, netlink, ...).
    proto: str
    #: ``LISTEN``, ``BOUND_INACTIVE``, ``UNCONN``, ``ESTABLISHED``...; "" for unix / unknown.
    state: str = ""
    #: ``127.0.0.1:8080``, a unix socket's path (escaped), or "".
    local: str = ""
    port: int | None = None
    count: int = 1

    @property
    def serves(self) -> bool:
        """A server's own socket (listening or bound), rather than a connection."""
        return self.state in ("LISTEN", "BOUND_INACTIVE", "UNCONN")

    def __str__(self) -> str:
        text = " ".join(x for x in (self.proto, self.state, self.local) if x)
        if self.proto == "socket":
            text = "socket not identified here (another network namespace, netlink, ...)"
        return f"{text} ×{self.count}" if self.count > 1 else text


def group_sockets(
    inodes: Iterable[int], records: Mapping[int, SocketRecord], unix: Mapping[int, str]
) -> tuple[OtherSocket, ...]:
    """The sockets with these inodes as plan entries: ``records`` are the inet sockets found by
    inode, ``unix`` the unix sockets' paths (others are "not identified here")."""
    wanted = set(inodes)
    # Connections on a port the process serves are its server side (grouped per local address);
    # the others are its outgoing connections (grouped together: ephemeral ports say nothing).
    served = {
        (r.proto, r.local.port) for r in records.values() if r.inode in wanted and r.state in LISTENING_STATES
    }
    counts: dict[OtherSocket, int] = {}
    for ino in sorted(wanted):
        key = _entry(records.get(ino), unix.get(ino), served)
        counts[key] = counts.get(key, 0) + 1
    out = sorted((replace(k, count=n) for k, n in counts.items()), key=_order)
    if len(out) > MAX_OTHER_SOCKETS:
        rest = sum(o.count for o in out[MAX_OTHER_SOCKETS:])
        out = [*out[:MAX_OTHER_SOCKETS], OtherSocket("socket", count=rest)]
    return tuple(out)


def _entry(r: SocketRecord | None, path: str | None, served: set[tuple[Proto, int]]) -> OtherSocket:
    if r is not None and (r.state in LISTENING_STATES or (r.proto, r.local.port) in served):
        return OtherSocket(r.proto.value, r.state.label, str(r.local), r.local.port)
    if r is not None:
        return OtherSocket(r.proto.value, r.state.label, OUTGOING)
    if path is not None:
        return OtherSocket("unix", "", visible(path))
    return OtherSocket("socket")


def _order(o: OtherSocket) -> tuple[int, int, str, bool, str, str]:
    # Other ports first (by port), then outgoing connections, unix sockets, the unidentified.
    rank = 0 if o.port is not None else 1 if o.local == OUTGOING else 2 if o.proto == "unix" else 3
    return (rank, o.port or 0, o.proto, not o.serves, o.state, o.local)


def collateral_summary(others: Iterable[OtherSocket]) -> str:
    """One line naming every other port (and counting other sockets) the signals take down:
    ``8080/tcp (LISTEN, 7 connections), 5353/udp, 1 unix socket``."""
    ports: dict[tuple[int, str], list[str]] = {}
    conns: dict[tuple[int, str], int] = {}
    unix = unknown = outgoing = 0
    for o in others:
        if o.local == OUTGOING:
            outgoing += o.count
        elif o.port is not None:
            key = (o.port, o.proto)
            ports.setdefault(key, [])
            if o.serves:
                if o.state not in ports[key] and o.state != "UNCONN":
                    ports[key].append(o.state)
            else:
                conns[key] = conns.get(key, 0) + o.count
        elif o.proto == "unix":
            unix += o.count
        else:
            unknown += o.count
    parts = [
        _port_part(port, proto, ports[(port, proto)], conns.get((port, proto), 0))
        for port, proto in sorted(ports)
    ]
    for n, what in ((outgoing, "outgoing connection"), (unix, "unix socket"), (unknown, "other socket")):
        if n:
            parts.append(f"{n} {what}{'s' if n != 1 else ''}")
    return ", ".join(parts)


def _port_part(port: int, proto: str, states: list[str], connections: int) -> str:
    notes = list(states)
    if connections:
        notes.append(f"{connections} connection{'s' if connections != 1 else ''}")
    return f"{port}/{proto}" + (f" ({', '.join(notes)})" if notes else "")
