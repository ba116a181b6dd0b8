"""The one I/O gatherer behind `rebind why`: everything model/advice/ needs, read once.

Socket table (inet_diag), the sockets' own bind state (owners' flags by pidfd_getfd +
getsockopt; what only the kernel has -- TIME_WAITs' and owner-less sockets' flags, userlocks, the
bind bucket's cache, UDP chain order -- read by BPF as cheaply as iterator_plan finds: the
listening hash, lookups by 4-tuple (kernel/bpf/socklookup.py) or the whole walk), kernel settings,
IPv6 address states, process-tree hints, and the trial binds that cannot change the answer
(conflict.probe_is_harmless decides which may run).

Known limits of the trials: a socket bound between the dump and a probe is not accounted for
(the probe may then share its fresh bucket for a moment); a UDP probe is bound for a few
microseconds and could receive a datagram meant for a wildcard socket on the port. An
observer-free answer (``trials=False``) has neither.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from rebind.kernel.trial import trial_bind
from rebind.model.advice import Facts, HolderFacts, Provenance
from rebind.model.assess import kernel_holder, port_state
from rebind.model.conflict import (
    KernelSettings,
    PortState,
    SockOpts,
    alternative_requests,
    probe_is_harmless,
)
from rebind.model.diagnosis import ProcessHint
from rebind.model.records import Proto, SocketEntry, SocketTable, State
from rebind.model.request import BindRequest, TrialResult
from rebind.model.sockstate import SockKind, SockState, SockStates, Unavailable


def gather(
    req: BindRequest,
    *,
    owners: bool = True,
    table: SocketTable | None = None,
    trials: bool = True,
    settings: KernelSettings | None = None,
    port: PortState | None = None,
) -> Facts:
    """The facts for ``req``. ``trials=False``: observer-free (nothing is bound).

    ``port``: the port's kernel state beside its sockets (TCP bucket fast-reuse fields, UDP
    chain order) when something read it; None = unknown (no trial then runs in an existing TCP
    bucket: see conflict.probe_is_harmless)."""
    from rebind.kernel.sysctl import kernel_settings
    from rebind.kernel.walk import table as socket_table
    from rebind.model.query import SocketQuery

    if settings is None:
        from rebind.kernel.addrs import ipv6_addresses

        settings = replace(kernel_settings(), ipv6_addresses=ipv6_addresses())
    table = table or socket_table(SocketQuery.create(ports=[req.port], protos=[req.proto]), owners=owners)
    with _gc_paused():
        kernel, read = _kernel_states(table, req)
        holders = _holders(table, req, kernel if isinstance(kernel, SockStates) else None, read)
    if port is None:
        holders, port = port_state(req, holders)
    results: dict[BindRequest, TrialResult] = {}
    skipped = ""
    if trials and not _model_is_exact(req, holders, settings, port):
        results, skipped = _trials(req, table, settings, port or PortState())
    euid = os.geteuid()
    return Facts(
        request=req,
        holders=holders,
        settings=settings,
        table=table,
        hints=_process_hints(table) if owners else {},
        trials=results,
        trial_skipped=skipped,
        port=port,
        can_destroy=_can_destroy(),
        owners_complete=owners and euid == 0 and table.scan.inaccessible == 0,
        kernel=kernel,
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the port's sockets are read and paired: per socket a
    SockState, its HolderFacts and its flags, none in a cycle, ten thousand on a TIME_WAIT port,
    each allocation burst otherwise paying collections that walk the whole socket table (one
    full collection cost `why 9000` more than the kernel read, bench/whyperf.py). Restored as it
    was: the API is called from long-running processes (top, exporter)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True, slots=True)
class KernelRead:
    """How `why` reads what only the kernel has about the port's sockets (iterator_plan).

    Costs on a 211k-socket namespace (bench/whyperf.py): the whole walk ~130 ms CPU whatever the
    port; the listening hash alone ~2 ms; a lookup by 4-tuple ~1 us of kernel time a socket.
    """

    #: TCP: walk the listening hash (listeners' flags, and the bind bucket through them).
    listeners: bool = False
    #: TCP: entries (indexes) to find by their 4-tuple in the established hash: TIME_WAITs and
    #: connections whose flags nobody read, or one socket that leads to the bind bucket.
    lookup: tuple[int, ...] = ()
    #: Walk every socket of the protocol (UDP: the chain order; the iterator decides there).
    walk: bool = False
    #: Why (the first fact that needs the kernel), for docs and tests.
    why: str = ""

    @property
    def nothing(self) -> bool:
        return not (self.listeners or self.lookup or self.walk)


#: Sockets the TCP iterator and lookup cannot help with: request socks (no flags of their own,
#: not in the bind bucket) and bound-only sockets (in no table bpf_iter_tcp walks and not in the
#: established hash: only the bind hashes have them). Their flags come from their owner, or stay
#: unknown.
_NOT_ITERATED = frozenset({State.SYN_RECV, State.NEW_SYN_RECV, State.BOUND_INACTIVE, State.CLOSE})
#: ... and listeners: what is not looked up by 4-tuple in the established hash.
_NOT_CONNECTED = _NOT_ITERATED | {State.LISTEN}
#: sk_bound_dev_if values a lookup from a BPF test run finds: none, or loopback (ifindex 1 in
#: every network namespace: the test run's skb device).
_LOOKUP_DEVICES = frozenset({0, 1})


def iterator_plan(
    req: BindRequest, entries: Sequence[SocketEntry], read: Mapping[int, tuple[SockOpts, Provenance]]
) -> KernelRead:
    """What only the kernel can say exactly about the port, and the cheapest way to read it.

    ``read``: index in ``entries`` -> flags read by pidfd_getfd + getsockopt (Provenance.READ:
    SO_REUSEADDR is sk_reuse, SO_REUSEPORT sk_reuseport, IPV6_V6ONLY sk_ipv6only, the kernel's
    own fields; the device and uid come from inet_diag: idiag_if is sk_bound_dev_if, idiag_uid
    sk_uid). Pure: unit-tested without root (tests/unit/test_iterator_plan.py).

    * No socket of the protocol on the port: nothing to read (and no TCP bind bucket).
    * A socket whose flags were not read -- a TIME_WAIT (tw_reuse/tw_reuseport live only in the
      kernel), a connection not yet accept()ed or held from another PID namespace, a failed
      read: a listener is read by walking the listening hash, any other TCP socket by its
      4-tuple; UDP walks its table.
    * TCP, every flag read: the port's bind bucket still matters. Its SO_REUSEPORT cache
      (tb->fastreuseport, fastuid, fast_rcv_saddr) keeps the uid and address of the last
      SO_REUSEPORT bind on the port also after that socket cleared the flag or closed, and a
      SO_REUSEPORT bind that matches it skips the conflict check (sk_reuseport_match in
      inet_csk_get_port); `why` always weighs SO_REUSEPORT variants, so without the bucket they
      could only be "depends". Every socket in the bucket leads to it (icsk_bind_hash, tw_tb):
      a listener through the listening walk, else one connection looked up; a port of bound-only
      sockets has none the iterator sees (the bucket stays unknown).
    * UDP, every flag read: no bucket cache (udp_lib_get_port checks every socket each time);
      the chain order matters only where udp_lib_lport_inuse may stop early, at a same-uid
      SO_REUSEPORT socket: walk when a socket on the port has SO_REUSEPORT, else nothing.
    """
    # One pass over the table (a port can have ten thousand TIME_WAITs): the port's sockets,
    # those whose flags were not read, and what only the lookups or the walk can reach.
    on_port: list[tuple[int, SocketEntry]] = []
    unread: list[tuple[int, SocketEntry]] = []
    connected: list[tuple[int, SocketEntry]] = []
    lookup_list: list[int] = []
    kernel_only: list[SocketEntry] = []
    listening = False
    proto, port = req.proto, req.port
    for i, e in enumerate(entries):
        r = e.socket
        if r.proto is not proto or r.local.port != port:
            continue
        on_port.append((i, e))
        state = r.state
        listening = listening or state is State.LISTEN
        is_read = (got := read.get(i)) is not None and got[1] is Provenance.READ
        if state not in _NOT_CONNECTED:
            connected.append((i, e))
            if not is_read:
                lookup_list.append(i)
        if not is_read:
            unread.append((i, e))
            if not kernel_only and state not in _NOT_ITERATED:
                kernel_only.append(e)
    if not on_port:
        return KernelRead(why="no socket on the port")
    if req.proto is Proto.UDP:
        if unread:
            return KernelRead(walk=True, why=f"flags of {_what(unread[0][1])} are only in the kernel")
        if any(read[i][0].reuseport for i, _ in on_port):
            return KernelRead(walk=True, why="SO_REUSEPORT on the port: the UDP chain order decides")
        return KernelRead(why="every flag read from its owner; no SO_REUSEPORT on the port")
    lookup = tuple(lookup_list)
    why = (
        f"flags of {_what(kernel_only[0])} are only in the kernel"
        if kernel_only
        else "the bind bucket's cache"
    )
    if not listening and not lookup and connected:
        # any socket in the bucket leads to it; one the lookup can find, if there is one
        findable = [i for i, e in connected if e.socket.ifindex in _LOOKUP_DEVICES]
        lookup = tuple(findable or [connected[0][0]])[:1]
    away = [entries[i] for i in lookup if entries[i].socket.ifindex not in _LOOKUP_DEVICES]
    if away:
        # bpf_skc_lookup_tcp compares the test run's device (loopback) with the socket's
        # sk_bound_dev_if (inet_sk_bound_dev_eq): a socket bound elsewhere is not found so.
        return KernelRead(
            walk=True, why=f"flags of {_what(away[0])} are only in the kernel (bound to a device)"
        )
    if not listening and not lookup:
        return KernelRead(why="bound-only sockets: in no table the iterator walks")
    return KernelRead(listeners=listening, lookup=lookup, why=why)


def _what(e: SocketEntry) -> str:
    owner = "" if e.owners else " (no owner in sight)"
    return f"{e.socket.state.label} {e.socket.local}{owner}"


def _kernel_states(
    table: SocketTable, req: BindRequest
) -> tuple[SockStates | Unavailable | None, dict[int, tuple[SockOpts, Provenance]]]:
    """The port's sockets as the kernel holds them, as far as iterator_plan asks, when the table
    is of this thread's network namespace (the iterator and the lookup read that one only).
    Also the flags read from owners (index in table.entries -> flags), read once here."""
    read = {
        i: _read_flags(e)
        for i, e in enumerate(table.entries)
        if e.owners and e.socket.proto is req.proto and e.socket.local.port == req.port
    }
    plan = iterator_plan(req, table.entries, read)
    if plan.nothing:
        return None, read
    return read_kernel(table, req, plan), read


def read_kernel(table: SocketTable, req: BindRequest, plan: KernelRead) -> SockStates | Unavailable:
    """Carry out an iterator_plan: the listening walk and the lookups (each found socket checked
    against its 4-tuple and given inet_diag's cookie), or the whole walk where the lookup is
    unavailable (it needs bpf_skc_lookup_tcp in a test run: Linux 5.2+)."""
    got = read_kernel_ports(table.entries, [(req, plan)])
    return got if got is not None else Unavailable("nothing to read")


def read_kernel_ports(
    entries: Sequence[SocketEntry], plans: Sequence[tuple[BindRequest, KernelRead]]
) -> SockStates | Unavailable | None:
    """Carry out several iterator_plans over one table at once (the exporter and `top` ask for
    many ports per refresh; a walk costs the same for one port as for all of them): one whole
    walk per protocol for the ports that need it, one listening-hash walk for the TCP ports
    whose listeners lead to the bucket, one lookup run for the sockets found by 4-tuple -- or,
    where the lookup is unavailable or misses one (gone since the dump, a VRF), the whole TCP
    walk for those ports. None when no plan reads anything."""
    from rebind.kernel.bpf.sockiter import load_sock_layout, prepare, read_socket_states
    from rebind.kernel.bpf.socklookup import lookup_socket_states

    todo = [(r, p) for r, p in plans if not p.nothing]
    if not todo:
        return None
    netns = next((e.socket.netns for e in entries if e.socket.netns is not None), None)
    walk: dict[Proto, set[int]] = {}
    for r, p in todo:
        if p.walk:
            walk.setdefault(r.proto, set()).add(r.port)
    walked_tcp = walk.get(Proto.TCP, set())
    listen = sorted({r.port for r, p in todo if p.listeners and r.port not in walked_tcp})
    lookup = sorted({i for r, p in todo if r.port not in walked_tcp for i in p.lookup})
    parts: list[SockStates] = []
    looked = False
    if lookup:
        here = prepare(netns)  # before any walk: the lookup alone needs no walk at all
        if isinstance(here, Unavailable):
            return here
        found = lookup_socket_states(load_sock_layout(), [entries[i].socket for i in lookup])
        if isinstance(found, Unavailable) or None in found[0]:
            walk.setdefault(Proto.TCP, set()).update(entries[i].socket.local.port for i in lookup)
        else:
            states, faulted = found
            looked = True
            parts.append(SockStates(here, tuple(st for st in states if st is not None), faulted))
    listen = [p for p in listen if p not in walk.get(Proto.TCP, set())]
    for proto, ports in walk.items():
        got = read_socket_states(sorted(ports), [proto], netns=netns)
        if isinstance(got, Unavailable):
            return got
        parts.append(got)
    if listen:
        got = read_socket_states(listen, [Proto.TCP], netns=netns, listeners_only=True)
        if isinstance(got, Unavailable):
            return got
        parts.append(got)
    if not parts:
        here = prepare(netns)
        return here if isinstance(here, Unavailable) else SockStates(here, ())
    seen: dict[int, SockState] = {}
    for part in parts:
        for st in part.sockets:
            seen.setdefault(st.cookie, st)
    partial = bool(listen) or looked  # TCP sockets of other states not looked for
    return SockStates(
        parts[0].netns, tuple(seen.values()), sum(p.faulted for p in parts), listeners_only=partial
    )


def _probes(req: BindRequest, settings: KernelSettings) -> Iterator[BindRequest]:
    """As asked, then with more flags, then (TCP) on the other addresses `why` offers: what a
    harmless probe may be (see probe_is_harmless). No UDP probe on another address: a bound
    UDP socket receives at once, and a more specific one would take datagrams meant for a
    wildcard socket on the port; a TCP socket that never listens receives nothing."""
    yield req
    seen = {replace(req, listen=False)}
    variants = [
        replace(req, listen=False, reuseaddr=req.reuseaddr or ra, reuseport=req.reuseport or rp)
        for ra, rp in ((True, False), (False, True), (True, True))
    ]
    if req.proto is Proto.TCP:
        variants += [replace(r, listen=False) for r in alternative_requests(req, settings)]
    for variant in variants:
        if variant not in seen:
            seen.add(variant)
            yield variant


def _trials(
    req: BindRequest, table: SocketTable, settings: KernelSettings, port: PortState
) -> tuple[dict[BindRequest, TrialResult], str]:
    bucket = any(e.socket.proto is Proto.TCP and e.socket.local.port == req.port for e in table.entries)
    uid = os.geteuid()
    out: dict[BindRequest, TrialResult] = {}
    skipped = ""
    for probe in _probes(req, settings):
        if probe.reuseport and uid != req.uid:
            # SO_REUSEPORT compares sk_uid, and the probe's is ours: its answer would be for
            # another user's bind (and, in a TCP bucket, reset tb->fastuid to ours).
            if probe == req:
                skipped = (
                    f"no trial bind: SO_REUSEPORT depends on the socket's uid, and a probe made by "
                    f"uid {uid} cannot answer for uid {req.uid}; this answer is the model's"
                )
            continue
        harmless = probe_is_harmless(
            probe, bucket_exists=bucket, prober_uid=uid, bucket=port.bucket, settings=settings
        )
        if not harmless:
            if probe == req and not skipped:
                skipped = (
                    "no trial bind: the port has TCP sockets and its bind bucket's fast-reuse cache "
                    "is unknown, so a trial that worked could change the answer to a later bind "
                    "(inet_csk_update_fastreuse); this answer is the model's"
                    if port.bucket is None
                    else "no trial bind: one that worked would change the port's fast-reuse cache "
                    "(inet_csk_update_fastreuse) for later binds; this answer is the model's"
                )
            continue
        # Keyed by the bind-only request (a trial never listens): advice.trial_for finds it.
        out[replace(probe, listen=False)] = trial_bind(probe)
    return out, skipped


def _model_is_exact(
    req: BindRequest, holders: tuple[HolderFacts, ...], settings: KernelSettings, port: PortState | None
) -> bool:
    """With the kernel's per-port state read, every flag known and the rules calibrated, the model
    is exact and no trial runs (issue 17: a trial is a side effect, however small)."""
    if port is None or not holders:
        return False  # a fresh port: its (harmless) trial still checks addresses and privileges
    if req.proto is Proto.TCP and port.bucket is None:
        return False
    if req.proto is Proto.UDP and (settings.udp_first_match is None or not port.udp_chain_order):
        return False
    return all(
        h.opts.reuseaddr is not None
        and h.opts.reuseport is not None
        and (h.entry.socket.uid is not None or h.entry.socket.is_mini)  # a TIME_WAIT's uid never counts
        for h in holders
    )


def _can_destroy() -> bool:
    from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

    return has_cap(CAP_NET_ADMIN) and kernel_version() >= (6, 0)


def _holders(
    table: SocketTable,
    req: BindRequest,
    kernel: SockStates | None = None,
    read: Mapping[int, tuple[SockOpts, Provenance]] | None = None,
) -> tuple[HolderFacts, ...]:
    """Each socket of the protocol with its flags: read from the socket itself (``read``, or
    read here), else the kernel's (BPF iterator), else inferred from its listener, else unknown.
    Both of the first two are the kernel's own fields; the iterator's state is attached either
    way (userlocks, bind bucket)."""
    listeners = [e for e in table.entries if e.socket.state is State.LISTEN]
    parent_flags: dict[object, tuple[SockOpts, Provenance]] = {}
    by_cookie = kernel.by_cookie() if kernel is not None else {}
    out = []
    for i, e in enumerate(table.entries):
        r = e.socket
        if r.proto is not req.proto:
            continue
        st = by_cookie.get(r.cookie) if r.cookie is not None else None
        if st is not None and (
            st.common.kind is SockKind.REQUEST  # a request_sock's flags are not its listener's
            or st.common.proto is not r.proto
            or st.common.local.port != r.local.port
        ):
            st = None
        got = read.get(i) if read is not None else None
        if got is None and e.owners and st is None:
            got = _read_flags(e)
        if got is not None and got[1] is Provenance.READ:
            out.append(HolderFacts(e, got[0], Provenance.READ, st))
            continue
        if st is not None:
            # The kernel's own sk_reuse/sk_reuseport/ipv6only (a TIME_WAIT's tw_* copies too),
            # whoever owns the socket. Bound-only TCP sockets are in no table the iterator walks:
            # they (and sockets made since) take the paths below.
            out.append(kernel_holder(e, st))
            continue
        opts, src = SockOpts(), Provenance.UNKNOWN
        parent = _listener_for(e, listeners) if e.socket.state is not State.LISTEN else None
        if not e.owners and parent is not None:
            # A child's TIME_WAIT normally carries its listener's flags (inet_twsk_alloc copies
            # sk_reuse from the child, which inherited it from the listener at accept()). Read
            # once per listener: a port can have ten thousand TIME_WAITs of one server.
            key = parent.socket.key
            if key not in parent_flags:
                parent_flags[key] = _read_flags(parent)
            got_parent, how = parent_flags[key]
            if how is Provenance.READ:
                opts, src = got_parent, Provenance.INFERRED_LISTENER
        if opts.v6only is None and e.socket.v6only is None and parent is not None:
            # inet_diag reports v6only only for LISTEN/CLOSE sockets; an accepted child (and its
            # TIME_WAIT) keeps the dual-stack listener's ipv6only.
            opts = SockOpts(opts.reuseaddr, opts.reuseport, parent.socket.v6only)
        out.append(HolderFacts(e, opts, src))
    return tuple(out)


def _read_flags(e: SocketEntry) -> tuple[SockOpts, Provenance]:
    from rebind.kernel.pidfd import socket_flags

    for o in e.owners:
        flags = socket_flags(o.pid, o.fd, o.start_ticks)
        if flags is not None:
            return SockOpts(*flags), Provenance.READ
    return SockOpts(), Provenance.UNKNOWN


def _listener_for(e: SocketEntry, listeners: list[SocketEntry]) -> SocketEntry | None:
    for lst in listeners:
        la = lst.socket.local
        if la.port == e.socket.local.port and (la.is_wildcard or la.addr == e.socket.local.addr):
            return lst
    return None


def _process_hints(table: SocketTable) -> dict[int, ProcessHint]:
    """Process-tree facts for owners: one /proc stat read each (owners can number hundreds)."""
    from rebind.kernel.owners import proc_root
    from rebind.kernel.procstat import PGRP, stat_field

    owned = [e for e in table.entries if e.owners]  # leftovers (most of a busy port) have none
    holders_of: dict[int | None, set[int]] = {}
    for e in owned:
        holders_of.setdefault(e.socket.inode, set()).update(o.pid for o in e.owners)
    hints: dict[int, ProcessHint] = {}
    root = proc_root()
    for e in owned:
        pids = holders_of.get(e.socket.inode, set())
        for o in e.owners:
            if o.pid in hints:
                continue
            parent = _comm(o.ppid, root) if o.ppid else None
            pgid = stat_field(o.pid, PGRP, root)
            lost = None
            # A worker whose process-group leader is gone and who was re-parented to init (or a
            # subreaper) was started by a parent that has exited.
            if pgid and pgid != o.pid and not os.path.exists(f"{root}/{pgid}") and o.ppid in (0, 1):
                lost = pgid
            hints[o.pid] = ProcessHint(
                pid=o.pid,
                parent_alive=parent is not None,
                parent_holds=o.ppid in pids,
                parent_name=parent,
                lost_group_leader=lost,
            )
    return hints


def _comm(pid: int, root: str) -> str | None:
    try:
        with open(f"{root}/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None
