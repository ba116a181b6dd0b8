"""The client side of a scrape: a small count over the socket table and the
``ip_local_port_range`` / ``ip_local_reserved_ports`` sysctls (connect-rules.md §0.2 step 4
without the parts inet_diag cannot show). ``why --connect``'s client model replaces it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rebind.exporter.facts import Dest, DestUsage, EphemeralRange, PortOrigins, norm
from rebind.model.records import IPAddress, Proto, SocketRecord, State
from rebind.model.sockstate import BindBucket


def bind_held_ports(
    bound: Iterable[SocketRecord], rng: EphemeralRange, conns: Iterable[int] = ()
) -> frozenset[int]:
    """Ephemeral-range ports whose bind bucket bind() created: connect() skips them whatever the
    destination (__inet_hash_connect: tb->fastreuse >= 0). Counted from TCP listeners and
    bound-inactive sockets (their children share their port) and ``conns``: the ports of
    connections whose port bind() named (a fixed-port client, SOCK_BINDPORT_LOCK; the kernel's
    filter finds them) or whose bind bucket the kernel showed bind-made (:func:`port_origins`:
    a client that let bind(ip, 0) pick its port, a fixed-port client's TIME_WAIT; no lock shows
    those, connect-rules.md §8)."""
    held = {
        r.local.port
        for r in bound
        if r.proto is Proto.TCP and r.state in (State.LISTEN, State.BOUND_INACTIVE) and r.local.port in rng
    }
    return frozenset(held | {p for p in conns if p in rng})


def origin_candidates(
    client_ports: Iterable[int], rng: EphemeralRange, known: frozenset[int]
) -> frozenset[int]:
    """The ports whose bind bucket must be read: ports of the range with TCP client sockets
    (connections, TIME_WAITs) whose origin nothing else gave (``known``: listeners, bound-inactive
    sockets, SOCK_BINDPORT_LOCK). One bucket per port: one read each, whatever its sockets."""
    return frozenset(p for p in client_ports if p in rng and p not in known)


def bucket_connect_only(bucket: BindBucket) -> bool:
    """A bucket __inet_hash_connect made (and may share): fastreuse and fastreuseport both -1.
    Any other was made by bind(), and connect() skips the port for every destination."""
    return bucket.connect_made


def port_origins(candidates: Iterable[int], connect_only: Mapping[int, bool]) -> PortOrigins:
    """Sort the candidate ports by what the kernel said of their buckets (``connect_only``, per
    port; a port absent was not read: no BPF, or its socket went away meanwhile)."""
    made: set[int] = set()
    unknown: set[int] = set()
    for p in candidates:
        got = connect_only.get(p)
        if got is None:
            unknown.add(p)
        elif not got:
            made.add(p)
    return PortOrigins(frozenset(made), frozenset(unknown))


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
    #: Ports not counted free only because their bind bucket could not be read (bind(ip, 0) or
    #: connect()?): otherwise free. Not 0: rebind_exporter_missing names the fact.
    undecided: int = 0


def connect_counts(
    dest: Dest,
    src: IPAddress,
    usage: Iterable[DestUsage],
    rng: EphemeralRange,
    held: frozenset[int],
    unknown: frozenset[int] = frozenset(),
) -> ConnectCount:
    """connect-rules.md §0.2 step 4, as far as inet_diag shows it: a candidate port is free unless
    bind() holds it, or the 4-tuple (src, port, dst, dport) is taken by a live connection or a
    TIME_WAIT entry (whether tcp_tw_reuse would take that one over is not counted). A port whose
    bucket could not be read (``unknown``) is not counted free: it may be bind-made."""
    live: set[int] = set()
    tw: set[int] = set()
    s = norm(src)
    for u in usage:
        if u.dest == dest and norm(u.src) == s:
            live.update(p for p in u.live if p in rng)
            tw.update(p for p in u.timewait if p in rng)
    taken = held | unknown | live | tw
    undecided = len(unknown - held - live - tw)
    return ConnectCount(src, dest, rng.size - len(taken), len(tw - held - live), len(live - held), undecided)
