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
the range are ambiguous and marked so (``explicit=None``). For the ports of those,
kernel/connect_origin.py reads the kernel's own answer where BPF can run: the port's bind
bucket (connect-only or not, the test __inet_hash_connect makes) through one socket of each
port found by its 4-tuple (kernel/bpf/socklookup.py), a time-wait entry's TCP timestamps the
same way for the entries to the destination, and only for the few ports a lookup cannot answer
(the fixed local port; a socket gone since the dump) the socket iterator's walk
(kernel/bpf/sockiter.py: SOCK_BINDPORT_LOCK, sk_reuse too). Where BPF cannot run (no privilege,
no BTF, REBIND_NO_BPF), the model takes the worst case and a warning says why.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import TYPE_CHECKING

from rebind.errors import EnvironmentProblem
from rebind.gcpause import gc_paused
from rebind.kernel import diag_codec as codec
from rebind.kernel.connect_origin import Draft, with_kernel_origin
from rebind.model.connect import (
    ConnectRequest,
    ConnectSettings,
    PortHolder,
    RangeBuckets,
    effective_range,
    summary_suffices,
)
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
    from rebind.kernel.connect_dump import FirstDump
    from rebind.kernel.connect_lookup import Named
    from rebind.model.conflict import KernelSettings
    from rebind.model.connect import ConnectResult


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


#: The chain every peerless TCP socket passes (listening, bound-inactive): the servers' ports
#: (:func:`server_ports`) ride on the holders' dump instead of a second walk of the table.
PEERLESS = [codec.port_cond(codec.BcOp.D_EQ, 0)]


def connect_bytecode(
    req: ConnectRequest, src: IPAddress, rng: tuple[int, int], *, servers: bool = False
) -> bytes:
    """The kernel-side filter for :func:`gather` (see the module docstring); ``servers``: every
    peerless socket too (:data:`PEERLESS`)."""
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
    if servers:
        chains.append(PEERLESS)
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
    #: The bind() facts that decide whether a --from address can be bound (None where the
    #: request binds no address: nothing to decide).
    bind_settings: KernelSettings | None = None
    #: The range's ports from the bind hash (gather(summary=True) where it could be read):
    #: ``holders`` are then only the sockets the answer names; pass it to evaluate_connect.
    buckets: RangeBuckets | None = None

    def evaluate(self, req: ConnectRequest) -> ConnectResult:
        """The model's answer for ``req`` from everything gathered. One call for every reader
        (`why --connect`, `rebind trace`'s failing connects): with ``summary`` the holders are
        only the named sockets, and judged without ``buckets`` the range would look free."""
        from rebind.model.connect import evaluate_connect

        return evaluate_connect(
            req,
            self.holders,
            self.settings,
            route_src=self.source,
            bind_settings=self.bind_settings,
            servers=self.servers,
            buckets=self.buckets,
        )


def split_servers(
    recs: Iterable[SocketRecord], rng: tuple[int, int], local_port: int | None
) -> tuple[list[SocketRecord], frozenset[int]]:
    """A TCP dump that took :data:`PEERLESS` too: (the holders, as the filter without that chain
    would have given them, and the TCP servers' ports -- every LISTEN or bound-inactive socket,
    as :func:`server_ports` reads them). A peerless socket is a holder only inside the range or
    on the fixed local port (the other chains: a peer's port is never 0)."""
    lo, hi = rng
    servers: set[int] = set()
    keep: list[SocketRecord] = []
    listen, inactive = State.LISTEN, State.BOUND_INACTIVE
    for r in recs:
        p = r.local.port
        if r.state is listen or r.state is inactive:
            servers.add(p)
        if not r.remote.port and not lo <= p <= hi and p != local_port:
            continue
        keep.append(r)
    return keep, frozenset(servers)


def udp_server_ports(rng: tuple[int, int]) -> frozenset[int] | None:
    """:func:`server_ports`' UDP half: unconnected UDP sockets outside the range (a small table,
    one dump per family). None when it cannot be read."""
    from rebind.errors import RebindError
    from rebind.kernel import diag
    from rebind.model.records import Family

    lo, hi = rng
    try:
        with diag.DiagSocket() as d:
            return frozenset(
                r.local.port
                for fam in (Family.INET, Family.INET6)
                for r in d.dump(fam, Proto.UDP, {State.CLOSE})
                if not r.remote.port and not lo <= r.local.port <= hi
            )
    except (OSError, RebindError):
        return None


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


def _records(req: ConnectRequest, bc: bytes) -> Iterator[SocketRecord]:
    from rebind.kernel import diag

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


