"""The client side of a scrape: a small count over the socket table and the
``ip_local_port_range`` / ``ip_local_reserved_ports`` sysctls (connect-rules.md §0.2 step 4
without the parts inet_diag cannot show). ``why --connect``'s client model replaces it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rebind.exporter.facts import Dest, DestUsage, EphemeralRange, norm
from rebind.model.records import IPAddress, Proto, SocketRecord, State


def bind_held_ports(
    bound: Iterable[SocketRecord], rng: EphemeralRange, conns: Iterable[int] = ()
) -> frozenset[int]:
    """Ephemeral-range ports whose bind bucket bind() created: connect() skips them whatever the
    destination (__inet_hash_connect: tb->fastreuse >= 0). Counted from TCP listeners and
    bound-inactive sockets (their children share their port) and ``conns``: the ports of
    connections whose port bind() named (a fixed-port client, SOCK_BINDPORT_LOCK; the kernel's
    filter finds them). Still a lower bound: a client that let bind(ip, 0) pick its port, and a
    fixed-port client's TIME_WAIT, keep the bucket bind-made and show no such lock
    (connect-rules.md §8); `why --connect` reads those from the kernel (root)."""
    held = {
        r.local.port
        for r in bound
        if r.proto is Proto.TCP and r.state in (State.LISTEN, State.BOUND_INACTIVE) and r.local.port in rng
    }
    return frozenset(held | {p for p in conns if p in rng})


@dataclass(frozen=True, slots=True)
class ConnectCount:
    src: IPAddress
    dest: Dest
    #: Ports connect() can certainly take for (src, dst, dport) now.
    free: int
    #: TIME_WAIT entries (src, *, dst, dport) in the range: each holds its port until it expires
    #: or tcp_tw_reuse lets connect() take it over (not counted as free).
    timewait: int
    #: Live connections (src, *, dst, dport) on ports of the range.
    live: int


def connect_counts(
    dest: Dest, src: IPAddress, usage: Iterable[DestUsage], rng: EphemeralRange, held: frozenset[int]
) -> ConnectCount:
    """connect-rules.md §0.2 step 4, as far as inet_diag shows it: a candidate port is free unless
    bind() holds it, or the 4-tuple (src, port, dst, dport) is taken by a live connection or a
    TIME_WAIT entry (whether tcp_tw_reuse would take that one over is not counted)."""
    live: set[int] = set()
    tw: set[int] = set()
    s = norm(src)
    for u in usage:
        if u.dest == dest and norm(u.src) == s:
            live.update(p for p in u.live if p in rng)
            tw.update(p for p in u.timewait if p in rng)
    taken = held | live | tw
    return ConnectCount(src, dest, rng.size - len(taken), len(tw - held - live), len(live - held))
