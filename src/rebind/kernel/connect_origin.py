"""How each ambiguous client socket in the range got its port, read from the kernel (issue 17;
connect-rules.md §8): the port's bind bucket through one socket of each port found by its
4-tuple (kernel/bpf/socklookup.py), a time-wait entry's TCP timestamps the same way for the
entries to the destination, and the socket iterator's walk (kernel/bpf/sockiter.py) only for the
few ports a lookup cannot answer (the fixed local port; a socket gone since the dump). Where BPF
cannot run, the holders keep ``explicit=None`` and a warning says the worst case is assumed.

The gatherer (kernel/connect_facts.py) hands in :class:`Draft` holders, cheap tuples, and gets each
:class:`PortHolder` built once here, with what the kernel said."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import TYPE_CHECKING, NamedTuple, Protocol

from rebind.model.connect import ConnectRequest, PortHolder
from rebind.model.connect.request import norm_addr
from rebind.model.records import Proto, SocketEntry, SocketRecord, State

if TYPE_CHECKING:
    from rebind.model.sockstate import SockState


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
    assert isinstance(h, Draft)
    return PortHolder(*h)  # a Draft holds PortHolder's fields in its order


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
    """What :func:`with_kernel_origin` reads, and how (see :func:`origin_plan`)."""

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


def _covered(holders: Sequence[HolderFacts], ports: set[int], given: Mapping[int, SockState]) -> set[int]:
    """The ports of ``ports`` whose every TCP holder's kernel state is ``given`` (by cookie)."""
    if not given or not ports:
        return set()
    out = set(ports)
    for h in holders:
        r = h.socket
        if r.local.port in out and r.proto is Proto.TCP and (r.cookie is None or r.cookie not in given):
            out.discard(r.local.port)
    return out


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


def _tw_to_destination(req: ConnectRequest, holders: Sequence[HolderFacts]) -> bool:
    """Is a time-wait entry to the destination among the holders (its timestamps are read)?"""
    tcp = Proto.TCP
    return any(
        r.is_mini and r.proto is tcp and r.remote.port == req.dport and norm_addr(r.remote.addr) == req.dst
        for r in (h.socket for h in holders)
    )


def with_kernel_origin(
    req: ConnectRequest,
    holders: Sequence[HolderFacts],
    warnings: list[str],
    *,
    known: Mapping[int, bool] | None = None,
    given: Mapping[int, SockState] | None = None,
) -> tuple[PortHolder, ...]:
    """Fill in, from the kernel, how the ports of ambiguous client sockets were taken (TCP):
    lookups by 4-tuple (:func:`origin_plan`), and the iterator's walk only for the few ports
    they cannot answer. Whatever stays unread stays unknown: the worst case, never optimistic.
    ``known``: ports whose bucket was read already (connect()-made or not: the bind hash,
    kernel/connect_range.py): neither looked up nor walked for it (a fixed local port is still
    walked, for its holders' own flags). ``given``: sockets the caller read from the kernel
    already, by cookie (kernel/connect_lookup.py: the bind hash's records): a port whose every
    socket is there is not walked, the given states stand for the walk's."""
    ports = origin_ports(req, holders)
    known = known or {}
    # every port known already, no fixed port to walk, no time-wait entry to the destination:
    # nothing for the socket programs to read
    settled = req.local_port not in ports and all(p in known for p in ports)
    if not ports or (settled and not _tw_to_destination(req, holders)):
        if not ports:
            return tuple(map(_built, holders))
        return merge_origins(holders, ports, OriginFacts({p: known[p] for p in ports}))
    from rebind.kernel.bpf.sockiter import load_sock_layout, prepare, read_socket_states
    from rebind.kernel.bpf.socklookup import lookup_port_buckets, lookup_socket_states
    from rebind.model.sockstate import SockKind, SockStates, Unavailable, connect_made

    ready = prepare()
    if isinstance(ready, Unavailable):
        _unknown_origin(holders, None, ready.reason, warnings)
        return tuple(map(_built, holders))
    plan = origin_plan(req, holders, ports)
    lay = load_sock_layout()
    walk = {p for p in plan.walk if p not in known or p == req.local_port}
    covered = _covered(holders, walk, given or {})
    walk -= covered
    connect_only = {p: known[p] for p in ports if p in known}
    faulted = 0
    rep_ports = [p for p in plan.reps if p not in known]
    found = lookup_port_buckets(lay, [lookup_tuple(plan.reps[p]) for p in rep_ports]) if rep_ports else []
    if isinstance(found, Unavailable):
        # as before the lookups: the walk reads every fact of every port not known already
        walk |= {p for p in ports if p not in known or p == req.local_port}
    else:
        for p, b in zip(rep_ports, found, strict=True):
            if b is None:
                walk.add(p)  # the socket went away (or its copy faulted): any other of the port
            else:
                connect_only[p] = connect_made(*b)
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
                    connect_only[one.local.port] = one.bucket.connect_made
        else:
            _unknown_origin(holders, walk, got.reason, warnings)
    if covered:
        assert given is not None
        walked |= covered
        for h in holders:
            cookie = h.socket.cookie
            st = given.get(cookie) if cookie is not None else None
            if cookie is not None and st is not None and st.local.port in covered:
                by_cookie[cookie] = st
                if st.bucket is not None and st.local.port not in connect_only:
                    connect_only[st.local.port] = st.bucket.connect_made
    out = merge_origins(holders, ports, OriginFacts(connect_only, walked, by_cookie, stamps))
    if faulted:
        warnings.append(f"{faulted} socket(s) changed while the kernel was read: answers may lag")
    return out
