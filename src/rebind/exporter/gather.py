"""One scrape's facts from the kernel: kernel-filtered inet_diag dumps, sysctls, route lookups.

Each table is walked at most once per scrape, however many ports and destinations are
watched: the filters are OR-ed into one bytecode program (see :mod:`.bytecode`).

* TCP LISTEN (the listening hash; cheap): local port watched, or inside the ephemeral range.
* TCP bound-inactive (bhash2): the same filter. inet_diag_dump_icsk walks every bound socket
  of the host for it (bhash2 has no port index): 48 ms of CPU at 211k sockets in
  bench/exporter.py. So it is walked every scrape only while that walk is cheap (< 5 ms);
  beyond, at most once per ``slow_every`` seconds and reused in between.
* TCP connections (the established hash, one walk): local port watched, or remote a ``--dest``.
  Counted with :mod:`.fastdiag`; only the sockets the conflict model needs are fully decoded.
* UDP, per family, only when a UDP port is watched.
* With ``--dest``: the bind bucket of every port of the range but the reserved ones and the
  listeners', read from the kernel's bind hash (:mod:`.origins`: one chain walk per port, no
  socket visited): connect() chose the port, or bind() did (bind(ip, 0), a port bind() named, a
  bound-inactive socket: exact each scrape, however old the reused bound-inactive walk), and
  only the bucket tells (connect-rules.md §8, C6). Where the bind hash cannot be
  read, the fallback: the client sockets of the range without SOCK_BINDPORT_LOCK (a second walk
  of the established hash), one per port, each port's bucket read through its socket
  (:func:`.origins.read_connect_only`), and the ports bind() named from the connection walk's
  last group. Where BPF cannot run at all such ports are counted neither free nor bind-held, and
  rebind_exporter_missing says so (reason ``port_origin_unknown``).

Nothing here binds, connects or destroys: a scrape never changes kernel state.

The flags of each watched server (SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY) are read from its
listener (or bound UDP socket) -- the kernel's own, by BPF, else once per socket through its
owner (``pidfd_getfd`` + ``getsockopt``, which needs ptrace-grade access: root) -- and remembered
after it is gone: its TIME_WAITs carry them. The kernel's state of the sockets the model judges
(their flags, the TCP bind bucket, the UDP chain order) is read each scrape as `why` reads it
(:meth:`Gatherer._kernel`); where BPF cannot run, what hinges on it is unknown, never optimistic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from rebind.errors import EnvironmentProblem, KernelError
from rebind.exporter import bytecode as bc
from rebind.exporter.connect_counts import origin_candidates, port_origins
from rebind.exporter.facts import (
    WILDCARD4,
    Dest,
    EphemeralRange,
    Missing,
    PortOrigins,
    PortTuple,
    Reason,
    ServerFlags,
    Snapshot,
    Watch,
    norm,
)
from rebind.exporter.host import FlagReader, read_ephemeral, read_settings, read_socket_flags
from rebind.exporter.origins import (
    BucketReader,
    bucket_origins,
    range_ports,
    read_connect_only,
    read_range_buckets,
)
from rebind.exporter.tally import Tally, addr_key
from rebind.kernel.route import NoRoute, source_for
from rebind.kernel.sysctl import host_settings
from rebind.model.assess import Provenance, kernel_holder, kernel_state_of
from rebind.model.conflict import SockOpts
from rebind.model.records import Family, IPAddress, Proto, SocketEntry, SocketRecord, State
from rebind.model.sockstate import SockState, SockStates, Unavailable

if TYPE_CHECKING:
    from rebind.kernel.diag import DiagSocket

#: inet_diag's TCP_BOUND_INACTIVE state bit (91051f003948).
BOUND_INACTIVE_SINCE = (6, 8)
#: A bound-inactive walk cheaper than this (CPU seconds) is repeated every scrape.
CHEAP_WALK_S = 0.005
_CONN_STATES = frozenset(State) - {State.LISTEN, State.BOUND_INACTIVE}
#: Client sockets: a request sock (SYN_RECV) is a listener's, whose port is known bind-held.
_CLIENT_STATES = _CONN_STATES - {State.SYN_RECV}
_SERVER_METRICS = ("rebind_sockets", "rebind_port_bindable", "rebind_listener_accept_queue")
_CLIENT_METRICS = ("rebind_ephemeral_bind_held_ports", "rebind_connect_free_ports", "rebind_connect_timewait")


class Gatherer:
    """Gathers snapshots for one set of watches and dests; remembers the bound-inactive walk and
    the flags each watched server was seen with."""

    def __init__(
        self,
        watches: Sequence[Watch],
        dests: Sequence[Dest],
        *,
        slow_every: float = 60.0,
        read_flags: FlagReader = read_socket_flags,
        read_kernel: bool = True,
        read_origins: Callable[[Mapping[int, PortTuple]], Mapping[int, bool]] = read_connect_only,
        read_buckets: BucketReader = read_range_buckets,
    ) -> None:
        self.watches = tuple(watches)
        self.dests = tuple(dests)
        self.slow_every = slow_every
        self._read_flags = read_flags
        self.read_kernel = read_kernel
        self._read_origins = read_origins
        self._read_buckets = read_buckets
        #: port -> (the cookie of the socket its bucket was read through, connect-only?)
        self._origin_seen: dict[int, tuple[int, bool]] = {}
        self._flags: dict[Watch, ServerFlags] = {}
        self._bound: tuple[SocketRecord, ...] | None = None
        self._bound_at = 0.0
        self._bound_cost = 0.0

    def __call__(self) -> Snapshot:
        t0 = time.perf_counter()
        missing: list[Missing] = []
        host = host_settings()
        rng = read_ephemeral(host)
        if rng is None:
            missing += [
                Missing(m, Reason.SYSCTL_UNREADABLE)
                for m in ("rebind_ephemeral_range_ports", *_CLIENT_METRICS)
            ]
        settings = read_settings(rng, host)
        sources = self._sources(missing)
        netlink = not os.environ.get("REBIND_FORCE_PROCFS")  # as rebind.kernel.diag.netlink_available
        bi_visible = netlink and settings.kernel_version >= BOUND_INACTIVE_SINCE
        if netlink and not bi_visible:
            missing.append(Missing("rebind_sockets", Reason.KERNEL_TOO_OLD))
        tally = Tally(self.watches, self.dests)
        try:
            if netlink:
                try:
                    watched, bound, origins = self._netlink(tally, rng, bi_visible)
                except EnvironmentProblem:
                    netlink = bi_visible = False
                    tally = Tally(self.watches, self.dests)
            if not netlink:
                missing.append(Missing("rebind_sockets", Reason.NETLINK_UNAVAILABLE))
                watched, bound, reps = self._procfs(tally, rng)
                origins = self._origins(reps)
        except (KernelError, OSError) as exc:
            reason = Reason.PERMISSION_DENIED if isinstance(exc, PermissionError) else Reason.KERNEL_ERROR
            missing += [Missing(m, reason) for m in (*_SERVER_METRICS, *_CLIENT_METRICS)]
            return Snapshot(
                watches=self.watches, dests=self.dests, watched=None, usage=None, bound_in_range=None,
                ephemeral=rng, sources=sources, settings=settings, missing=tuple(missing),
                duration_s=time.perf_counter() - t0,
            )  # fmt: skip
        kernel = self._kernel(watched) if self.read_kernel else ()
        return Snapshot(
            watches=self.watches,
            dests=self.dests,
            watched=tuple(watched),
            counts=tuple(tally.counts.items()),
            tw_expires_ms=tuple(tally.tw_max.items()),
            server_flags=self._remember(watched, {st.cookie: st for st in kernel}),
            kernel=kernel,
            usage=tally.dest_usage(),
            peers=tally.peers(),
            bound_in_range=bound,
            bind_held_conn=frozenset(tally.bind_held),
            origins=origins,  # unknown ones: rebind_exporter_missing (families._client)
            ephemeral=rng,
            sources=sources,
            settings=settings,
            bound_inactive_visible=bi_visible,
            source="netlink" if netlink else "procfs",
            missing=tuple(missing),
            duration_s=time.perf_counter() - t0,
        )

    def _remember(
        self, watched: Sequence[SocketRecord], kernel: Mapping[int, SockState]
    ) -> tuple[tuple[Watch, ServerFlags], ...]:
        """The flags of each watched server's own socket, kept after it is gone: the kernel's own
        (``kernel``, the BPF read of this scrape: no owner needed), else read through its owner
        when the socket is new (once per socket: an owner scan is not per-scrape work)."""
        own: dict[tuple[int, Proto, IPAddress], SocketRecord] = {}
        for r in watched:
            if r.state is (State.LISTEN if r.proto is Proto.TCP else State.CLOSE):
                own.setdefault((r.local.port, r.proto, norm(r.local.addr)), r)
        for w in self.watches:
            mine = own.get((w.port, w.proto, norm(w.addr)))
            if mine is None:
                continue  # gone (or not up yet): what was read while it lived still holds
            known = self._flags.get(w)
            if known is not None and known.inode == mine.inode and known.exact:
                continue
            st = kernel_state_of(mine, kernel)
            if st is not None:
                got = kernel_holder(SocketEntry(mine), st)
                self._flags[w] = ServerFlags(got.opts, Provenance.KERNEL, mine.uid, mine.inode)
                continue
            if known is not None and known.inode == mine.inode:
                continue  # its owner was asked once already
            opts = self._read_flags(mine)
            how = Provenance.READ if opts is not None else Provenance.UNKNOWN
            self._flags[w] = ServerFlags(opts or SockOpts(), how, mine.uid, mine.inode)
        return tuple(self._flags.items())

    def _origins(self, reps: Mapping[int, PortTuple]) -> PortOrigins:
        """The bind buckets of the ports in ``reps`` (one client socket each): bind-made, or
        connect-made (then shareable), or unknown (without BPF: never counted free).

        A port whose socket (by cookie) is the one its bucket was read through last scrape keeps
        that answer: a socket holds its bucket (icsk_bind_hash, a TIME_WAIT's tw_tb, which
        keeps the cookie) until it is freed, and inet_bind_bucket_destroy frees a bucket only
        once empty, so the bucket cannot have been made anew meanwhile. Only the others are read."""
        if not reps:
            self._origin_seen = {}
            return PortOrigins()
        got: dict[int, bool] = {}
        todo: dict[int, PortTuple] = {}
        for port, t in reps.items():
            seen = self._origin_seen.get(port)
            if seen is not None and t[3] and seen[0] == t[3]:
                got[port] = seen[1]
            else:
                todo[port] = t
        if todo and self.read_kernel:
            got.update(self._read_origins(todo))
        self._origin_seen = {p: (reps[p][3], v) for p, v in got.items() if reps[p][3]}
        return port_origins(reps, got)

    def _kernel(self, watched: Sequence[SocketRecord]) -> tuple[SockState, ...]:
        """The kernel's own state of the sockets the model judges, read as `why` reads it
        (kernel/sockstates.py: iterator_plan per watched port, all of them carried out at once by
        read_kernel_ports: one listening-hash walk, lookups by 4-tuple, the UDP walk). Empty
        where BPF cannot run (unprivileged, no BTF, REBIND_NO_BPF): the answers that hinge on
        it are then unknown, never optimistic (rebind_exporter_missing says which fact)."""
        from rebind.kernel.sockstates import iterator_plan, read_kernel_ports
        from rebind.model.request import BindRequest

        entries = [SocketEntry(r) for r in watched]
        plans = [
            (req, iterator_plan(req, entries, {}))
            for key in sorted({w.key for w in self.watches})
            for req in (BindRequest(proto=key.proto, addr=WILDCARD4, port=key.port),)
        ]
        got = read_kernel_ports(entries, plans)
        return got.sockets if isinstance(got, SockStates) else ()

    def _sources(self, missing: list[Missing]) -> tuple[tuple[Dest, IPAddress | None], ...]:
        out: list[tuple[Dest, IPAddress | None]] = []
        for d in self.dests:
            try:
                src = source_for(d.addr)
            except (NoRoute, OSError):
                src = None
            if src is None and not any(m.reason is Reason.NO_ROUTE for m in missing):
                missing.append(Missing("rebind_connect_free_ports", Reason.NO_ROUTE))
            out.append((d, src))
        return tuple(out)

    def _port_group(self) -> bc.Group:
        ports = sorted(self._tcp_ports())
        guard = (bc.sport_ge(ports[0]), bc.sport_le(ports[-1])) if len(ports) > 1 else ()
        return bc.Group(guard, tuple((bc.sport_eq(p),) for p in ports))

    def _server_filter(self, rng: EphemeralRange | None) -> bytes | None:
        groups = [self._port_group()]
        if rng is not None and rng.lo <= rng.hi:
            groups.append(bc.Group((), ((bc.sport_ge(rng.lo), bc.sport_le(rng.hi)),)))
        return bc.program(groups) if any(g.terms for g in groups) else None

    def _conn_filter(self, rng: EphemeralRange | None, bind_named: bool = True) -> bytes | None:
        """Connections on a watched port or to a dest; with ``bind_named`` (the fallback, when
        the bind hash was not read) also those on ports of the range that bind() named."""
        dports = sorted({d.port for d in self.dests})
        guard = (bc.dport_ge(dports[0]), bc.dport_le(dports[-1])) if len(self.dests) > 1 else ()
        dest_group = bc.Group(guard, tuple((bc.remote_is(d.addr, d.port),) for d in self.dests))
        groups = [self._port_group(), dest_group]
        if bind_named and self.dests and rng is not None and rng.lo <= rng.hi:
            # Connections on ports of the range that bind() named (a fixed-port client): their
            # bucket is bind-made, so connect() skips the port for every destination (C6).
            # Last: the negated op must end the program (bytecode.Op.negate).
            bound = (bc.sport_ge(rng.lo), bc.sport_le(rng.hi), bc.port_bound_explicitly())
            groups.append(bc.Group((), (bound,)))
        return bc.program(groups) if any(g.terms for g in groups) else None

    def _client_filter(self, rng: EphemeralRange | None) -> bytes | None:
        """Client sockets on ports of the range whose port no bind() named (INET_DIAG_BC_AUTO):
        their origin is in the bind bucket only. Asked only with --dest (the connect metrics)."""
        if not self.dests or rng is None or rng.lo > rng.hi:
            return None
        return bc.program([bc.Group((), ((bc.sport_ge(rng.lo), bc.sport_le(rng.hi), bc.port_autobound()),))])

    def _tcp_ports(self) -> set[int]:
        return {w.port for w in self.watches if w.proto is Proto.TCP}

    def _udp_ports(self) -> list[int]:
        return sorted({w.port for w in self.watches if w.proto is Proto.UDP})

    def _netlink(
        self, tally: Tally, rng: EphemeralRange | None, bound_inactive: bool
    ) -> tuple[list[SocketRecord], tuple[SocketRecord, ...], PortOrigins]:
        from rebind.kernel.diag import DiagSocket

        watched: list[SocketRecord] = []
        with DiagSocket() as sock:
            in_range = self._servers(sock, tally, rng, bound_inactive, watched)
            # Read before the connection walk: where the bind hash answers, that walk needs no
            # group for the ports bind() named (their buckets say so) and no second walk follows.
            listeners = tuple(r for r in in_range if r.state is State.LISTEN)
            origins = self._range_origins(rng, listeners)
            self._connections(sock, tally, rng, watched, bind_named=origins is None)
            if origins is None:
                origins = self._origins(self._client_reps(sock, tally, rng, in_range))
            else:
                # The buckets judged every other port of the range, a bound-inactive socket's
                # too, this scrape: the bound-inactive walk may be up to slow_every old.
                in_range = listeners
            udp = self._udp_ports()
            if udp:
                ucode = bc.any_of([[bc.sport_eq(p)] for p in udp])
                for fam in (Family.INET, Family.INET6):
                    for r in sock.dump(fam, Proto.UDP, [State.CLOSE, State.ESTABLISHED], bytecode=ucode):
                        watched.append(r)
                        tally.server(r)
        return watched, in_range, origins

    def _servers(
        self,
        sock: DiagSocket,
        tally: Tally,
        rng: EphemeralRange | None,
        bound_inactive: bool,
        watched: list[SocketRecord],
    ) -> tuple[SocketRecord, ...]:
        """Listeners and bound-inactive sockets on watched ports (into ``watched``) and on ports
        of the range (returned)."""
        code = self._server_filter(rng)
        if code is None:
            return ()
        tcp_ports = self._tcp_ports()
        in_range: list[SocketRecord] = []
        servers = list(sock.dump(None, Proto.TCP, [State.LISTEN], bytecode=code))
        if bound_inactive:
            servers += self._bound_inactive(sock, code)
        for r in servers:
            if r.local.port in tcp_ports:
                watched.append(r)
                tally.server(r)
            if rng is not None and rng.lo <= r.local.port <= rng.hi:
                in_range.append(r)
        return tuple(in_range)

    def _range_origins(
        self, rng: EphemeralRange | None, listeners: Sequence[SocketRecord]
    ) -> PortOrigins | None:
        """The origins of the range's ports from their bind buckets (:mod:`.origins`), every port
        but the reserved ones and those a listener holds (bind-made: counted from the
        ``listeners``, the listening hash's answer of this scrape). None: not asked (no --dest,
        no range: nothing is read, as before), or the bind hash cannot be read here: the caller
        takes the fallback."""
        if not self.dests or rng is None or rng.lo > rng.hi or not self.read_kernel:
            return None
        ports = range_ports(rng, (r.local.port for r in listeners))
        got = self._read_buckets(ports)
        if isinstance(got, Unavailable):
            return None
        self._origin_seen = {}  # the fallback's memory: stale once the bind hash answered
        return bucket_origins(ports, got)

    def _connections(
        self,
        sock: DiagSocket,
        tally: Tally,
        rng: EphemeralRange | None,
        watched: list[SocketRecord],
        *,
        bind_named: bool,
    ) -> None:
        """The connection walk (the established hash): every socket counted by the tally, the few
        the conflict model needs decoded whole (into ``watched``)."""
        from rebind.exporter import fastdiag
        from rebind.kernel import diag_codec as codec
        from rebind.kernel.diag import states_mask

        ccode = self._conn_filter(rng, bind_named)
        tally.client_range(rng if bind_named else None)
        if ccode is None:
            return
        req = codec.dump_request_tcp_any_family(states_mask(_CONN_STATES), bytecode=ccode)
        for payload in fastdiag.scan_conns(sock, req, tally):
            watched.append(codec.decode_socket(Proto.TCP, memoryview(payload), netns=sock.netns))

    def _client_reps(
        self, sock: DiagSocket, tally: Tally, rng: EphemeralRange | None, in_range: Sequence[SocketRecord]
    ) -> dict[int, PortTuple]:
        """The fallback: one client socket of each port of the range whose port no bind() named
        (a second walk of the established hash), for its bucket to be read through it. Ports
        whose origin is known already are skipped unread."""
        from rebind.exporter import fastdiag
        from rebind.kernel import diag_codec as codec
        from rebind.kernel.diag import states_mask

        acode = self._client_filter(rng)
        if acode is None or rng is None:
            return {}
        known = {r.local.port for r in in_range} | tally.bind_held
        skip = known | {p for p in rng.reserved if rng.lo <= p <= rng.hi}
        req = codec.dump_request_tcp_any_family(states_mask(_CLIENT_STATES), bytecode=acode)
        return fastdiag.first_per_port(sock, req, skip)

    def _bound_inactive(self, sock: DiagSocket, code: bytes) -> tuple[SocketRecord, ...]:
        now = time.monotonic()
        cheap = self._bound_cost < CHEAP_WALK_S
        if self._bound is not None and not cheap and now - self._bound_at < self.slow_every:
            return self._bound
        c0 = time.process_time()
        self._bound = tuple(sock.dump(None, Proto.TCP, [State.BOUND_INACTIVE], bytecode=code))
        self._bound_cost = time.process_time() - c0
        self._bound_at = now
        return self._bound

    def _procfs(
        self, tally: Tally, rng: EphemeralRange | None
    ) -> tuple[list[SocketRecord], tuple[SocketRecord, ...], dict[int, PortTuple]]:
        """/proc/net when netlink is unavailable: whole files, filtered here (no bound-inactive;
        no SOCK_BINDPORT_LOCK either: every client port of the range has its bucket read)."""
        from rebind.kernel import procnet

        fams = (Family.INET, Family.INET6)
        every = frozenset(State)
        recs = list(procnet.iter_sockets(protos=(Proto.TCP,), families=fams, states=every, ports=None))
        lo, hi = (rng.lo, rng.hi) if rng is not None else (1, 0)
        in_range = tuple(r for r in recs if r.state is State.LISTEN and lo <= r.local.port <= hi)
        watched = tally.records(recs)
        reps: dict[int, PortTuple] = {}
        if self.dests and rng is not None:
            clients = [r for r in recs if r.state in _CLIENT_STATES]
            known = frozenset(r.port for r in in_range)
            ports = origin_candidates((r.local.port for r in clients), rng, known)
            for r in clients:
                if r.local.port in ports and r.local.port not in reps:
                    local, remote = addr_key(r.local.addr), addr_key(r.remote.addr)
                    reps[r.local.port] = (local, remote, r.remote.port, r.cookie or 0)
        udp = self._udp_ports()
        if udp:
            watched += tally.records(
                procnet.iter_sockets(protos=(Proto.UDP,), families=fams, states=every, ports=udp)
            )
        return watched, in_range, reps


def gather(watches: Sequence[Watch], dests: Sequence[Dest]) -> Snapshot:
    """One snapshot, without memory between calls (tests, one-shot textfiles)."""
    return Gatherer(watches, dests)()
