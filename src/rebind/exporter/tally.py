"""Tally: one pass over a dump, counting what needs no model and keeping what does. Pure: no I/O;
exporter/gather.py feeds it and freezes it into a Snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from rebind.exporter.facts import (
    OTHER,
    TOP_PEERS,
    Dest,
    DestUsage,
    EphemeralRange,
    PeerCount,
    PortKey,
    Watch,
    norm,
)
from rebind.model.records import IPAddress, Proto, SocketRecord, State, fmt_addr


def addr_key(a: IPAddress) -> bytes:
    """The comparison key of an address: 4 bytes for IPv4 and v4-mapped IPv6, else 16."""
    return norm(a).packed


_WILDCARDS = (bytes(4), bytes(16))
_SERVER_STATES = (State.LISTEN, State.BOUND_INACTIVE)


class Tally:
    """Accumulates one scrape (mutable while gathering, then frozen into a Snapshot).

    Feed listeners and bound sockets first (``server``), then connections (``conn``): whether a
    connection is a listener's child depends on the listeners of its port. ``conn`` runs once
    per socket of the connection walk (thousands per scrape): plain ints and bytes only.
    """

    def __init__(self, watches: Iterable[Watch], dests: Iterable[Dest]) -> None:
        watches = tuple(watches)
        self.port_set = frozenset(w.key for w in watches)
        self.tcp_ports = frozenset(w.port for w in watches if w.proto is Proto.TCP)
        self.dests = {(addr_key(d.addr), d.port): d for d in dests}
        self._server_counts: dict[tuple[PortKey, State], int] = {}
        # Read and written by ``conn`` and by its inlined twin, fastdiag.scan_conns:
        #: (port, leftover?, local address) already kept: one representative of each for the model.
        self.kept: set[tuple[int, bool, bytes]] = set()
        #: (port, state number, remote address key) -> connections: the states' counts and the
        #: peers' both (one dict operation a socket; few keys: a port's peers by state)
        self.conn_seen: dict[tuple[int, int, bytes], int] = {}
        #: port -> the longest TIME_WAIT/FIN_WAIT2 timer left (ms)
        self.tw_max_ms: dict[int, int] = {}
        self.listeners: dict[int, set[bytes]] = {}
        self.usage: dict[tuple[Dest, bytes], tuple[set[int], set[int]]] = {}
        #: Ports of the range that connections bound by bind() hold (see client_range).
        self.bind_held: set[int] = set()
        self.range = (1, 0)

    def client_range(self, rng: EphemeralRange | None) -> None:
        """The connection dump also returns the connections on ports of this range whose port
        bind() named (gather.py's filter): ``conn`` then counts their ports as bind-held."""
        self.range = (rng.lo, rng.hi) if rng is not None else (1, 0)

    def server(self, r: SocketRecord) -> None:
        """A TCP listener or bound-inactive socket, or a UDP socket, on a watched port."""
        key = (PortKey(r.local.port, r.proto), r.state)
        self._server_counts[key] = self._server_counts.get(key, 0) + 1
        if r.state is State.LISTEN:
            self.listeners.setdefault(r.local.port, set()).add(addr_key(r.local.addr))

    def conn(
        self, state: int, mini: bool, sport: int, dport: int, src: bytes, dst: bytes, expires: int
    ) -> bool:
        """A TCP connection-table socket (state as its number, addresses as keys). True when the
        conflict model needs it: a socket on a watched port that is not a child of a listener on
        its port, or the first child or TIME_WAIT leftover on its local address (the others
        decide alike: bind conflicts compare local addresses, and they share their flags' source).
        Linear in the sockets, bounded by their distinct local addresses. fastdiag.scan_conns
        is this, inlined in its receive loop: change both."""
        wanted = False
        if sport in self.tcp_ports:
            key = (sport, state, dst)
            self.conn_seen[key] = self.conn_seen.get(key, 0) + 1
            if mini:
                if expires > self.tw_max_ms.get(sport, -1):
                    self.tw_max_ms[sport] = expires
                child = True
            else:
                keys = self.listeners.get(sport, ())
                child = dport != 0 and (src in keys or _WILDCARDS[0] in keys or _WILDCARDS[1] in keys)
            if not child:
                wanted = True
            elif (sport, mini, src) not in self.kept:
                self.kept.add((sport, mini, src))
                wanted = True
        d = self.dests.get((dst, dport))
        if d is not None:
            live, tw = self.usage.setdefault((d, src), (set(), set()))
            (tw if mini or state == State.TIME_WAIT else live).add(sport)
        elif sport not in self.tcp_ports and self.range[0] <= sport <= self.range[1]:
            # neither watched nor to a dest: only the filter's bind-named group returns it
            self.bind_held.add(sport)
        return wanted

    def records(self, recs: Iterable[SocketRecord]) -> list[SocketRecord]:
        """Feed whole records (the /proc/net path, tests): servers first, then connections.
        Returns the records the conflict model needs (what ``Snapshot.watched`` holds)."""
        recs = list(recs)
        wanted: list[SocketRecord] = []
        for r in recs:
            if (r.proto is Proto.UDP or r.state in _SERVER_STATES) and PortKey(
                r.port, r.proto
            ) in self.port_set:
                self.server(r)
                wanted.append(r)
        for r in recs:
            if r.proto is Proto.TCP and r.state not in _SERVER_STATES:
                keys = (addr_key(r.local.addr), addr_key(r.remote.addr))
                if self.conn(int(r.state), r.is_mini, r.port, r.remote.port, *keys, r.expires_ms or 0):
                    wanted.append(r)
        return wanted

    @property
    def counts(self) -> dict[tuple[PortKey, State], int]:
        out = dict(self._server_counts)
        for (port, st, _peer), n in self.conn_seen.items():
            key = (PortKey(port), State(st))
            out[key] = out.get(key, 0) + n
        return out

    @property
    def tw_max(self) -> dict[PortKey, int]:
        return {PortKey(p): ms for p, ms in self.tw_max_ms.items()}

    def peers(self, k: int = TOP_PEERS) -> tuple[PeerCount, ...]:
        """The ``k`` remote addresses with the most sockets on each watched TCP port, and the
        rest summed as "other": bounded whatever the number of clients."""
        per_peer: dict[tuple[int, bytes], int] = {}
        for (port, _st, peer), n in self.conn_seen.items():
            per_peer[port, peer] = per_peer.get((port, peer), 0) + n
        by_port: dict[int, list[tuple[int, bytes]]] = {}
        for (port, peer), n in per_peer.items():
            by_port.setdefault(port, []).append((n, peer))
        out: list[PeerCount] = []
        for port, items in sorted(by_port.items()):
            items.sort(key=lambda item: (-item[0], item[1]))
            out += [PeerCount(PortKey(port), fmt_addr(_from_key(peer)), n) for n, peer in items[:k]]
            rest = sum(n for n, _ in items[k:])
            if rest:
                out.append(PeerCount(PortKey(port), OTHER, rest))
        return tuple(out)

    def dest_usage(self) -> tuple[DestUsage, ...]:
        return tuple(
            DestUsage(d, _from_key(src), frozenset(live), frozenset(tw))
            for (d, src), (live, tw) in self.usage.items()
        )


def _from_key(key: bytes) -> IPAddress:
    return IPv4Address(key) if len(key) == 4 else IPv6Address(key)
