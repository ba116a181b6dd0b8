"""The sockets a TCP connect()'s answer names, found by lookups instead of a walk of the table
(issue 19: a failing connect's snapshot at the 211k-socket table).

Beside the range's bind buckets (kernel/connect_range.py) the bind-hash path of
kernel/connect_facts.py needs some sockets one by one, and its first inet_diag dump
(kernel/connect_dump.py) asks for them with a filter the kernel runs on every socket of the
namespace: ~35 ms for the established hash and ~60 ms for the bind hash's bound-inactive walk at
bench/mkload.py's table, whatever the answer's size. Each part has a reader that visits only
what it returns:

- **the sockets to the destination** from the source address the route picks: for each
  connect()-made port of the range, the 4-tuple looked up in the established hash
  (kernel/bpf/socklookup.py: bpf_skc_lookup_tcp, the lookup __inet_check_established makes;
  sockets from other local addresses never take this 4-tuple);
- **listeners**: inet_diag's LISTEN-only dump walks the listening hash alone;
- **bound-inactive sockets**: a bind()-made bucket holds each one (inet_csk_update_fastreuse
  leaves no bucket connect()-made once a bind() joins it), so they are the TCP_CLOSE owners of
  the bind-made ports (the owners program, kernel/bindhash_table.py, walking past the others);
  those ports come from the buckets of every port outside the range (kernel/bpf/bindhash.py:
  the range's are read anyway);
- **the range's bind-made ports and the fixed local port**: every socket of their buckets.

A TIME_WAIT's time left is its timer in jiffies: only where HZ is calibrated
(bindhash_table.calibrate_hz, done by `rebind trace` at its start). Where any part cannot
vouch for its answer (no HZ, a chain walk cut short, more bind-made ports than :data:`PORTS_MAX`,
a record that changed while read, a connection bound to a device) the caller takes the dump.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rebind.kernel.bindhash_table import LOCAL_COOKIE
from rebind.model.records import IPAddress, SocketRecord

if TYPE_CHECKING:
    from rebind.kernel.bpf.bindhash import BindMade
    from rebind.model.connect import ConnectRequest, RangeBuckets
    from rebind.model.sockstate import SockState

#: Past this many ports to read owner by owner (the range's bind-made ones, and those outside
#: it that may hold a bound-inactive socket) the dump is cheaper.
PORTS_MAX = 64
#: The most sockets one port's read takes before it gives up (the dump then).
PORT_LIMIT = 4096
#: TCP_CLOSE (include/net/tcp_states.h): a bound, unconnected, not listening socket.
TCP_CLOSE = 7
#: Cookies given to the looked-up sockets that have none yet (bindhash_table.LOCAL_COOKIE's
#: range, apart from the per-port reads' indexes), and the ones each gets in the answer.
_LOOKUP_COOKIE = 1 << 63 | 1 << 62
_OWN_COOKIE = 1 << 63 | 1 << 61


def outside_ports(rng: tuple[int, int]) -> BindMade | str:
    """The TCP ports outside the range whose bucket bind() made (bindhash.read_bind_made_ports),
    or why not."""
    from rebind.kernel.bpf.bindhash import read_bind_made_ports
    from rebind.model.sockstate import Unavailable

    got = read_bind_made_ports(_OUTSIDE.get(rng) or _outside(rng))
    return got.reason if isinstance(got, Unavailable) else got


def _outside(rng: tuple[int, int]) -> list[int]:
    lo, hi = rng
    _OUTSIDE.clear()
    got = _OUTSIDE[rng] = [*range(1, lo), *range(hi + 1, 1 << 16)]
    return got


#: The last range's ports outside it (the same list each snapshot: bindhash keeps its input).
_OUTSIDE: dict[tuple[int, int], list[int]] = {}


@dataclass(frozen=True, slots=True)
class Named:
    """The sockets found, and the struct file of each full one read beside it (inode ->
    address: find_owners' head start)."""

    records: list[SocketRecord]
    files: dict[int, int]
    #: Each record's socket as the kernel holds it, by the record's cookie (a cookie of our own,
    #: unique here, where the socket had none yet): its flags need no other read
    #: (connect_origin.with_kernel_origin's ``given``).
    states: dict[int, SockState]


def named_sockets(
    req: ConnectRequest,
    src: IPAddress,
    rng: tuple[int, int],
    buckets: RangeBuckets,
    outside: BindMade,
) -> Named | str:
    """What the first dump (and the bind-made ports' reads) would give the bind-hash path, from
    lookups and bucket walks (see the module docstring), or why it cannot be had so: every
    listener and bound-inactive socket, every socket on a bind-made port of the range or on the
    fixed local port, and every socket with the 4-tuple (src, p, dst, dport) for the range's
    connect()-made ports p. ``buckets``: the range's ports (connect_range.range_buckets);
    ``outside``: the bind-made ports outside it (:func:`outside_ports`)."""
    from rebind.kernel.hz import known_hz

    hz = known_hz()
    if hz is None:
        return "HZ not calibrated"
    lo, hi = rng
    listeners = _listeners()
    listening = {r.local.port for r in listeners}
    inside = sorted(p for p in buckets.bind_made if lo <= p <= hi)
    if outside.unknown:
        return f"port {outside.unknown[0]}: its bind bucket could not be read whole"
    fixed = req.local_port
    candidates = [p for p in outside.ports if p not in listening and p != fixed]
    if len(inside) + len(candidates) > PORTS_MAX:
        return f"{len(inside) + len(candidates)} bind-made ports to read one by one"
    out: list[Pair] = [(r, None) for r in listeners]
    files: dict[int, int] = {}
    # outside the range, a bind-made port no listener holds: where a bound-inactive socket may
    # be (a server's port the answer's "widen the range" must spare)
    for p in candidates:
        got = _port(p, hz, TCP_CLOSE, files)
        if isinstance(got, str):
            return got
        out += got
    for p in inside:
        got = _port(p, hz, 0, files)
        if isinstance(got, str):
            return got
        # as the dump's filter: a time-wait entry of a bind-made port only if it is to the
        # destination (the port is decided by its bucket; the entry names the 4-tuple) -- but
        # every socket of the fixed local port (the bind rules judge each, C17/C19)
        out += [(r, st) for r, st in got if p == fixed or not r.is_mini or _to(r, req)]
    if fixed is not None and fixed not in inside:
        got = _port(fixed, hz, 0, files)
        if isinstance(got, str):
            return got
        out += got
    peers = _to_destination(req, src, sorted(buckets.held - buckets.bind_made), hz, files)
    if isinstance(peers, str):
        return peers
    out += peers
    return _named(out, files)


def _listeners() -> list[SocketRecord]:
    """Every TCP listener of the namespace, both families (the listening hash's walk alone)."""
    from rebind.kernel import diag
    from rebind.model.records import Proto, State

    with diag.DiagSocket() as d:
        return list(d.dump(None, Proto.TCP, [State.LISTEN]))


def _to(r: SocketRecord, req: ConnectRequest) -> bool:
    return r.remote.port == req.dport and r.remote.addr == req.dst


def _port(port: int, hz: int, only_state: int, files: dict[int, int]) -> list[Pair] | str:
    """The port's sockets from its bind buckets (``only_state``: in that TCP state alone); their
    struct files into ``files``."""
    from rebind.kernel.bindhash_table import problem, read_port_sockets, to_records
    from rebind.model.sockstate import Unavailable

    got = read_port_sockets(port, PORT_LIMIT, only_state=only_state)
    if isinstance(got, Unavailable):
        return got.reason
    if (why := problem(got.owners)) is not None:
        return f"port {port}: {why}"
    files.update(got.file_hints())
    return [(r, st) for r, st in to_records(got, hz)]


def _to_destination(
    req: ConnectRequest, src: IPAddress, ports: list[int], hz: int, files: dict[int, int]
) -> list[Pair] | str:
    """The sockets with the 4-tuple (src, p, dst, dport) for each of ``ports``; their struct
    files into ``files``."""
    from rebind.kernel.bindhash_table import jiffies_to_ms, to_record
    from rebind.kernel.bpf.bindhash import load_layout
    from rebind.kernel.bpf.sockiter import load_sock_layout
    from rebind.kernel.bpf.socklookup import lookup_peer_sockets
    from rebind.model.sockstate import SockKind, Unavailable

    got = lookup_peer_sockets(load_sock_layout(), load_layout(), src, req.dst, req.dport, ports)
    if isinstance(got, Unavailable):
        return got.reason
    out: list[Pair] = []
    for i, (st, inode, left, file) in enumerate(got):
        if inode and file:
            files[inode] = file
        if st.bound_dev_if:
            # bpf_skc_lookup_tcp matches with the test run's device (lo); the kernel's check with
            # the new socket's: a device-bound holder is judged from the dump
            return "a connection bound to a device holds a port of the range"
        left_ms = jiffies_to_ms(left, hz) if st.kind is SockKind.TIMEWAIT else None
        out.append((to_record(st, inode, left_ms, st.cookie or _LOOKUP_COOKIE | i), st))
    return out


#: A record and the kernel's state of its socket (None: from inet_diag, which has no flags).
Pair = tuple[SocketRecord, "SockState | None"]


def _named(pairs: list[Pair], files: dict[int, int]) -> Named:
    """Each socket once (a listener on a bind-made port of the range is read twice, by the dump
    and by its bucket), with cookies unique across the ports read: each port's read numbers its
    cookie-less sockets from 0 (bindhash_table.to_records)."""
    seen: set[tuple[object, ...]] = set()
    out: list[SocketRecord] = []
    states: dict[int, SockState] = {}
    for r, st in pairs:
        k = (r.state, r.local, r.remote, r.inode)
        if k in seen:
            continue
        seen.add(k)
        if r.cookie is not None and r.cookie & LOCAL_COOKIE:
            r = replace(r, cookie=_OWN_COOKIE | len(out))
        out.append(r)
        if st is not None and r.cookie is not None:
            states[r.cookie] = st
    return Named(out, files, states)
