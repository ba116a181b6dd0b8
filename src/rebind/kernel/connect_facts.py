"""Gather what the client-side model needs, without sending a packet.

* the sysctls of this network namespace (:mod:`rebind.kernel.sysctl`);
* the source address the route would pick: a UDP socket's connect() only looks the route up
  (ip4_datagram_connect -> ip_route_connect) and getsockname() then shows the chosen source;
  nothing is sent;
* the sockets that matter, filtered **in the kernel** in one TCPDIAG_GETSOCK walk: every socket
  connected to the destination (one D_COND op with the port), plus every socket whose local
  port lies in the range (any state, any peer: a client to another server may hold its port
  by bind(), and then connect() cannot share it -- C6), plus, for a fixed local port, every
  socket on it;
* the ports this namespace's servers hold (listening and bound-inactive TCP sockets, unconnected
  UDP sockets outside the range), so a printed "widen the range" fix takes none in;
* the bind() facts (local addresses, ip_nonlocal_bind) that decide whether a ``--from``
  address can be bound at all;
* the processes holding them (:func:`rebind.kernel.owners.find_owners`).

How a socket got its port (bind() or connect()) is not in inet_diag (connect-rules §8): LISTEN,
bound-inactive sockets and the children of a listener are explicit; other client sockets in
the range are ambiguous and marked so (``explicit=None``). For the ports of those, BPF reads the
kernel's own answer where it can run: the port's bind bucket (connect-only or not, the test
__inet_hash_connect makes) through one socket of each port found by its 4-tuple
(kernel/bpf/socklookup.py), a time-wait entry's TCP timestamps the same way for the entries to the
destination, and only for the few ports a lookup cannot answer (the fixed local port; a socket gone
since the dump) the socket iterator's walk (kernel/bpf/sockiter.py: SOCK_BINDPORT_LOCK, sk_reuse
too). Where BPF cannot run (no privilege, no BTF, REBIND_NO_BPF), the model takes the worst case and
a warning says why.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import TYPE_CHECKING, NamedTuple, Protocol

from rebind.errors import EnvironmentProblem
from rebind.kernel import diag_codec as codec
from rebind.model.conflict import KernelSettings
from rebind.model.connect import ConnectRequest, ConnectSettings, PortHolder, effective_range
from rebind.model.connect.request import norm_addr
from rebind.model.records import (
    IPAddress,
    Owner,
    OwnerScanReport,
    Proto,
    SocketEntry,
    SocketRecord,
    State,
)

if TYPE_CHECKING:
    from rebind.model.sockstate import SockState


def connect_settings(root: str = "/proc") -> ConnectSettings:
    """The connect() settings (model/connect/facts.py), projected from the one sysctl reader."""
    from rebind.kernel import sysctl

    h = sysctl.host_settings(root)
    return ConnectSettings(
        port_range=h.range_or_default,
        reserved=h.reserved_or_none,
        tw_reuse=h.tcp_tw_reuse,
        tw_reuse_delay_ms=h.tcp_tw_reuse_delay_ms,
        tcp_timestamps=h.tcp_timestamps,
        autobind_reuse=h.ip_autobind_reuse,
        kernel_version=sysctl.kernel_version(),
        unprivileged_port_start=h.unprivileged_port_start,
    )


def route_source(dst: IPAddress, dport: int, *, bound: IPAddress | None = None) -> IPAddress:
    """The source address the kernel's route to ``dst`` selects; no packet is sent, no port taken.

    A bound address is the source. Otherwise RTM_GETROUTE answers as ``ip route get DST`` does
    (RTA_PREFSRC). The classic trick -- a UDP socket's connect(), then getsockname() -- would
    autobind a UDP port of the ephemeral range, and fail with EAGAIN exactly when that range is
    full, so it is only the fallback. Raises EnvironmentProblem when there is no route (connect()
    would fail with ENETUNREACH before any port question).
    """
    if bound is not None and not bound.is_unspecified:
        return bound
    try:
        found = _rtm_getroute(dst)
    except OSError:
        found = None
    if found is not None:
        return found
    fam = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    with socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect((str(dst), dport))
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            msg = f"no route from this namespace to {dst}: {name} ({exc.strerror})"
            raise EnvironmentProblem(msg) from exc
        return ip_address(s.getsockname()[0])


def _rtm_getroute(dst: IPAddress) -> IPAddress | None:
    """RTM_GETROUTE for ``dst`` (kernel/route.py): the preferred source, None if it names none."""
    from rebind.kernel.route import NoRoute, source_for

    try:
        return source_for(dst)
    except NoRoute as exc:
        raise EnvironmentProblem(f"no route from this namespace to {dst}: {os.strerror(exc.errno)}") from None


def connect_bytecode(req: ConnectRequest, src: IPAddress, rng: tuple[int, int]) -> bytes:
    """The kernel-side filter for :func:`gather` (see the module docstring)."""
    lo, hi = rng
    in_range = [codec.port_cond(codec.BcOp.S_GE, lo), codec.port_cond(codec.BcOp.S_LE, hi)]
    chains: list[list[codec.Cond]] = [
        [codec.host_cond(codec.BcOp.D_COND, req.dst, port=req.dport)],
        # Every socket on a port of the range, whatever its peer: one connected elsewhere may
        # still hold its port by bind() (its bucket is then not connect-only, C6), and a
        # bind(ip, 0) / UDP autobind needs the port unused on an overlapping address (C13, C20).
        in_range,
    ]
    if req.local_port is not None:
        chains.append([codec.port_cond(codec.BcOp.S_EQ, req.local_port)])
    return codec.compile_any(chains)


@dataclass(frozen=True, slots=True)
class ConnectFacts:
    settings: ConnectSettings
    source: IPAddress
    holders: tuple[PortHolder, ...]
    scan: OwnerScanReport
    warnings: tuple[str, ...] = ()
    #: Ports held by servers of this netns (see server_ports); None when unreadable.
    servers: frozenset[int] | None = None
    #: The bind() facts that decide whether a --from address can be bound.
    bind_settings: KernelSettings | None = None


def server_ports(rng: tuple[int, int]) -> frozenset[int] | None:
    """Ports servers of this netns hold: TCP LISTEN and bound-inactive sockets anywhere, and
    unconnected UDP sockets outside the range (inside it they may be clients' autobinds). A
    widened range must take none of them in (C26). None when the table cannot be read."""
    from rebind.errors import RebindError
    from rebind.kernel.walk import walk
    from rebind.model.query import SocketQuery

    lo, hi = rng
    out: set[int] = set()
    try:
        # The listening and bound sockets of both protocols (UDP: CLOSE), in one walk.
        w = walk(SocketQuery.create(states=[State.LISTEN, State.BOUND_INACTIVE]))
        if w.source != "netlink":
            return None  # /proc/net hides bound-inactive sockets: the answer would be short
        for r in w.records:
            if r.proto is Proto.TCP or (not r.remote.port and not lo <= r.local.port <= hi):
                out.add(r.local.port)
    except (OSError, RebindError):
        return None
    return frozenset(out)


def _records(req: ConnectRequest, src: IPAddress, rng: tuple[int, int]) -> Iterator[SocketRecord]:
    from rebind.kernel import diag

    bc = connect_bytecode(req, src, rng)
    with diag.DiagSocket() as d:
        if req.proto is Proto.TCP:
            # One walk of the TCP tables for both families; bound-inactive sockets need the
            # state bit asked explicitly (6.8+).
            yield from d.dump(None, Proto.TCP, frozenset(State), bytecode=bc)
        else:
            from rebind.model.records import Family

            for fam in (Family.INET, Family.INET6):
                yield from d.dump(fam, Proto.UDP, {State.ESTABLISHED, State.CLOSE}, bytecode=bc)


def _child_of(r: SocketRecord, listener: SocketRecord) -> bool:
    """Could ``r`` be a connection accepted by ``listener`` (same port, its address or a wildcard)?"""
    la = listener.local.addr
    return la.is_unspecified or la == r.local.addr


def classify(records: Iterable[SocketRecord], rng: tuple[int, int]) -> list[tuple[SocketRecord, bool | None]]:
    """How each socket got its port, as far as inet_diag shows it (connect-rules §8)."""
    recs = list(records)
    listeners: dict[int, list[SocketRecord]] = {}
    for r in recs:
        if r.state is State.LISTEN:
            listeners.setdefault(r.local.port, []).append(r)
    lo, hi = rng
    out: list[tuple[SocketRecord, bool | None]] = []
    for r in recs:
        explicit: bool | None
        if r.state in (State.LISTEN, State.BOUND_INACTIVE) or (r.proto is Proto.UDP and not r.remote.port):
            explicit = True
        elif not lo <= r.local.port <= hi or any(_child_of(r, ls) for ls in listeners.get(r.local.port, ())):
            explicit = True  # outside the range: bind(); an accepted child shares its listener's port
        else:
            explicit = None
        out.append((r, explicit))
    return out


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (and restore its state after).

    :func:`gather` allocates a few objects per socket (record, entry, owners, holder: 100k
    sockets on a loaded host) and frees almost none, so each generation-0 collection triggers
    the next and the full collections walk the whole growing table: ~20% of the time spent
    (measured, docs/benchmarks.md). Reference counting still frees what is dropped; any cycle
    made meanwhile waits for the next collection after the pause. The switch is process-wide:
    other threads run without the cyclic GC for that second too; concurrent gathers leave it
    on when the first one that found it on ends.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def gather(
    req: ConnectRequest, *, owners: bool = True, settings: ConnectSettings | None = None
) -> ConnectFacts:
    """Read everything :func:`rebind.model.connect.evaluate_connect` needs for ``req``."""
    with _cyclic_gc_paused():
        return _gather(req, owners=owners, settings=settings)


def _gather(req: ConnectRequest, *, owners: bool, settings: ConnectSettings | None) -> ConnectFacts:
    st = settings or connect_settings()
    src = route_source(req.dst, req.dport, bound=req.src)
    rng = effective_range(st, req.port_range)
    try:
        recs = classify(_records(req, src, rng), rng)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read the socket table over netlink: {exc.strerror}") from exc
    by_inode: dict[int, tuple[Owner, ...]] = {}
    scan = OwnerScanReport()
    warnings: list[str] = []
    if owners:
        from rebind.kernel.owners import find_owners

        by_inode, scan = find_owners(r for r, _ in recs)
        if scan.inaccessible:
            warnings.append(
                f"{scan.inaccessible} process(es) could not be inspected (not root?): "
                "owners of their sockets may be missing"
            )
    drafts = [
        _with_flags(req, SocketEntry(r, by_inode.get(r.inode, ()) if r.inode else ()), e) for r, e in recs
    ]
    holders = _with_kernel_origin(req, drafts, warnings)
    from rebind.kernel.sysctl import kernel_settings

    return ConnectFacts(
        st,
        src,
        holders,
        scan,
        tuple(warnings),
        servers=server_ports(st.port_range),
        bind_settings=kernel_settings(),
    )


class HolderFacts(Protocol):
    """What the origin read looks at in a holder: a :class:`PortHolder`, or a :class:`Draft`."""

    @property
    def entry(self) -> SocketEntry: ...
    @property
    def socket(self) -> SocketRecord: ...
    @property
    def explicit(self) -> bool | None: ...
    @property
    def timestamps(self) -> bool | None: ...
    @property
    def reuseaddr(self) -> bool | None: ...
    @property
    def reuseport(self) -> bool | None: ...
    @property
    def bind_port_locked(self) -> bool | None: ...
    @property
    def connect_bind(self) -> bool | None: ...
    @property
    def bucket_connect_only(self) -> bool | None: ...


class Draft(NamedTuple):
    """A holder before the kernel's origin facts are in, with :class:`PortHolder`'s fields in its
    order. :func:`gather` builds one per socket (100k on a loaded host) and :func:`merge_origins`
    builds each PortHolder once, with everything known: a tuple is cheap to make, a frozen
    dataclass is not (one object.__setattr__ per field)."""

    entry: SocketEntry
    explicit: bool | None = None
    timestamps: bool | None = None
    reuseaddr: bool | None = None
    reuseport: bool | None = None
    bind_port_locked: bool | None = None
    connect_bind: bool | None = None
    bucket_connect_only: bool | None = None

    @property
    def socket(self) -> SocketRecord:
        return self.entry.socket


def _built(h: HolderFacts) -> PortHolder:
    """``h`` as a PortHolder: itself if it is one already."""
    if isinstance(h, PortHolder):
        return h
    return PortHolder(
        h.entry,
        h.explicit,
        h.timestamps,
        h.reuseaddr,
        h.reuseport,
        h.bind_port_locked,
        h.connect_bind,
        h.bucket_connect_only,
    )


def origin_ports(req: ConnectRequest, holders: Sequence[HolderFacts]) -> set[int]:
    """The TCP ports whose origin the kernel is asked for: those of ambiguous client sockets, and
    ``req.local_port`` where its holders' kernel facts decide the answer (C17, C19)."""
    tcp = Proto.TCP
    ports = {h.entry.socket.local.port for h in holders if h.explicit is None and h.entry.socket.proto is tcp}
    if (
        req.proto is Proto.TCP
        and req.local_port is not None
        and any(h.socket.is_mini and h.socket.local.port == req.local_port for h in holders)
    ):
        ports.add(req.local_port)  # a time-wait entry's own timestamps decide C17
    if req.local_port is not None and any(
        h.socket.proto is Proto.TCP and h.socket.local.port == req.local_port and h.reuseaddr is None
        for h in holders
    ):
        # a fixed-port bind(): the bind rules compare the holders' SO_REUSEADDR/SO_REUSEPORT, which
        # no owner gave (none visible, another PID namespace, a TIME_WAIT): the kernel's own
        # sk_reuse/sk_reuseport (tw_* copies) answer (C19: the seed's fixed-port client)
        ports.add(req.local_port)
    return ports


@dataclass(frozen=True, slots=True)
class OriginPlan:
    """What :func:`_with_kernel_origin` reads, and how (see :func:`origin_plan`)."""

    #: One socket per port, whose 4-tuple leads bpf_skc_lookup_tcp to the port's bind bucket.
    reps: dict[int, SocketRecord]
    #: Ports whose sockets are read one by one by the iterator's walk (every fact of each).
    walk: frozenset[int]
    #: Indices of the holders (time-wait entries to the destination) whose timestamps to look up.
    stamps: tuple[int, ...]


def _rep_rank(r: SocketRecord) -> int:
    """How surely a socket's 4-tuple finds a socket with the port's bucket: a full connection
    (icsk_bind_hash), then a time-wait entry (tw_tb), then a SYN_RECV (maybe a request sock,
    which has no bucket); a device-bound one last (the lookup passes no device)."""
    rank = 0 if not r.is_mini and r.state is not State.SYN_RECV else 1 if r.is_mini else 2
    return rank + (3 if r.ifindex else 0)


def origin_plan(req: ConnectRequest, holders: Sequence[HolderFacts], ports: Iterable[int]) -> OriginPlan:
    """How to read the facts the model decides by for ``ports``, without walking every socket.

    * The bind bucket is one per port (__inet_hash_connect tests it for the port, C6): one
      socket of the established hash per port leads to it (socklookup.lookup_port_buckets).
      Once it is known, ``bucket_connect_only`` decides ``port_from_bind`` for every socket of
      the port, so SOCK_BINDPORT_LOCK (``bind_port_locked``) is needed only where it is not.
    * A time-wait entry's own timestamps (tw_ts_recent_stamp) count only for the entries to
      the destination (tcp_twsk_unique for the new 4-tuple: C8, C17): looked up by 4-tuple.
    * ``req.local_port``: its holders' sk_reuse/sk_reuseport feed the bind rules (C19), and
      a bound-inactive socket is in no hash a lookup searches: that port is walked.
    A port with no socket the lookup can find is walked too."""
    want = set(ports)
    best: dict[int, tuple[int, SocketRecord]] = {}
    done: set[int] = set()  # ports with a socket of the best rank: nothing better to look for
    tcp = Proto.TCP
    for h in holders:
        r = h.entry.socket
        p = r.local.port
        if p in done or p not in want or r.proto is not tcp or not r.remote.port:
            continue
        rank = _rep_rank(r)
        if p not in best or rank < best[p][0]:
            best[p] = (rank, r)
            if not rank:
                done.add(p)
    walk = {p for p in want if p not in best}
    if req.local_port is not None and req.local_port in want:
        walk.add(req.local_port)
    reps = {p: r for p, (_, r) in best.items() if p not in walk}
    stamps = tuple(
        i
        for i, r in enumerate(h.entry.socket for h in holders)
        if r.remote.port == req.dport
        and r.proto is tcp
        and r.local.port in reps
        and r.is_mini
        and norm_addr(r.remote.addr) == req.dst
    )
    return OriginPlan(reps, frozenset(walk), stamps)


def lookup_tuple(r: SocketRecord) -> tuple[int, bytes, bytes, int]:
    """(local port, local address, remote address, remote port) as lookup_port_buckets takes
    them: 4-byte addresses for IPv4 and an IPv6 socket talking IPv4 (hashed by its IPv4
    addresses, socklookup._entry), else 16."""
    la, ra = r.local.addr, r.remote.addr
    if isinstance(la, IPv6Address) and isinstance(ra, IPv6Address):
        la4, ra4 = la.ipv4_mapped, ra.ipv4_mapped
        if la4 is not None and ra4 is not None:
            la, ra = la4, ra4
    return r.local.port, la.packed, ra.packed, r.remote.port


@dataclass(frozen=True, slots=True)
class OriginFacts:
    """What the kernel said for an :class:`OriginPlan`."""

    #: Per port: is its bind bucket connect()-made (fastreuse < 0 and fastreuseport < 0)?
    connect_only: dict[int, bool]
    #: The ports read by the walk, and their sockets by cookie.
    walked: frozenset[int] = frozenset()
    by_cookie: dict[int, SockState] = field(default_factory=dict)
    #: Per holder index: did the time-wait entry use TCP timestamps (tw_ts_recent_stamp != 0)?
    stamps: dict[int, bool] = field(default_factory=dict)


def merge_origins(
    holders: Sequence[HolderFacts], ports: Iterable[int], got: OriginFacts
) -> tuple[PortHolder, ...]:
    """The holders with the kernel's facts, each PortHolder built once; a PortHolder nothing
    changes is kept as it is (no copy)."""
    from rebind.model.sockstate import SockKind

    want = set(ports)
    tcp = Proto.TCP
    connect_only, stamps, walked = got.connect_only, got.stamps, got.walked
    out: list[PortHolder] = []
    for i, h in enumerate(holders):
        r = h.entry.socket
        p = r.local.port
        if p not in want or r.proto is not tcp:
            out.append(_built(h))
            continue
        bco = connect_only.get(p)
        if p not in walked and i not in stamps:
            # the common case, a port whose bucket a lookup read: that alone changes
            out.append(
                _built(h)
                if bco == h.bucket_connect_only
                else PortHolder(
                    h.entry,
                    h.explicit,
                    h.timestamps,
                    h.reuseaddr,
                    h.reuseport,
                    h.bind_port_locked,
                    h.connect_bind,
                    bco,
                )
            )
            continue
        locked, ts = h.bind_port_locked, stamps.get(i, h.timestamps)
        reuseaddr, reuseport = h.reuseaddr, h.reuseport
        if p in got.walked:
            st = got.by_cookie.get(r.cookie) if r.cookie is not None else None
            locked = st.port_locked if st is not None and st.kind is SockKind.FULL else None
            if st is not None and st.kind is SockKind.TIMEWAIT and st.tw_ts_recent_stamp is not None:
                ts = st.tw_ts_recent_stamp != 0  # what tcp_twsk_unique tests
            if reuseaddr is None and st is not None and st.kind is not SockKind.REQUEST:
                reuseaddr, reuseport = st.reuseaddr, st.reuseport
        if (bco, locked, ts, reuseaddr, reuseport) == (
            h.bucket_connect_only,
            h.bind_port_locked,
            h.timestamps,
            h.reuseaddr,
            h.reuseport,
        ):
            out.append(_built(h))
            continue
        out.append(
            PortHolder(
                h.entry,
                explicit=h.explicit,
                timestamps=ts,
                reuseaddr=reuseaddr,
                reuseport=reuseport,
                bind_port_locked=locked,
                connect_bind=h.connect_bind,
                bucket_connect_only=bco,
            )
        )
    return tuple(out)


def _unknown_origin(
    holders: Sequence[HolderFacts], ports: Iterable[int] | None, reason: str, warnings: list[str]
) -> None:
    want = None if ports is None else set(ports)
    n = sum(
        1
        for h in holders
        if h.explicit is None
        and h.socket.proto is Proto.TCP
        and (want is None or h.socket.local.port in want)
    )
    if n:
        warnings.append(
            f"how {n} client socket(s) got their ports is unknown ({reason}): the worst case is assumed"
        )


def _with_kernel_origin(
    req: ConnectRequest, holders: Sequence[HolderFacts], warnings: list[str]
) -> tuple[PortHolder, ...]:
    """Fill in, from the kernel, how the ports of ambiguous client sockets were taken (TCP):
    lookups by 4-tuple (:func:`origin_plan`), and the iterator's walk only for the few ports
    they cannot answer. Whatever stays unread stays unknown: the worst case, never optimistic."""
    ports = origin_ports(req, holders)
    if not ports:
        return tuple(map(_built, holders))
    from rebind.kernel.bpf.sockiter import load_sock_layout, prepare, read_socket_states
    from rebind.kernel.bpf.socklookup import lookup_port_buckets, lookup_socket_states
    from rebind.model.sockstate import SockKind, SockStates, Unavailable

    ready = prepare()
    if isinstance(ready, Unavailable):
        _unknown_origin(holders, None, ready.reason, warnings)
        return tuple(map(_built, holders))
    plan = origin_plan(req, holders, ports)
    lay = load_sock_layout()
    walk = set(plan.walk)
    connect_only: dict[int, bool] = {}
    faulted = 0
    rep_ports = list(plan.reps)
    found = lookup_port_buckets(lay, [lookup_tuple(plan.reps[p]) for p in rep_ports])
    if isinstance(found, Unavailable):
        walk |= ports  # as before the lookups: the walk reads every fact of every port
    else:
        for p, b in zip(rep_ports, found, strict=True):
            if b is None:
                walk.add(p)  # the socket went away (or its copy faulted): any other of the port
            else:
                connect_only[p] = b[0] < 0 and b[1] < 0
    stamps: dict[int, bool] = {}
    todo = [i for i in plan.stamps if holders[i].socket.local.port not in walk]
    if todo:
        states = lookup_socket_states(lay, [holders[i].socket for i in todo])
        if isinstance(states, Unavailable):
            walk |= {holders[i].socket.local.port for i in todo}
        else:
            faulted += states[1]
            for i, st in zip(todo, states[0], strict=True):
                if st is not None and st.kind is SockKind.TIMEWAIT and st.tw_ts_recent_stamp is not None:
                    stamps[i] = st.tw_ts_recent_stamp != 0  # what tcp_twsk_unique tests
    walked: frozenset[int] = frozenset()
    by_cookie: dict[int, SockState] = {}
    if walk:
        got = read_socket_states(walk, [Proto.TCP])
        if isinstance(got, SockStates):
            walked = frozenset(walk)
            by_cookie = got.by_cookie()
            faulted += got.faulted
            for one in got.sockets:
                # The bucket is one per port: any socket's copy of it answers for all of them.
                if one.bucket is not None and one.local.port in walk:
                    connect_only[one.local.port] = one.bucket.fastreuse < 0 and one.bucket.fastreuseport < 0
        else:
            _unknown_origin(holders, walk, got.reason, warnings)
    out = merge_origins(holders, ports, OriginFacts(connect_only, walked, by_cookie, stamps))
    if faulted:
        warnings.append(f"{faulted} socket(s) changed while the kernel was read: answers may lag")
    return out


def _with_flags(req: ConnectRequest, entry: SocketEntry, explicit: bool | None) -> Draft:
    """SO_REUSEADDR / SO_REUSEPORT matter for a fixed local port (bind rules) and UDP sharing
    (C23); inet_diag hides them, so read them from a live owner (pidfd_getfd + getsockopt)."""
    r = entry.socket
    if r.local.port != req.local_port and r.proto is not Proto.UDP:
        return Draft(entry, explicit)
    from rebind.kernel.pidfd import socket_flags

    for o in entry.owners:
        flags = socket_flags(o.pid, o.fd, o.start_ticks)
        if flags is not None:
            return Draft(entry, explicit, reuseaddr=flags[0], reuseport=flags[1])
    return Draft(entry, explicit)