def gather(
    req: ConnectRequest,
    *,
    owners: bool = True,
    settings: ConnectSettings | None = None,
    summary: bool = False,
    first: FirstDump | None = None,
    lookups: bool = False,
) -> ConnectFacts:
    """Read everything :func:`rebind.model.connect.evaluate_connect` needs for ``req``.

    ``summary``: where the model allows it (``summary_suffices``: TCP connect()'s own choice, a
    fixed port) and the bind hash can be read, the range's ports come from it
    (``ConnectFacts.buckets``, kernel/connect_range.py) and only the sockets the answer names
    are dumped and given owners; otherwise (no BPF, REBIND_NO_BPF=1, a port the read cannot
    vouch for) every socket of the range, as without it. Pass ``buckets`` on to the model.
    ``first``: the first dump (kernel/connect_dump.py) already started for ``req``, else it
    is started here. ``lookups``: with ``summary``, the named sockets come from lookups and bucket
    walks instead of that dump where they can (kernel/connect_lookup.py: needs HZ known without
    measuring, kernel/hz.py)."""
    with gc_paused():
        return _gather(req, owners=owners, settings=settings, summary=summary, first=first, lookups=lookups)


def _gather(
    req: ConnectRequest,
    *,
    owners: bool,
    settings: ConnectSettings | None,
    summary: bool,
    first: FirstDump | None = None,
    lookups: bool = False,
) -> ConnectFacts:
    tcp = req.proto is Proto.TCP
    summarize = summary and summary_suffices(
        req.proto, own_choice=req.own_choice, fixed_port=req.local_port is not None
    )
    if summarize and first is None and not lookups:
        # the first dump needs nothing the bind hash says: its walk runs while the settings and
        # the bind hash are read (kernel/connect_dump.py)
        from rebind.kernel.connect_dump import FirstDump, worth_starting

        if worth_starting(req):
            first = FirstDump(req)
    st = settings or connect_settings()
    src = route_source(req.dst, req.dport, bound=req.src)
    rng = effective_range(st, req.port_range)
    buckets: RangeBuckets | None = None
    named: Named | str | None = None
    if summarize:
        from rebind.kernel.connect_range import range_buckets

        got = range_buckets(rng)
        if isinstance(got, RangeBuckets):
            buckets = got
            if lookups:
                from rebind.kernel.connect_lookup import named_sockets, outside_ports

                groups = outside_ports(rng)
                named = groups if isinstance(groups, str) else named_sockets(req, src, rng, got, groups)
    # the lookups' answer, where they gave one (else the reason they could not: the dump then)
    found = None if named is None or isinstance(named, str) else named
    servers: frozenset[int] | None = None
    try:
        if found is not None:
            kept, tcp_servers = split_servers(found.records, rng, req.local_port)
        elif buckets is not None:
            from rebind.kernel.connect_dump import bind_made_sockets, dump_tcp, first_bytecode
            from rebind.kernel.connect_range import bind_made_bytecode

            base = first.result() if first is not None and first.req == req else dump_tcp(first_bytecode(req))
            lo, hi = rng
            made = sorted(p for p in buckets.bind_made if lo <= p <= hi)
            more = bind_made_sockets(req, made, base) if made else []
            bc = bind_made_bytecode(rng, buckets) if more is None else None
            if more:
                base = base + more
            elif bc is not None:
                # the bind-made ports' sockets in a second dump; those the first has are left out
                seen = {r.key for r in base}
                base = base + [r for r in dump_tcp(bc) if r.key not in seen]
            kept, tcp_servers = split_servers(base, rng, req.local_port)
        elif tcp:
            bc = connect_bytecode(req, src, rng, servers=True)
            kept, tcp_servers = split_servers(_records(req, bc), rng, req.local_port)
        if tcp:
            udp_servers = udp_server_ports(st.port_range)
            servers = None if udp_servers is None else tcp_servers | udp_servers
            recs = classify(kept, rng)
        else:
            bc = connect_bytecode(req, src, rng, servers=False)
            recs = classify(_records(req, bc), rng)
            servers = server_ports(st.port_range)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read the socket table over netlink: {exc.strerror}") from exc
    by_inode: dict[int, tuple[Owner, ...]] = {}
    scan = OwnerScanReport()
    warnings: list[str] = []
    if owners:
        from rebind.kernel.owners import find_owners

        by_inode, scan = find_owners((r for r, _ in recs), files=found.files if found else None)
        if scan.inaccessible:
            warnings.append(
                f"{scan.inaccessible} process(es) could not be inspected (not root?): "
                "owners of their sockets may be missing"
            )
    drafts = [
        _with_flags(req, SocketEntry(r, by_inode.get(r.inode, ()) if r.inode else ()), e) for r, e in recs
    ]
    known = None
    if buckets is not None:
        # the bind hash answered for every port of the range: no lookup per port
        lo, hi = rng
        held, bind_made = buckets.held, buckets.bind_made
        known = {r.local.port: r.local.port not in bind_made for r, _ in recs if lo <= r.local.port <= hi}
        known = {p: c for p, c in known.items() if p in held}
    holders = with_kernel_origin(req, drafts, warnings, known=known, given=found.states if found else None)
    from rebind.kernel.sysctl import kernel_settings

    # the bind() facts matter only for a bound source address (modes.source_problem)
    bound = req.src is not None and not req.src.is_unspecified
    needs_bind = bound and (req.local_port is not None or req.bind_before_connect)
    return ConnectFacts(
        st,
        src,
        holders,
        scan,
        tuple(warnings),
        servers=servers,
        bind_settings=kernel_settings() if needs_bind else None,
        buckets=buckets,
    )


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
