"""The one I/O gatherer behind `rebind why`: everything model/advice/ needs, read once.

Socket table (inet_diag), the sockets' own bind state (owners' flags by pidfd_getfd +
getsockopt; what only the kernel has -- TIME_WAITs' and owner-less sockets' flags, userlocks, the
bind bucket's cache, UDP chain order -- read by BPF as cheaply as iterator_plan finds
(kernel/sockstates.py): the listening hash, lookups by 4-tuple (kernel/bpf/socklookup.py) or the
whole walk), kernel settings, IPv6 address states, process-tree hints, and the trial binds that
cannot change the answer (conflict.probe_is_harmless decides which may run).

Known limits of the trials: a socket bound between the dump and a probe is not accounted for
(the probe may then share its fresh bucket for a moment); a UDP probe is bound for a few
microseconds and could receive a datagram meant for a wildcard socket on the port. An
observer-free answer (``trials=False``) has neither.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import replace

from rebind.gcpause import gc_paused
from rebind.kernel.sockstates import iterator_plan, read_kernel
from rebind.kernel.trial import trial_bind
from rebind.model.advice import Facts, HolderFacts, Provenance
from rebind.model.assess import bucket_state, kernel_holder, port_state
from rebind.model.conflict import KernelSettings, PortState, SockOpts, alternative_requests, probe_is_harmless
from rebind.model.diagnosis import ProcessHint
from rebind.model.records import Proto, SocketEntry, SocketTable, State
from rebind.model.request import BindRequest, TrialResult
from rebind.model.sockstate import SockKind, SockStates, Unavailable
from rebind.slotted import twin


def gather(
    req: BindRequest,
    *,
    owners: bool = True,
    table: SocketTable | None = None,
    trials: bool = True,
    settings: KernelSettings | None = None,
    port: PortState | None = None,
    states: SockStates | None = None,
) -> Facts:
    """The facts for ``req``. ``trials=False``: observer-free (nothing is bound).

    ``port``: the port's kernel state beside its sockets (TCP bucket fast-reuse fields, UDP
    chain order) when something read it; None = unknown (no trial then runs in an existing TCP
    bucket: see conflict.probe_is_harmless).

    ``states``: each table entry's socket as the kernel holds it, one per entry in the table's
    order, read with the table (`rebind trace`'s bind-hash snapshot, kernel/bindhash_table.py):
    its flags are the kernel's own, so neither the owners' sockets nor the kernel are read
    again."""
    from rebind.kernel.sysctl import kernel_settings
    from rebind.kernel.walk import table as socket_table
    from rebind.model.query import SocketQuery

    if settings is None:
        from rebind.kernel.addrs import ipv6_addresses

        settings = replace(kernel_settings(), ipv6_addresses=ipv6_addresses())
    table = table or socket_table(SocketQuery.create(ports=[req.port], protos=[req.proto]), owners=owners)
    with gc_paused():
        kernel: SockStates | Unavailable | None
        if states is not None:
            kernel, holders = states, _given_holders(table, req, states)
        else:
            kernel, read = _kernel_states(table, req)
            holders = _holders(table, req, kernel if isinstance(kernel, SockStates) else None, read)
    if port is None:
        holders, port = port_state(req, holders)
        if port is None and req.proto is Proto.TCP and holders:
            port = _bucket_from_bind_hash(req, table)
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


def _bucket_from_bind_hash(req: BindRequest, table: SocketTable) -> PortState | None:
    """The port's TCP bind bucket read straight from the bind hash (kernel/bpf/bindhash.py),
    where no socket the iterator or a lookup reaches led to it: a port held by bound-only sockets
    (in no table bpf_iter_tcp walks), or by sockets on several addresses read apart. None where
    it cannot be read here (another namespace's table, no BPF) or is not one plain bucket."""
    from rebind.kernel.bpf.bindhash import read_port_buckets

    netns = {e.socket.netns for e in table.entries if e.socket.local.port == req.port}
    if len(netns) != 1 or None in netns:
        return None
    got = read_port_buckets([req.port], netns=netns.pop())
    if isinstance(got, Unavailable):
        return None
    b = got.get(req.port)
    if b is None or not b.known or b.buckets != 1:
        return None
    bb = b.bind_bucket(req.port)
    return None if bb is None else PortState(bucket=bucket_state(bb))


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


def _given_holders(table: SocketTable, req: BindRequest, states: SockStates) -> tuple[HolderFacts, ...]:
    """Each entry of the protocol with the kernel's flags given beside it (``states``):
    kernel_holder's, socket for socket. Its flags are the SockCommon's: one SockOpts per
    SockCommon (sockets alike share one, ten thousand TIME_WAITs of a server a few), and each
    HolderFacts is built in a plain class of its slots (a frozen dataclass's __init__ sets each
    field through object.__setattr__)."""
    proto, kernel = req.proto, Provenance.KERNEL
    opts_of: dict[int, SockOpts] = {}  # by id(SockCommon): ``states`` keeps them alive
    out = []
    for e, st in zip(table.entries, states.sockets, strict=True):
        if e.socket.proto is not proto:
            continue
        opts = opts_of.get(id(st.common))
        if opts is None:
            opts = opts_of[id(st.common)] = kernel_holder(e, st).opts
        h = _HolderSlots()
        h.entry, h.opts, h.provenance, h.kernel = e, opts, kernel, st
        h.__class__ = HolderFacts
        out.append(h)
    return tuple(out)


#: HolderFacts' slots in a plain class (rebind/slotted.py): one a socket, built field by field
_HolderSlots = twin(HolderFacts)


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
    checked: set[int] = set()  # SockOpts by id: ten thousand TIME_WAITs share a few
    for h in holders:
        o = h.opts
        if id(o) not in checked:
            if o.reuseaddr is None or o.reuseport is None:
                return False
            checked.add(id(o))
        r = h.entry.socket
        if r.uid is None and not r.is_mini:  # a TIME_WAIT's uid never counts
            return False
    return True


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
    # What a SockCommon says, once per SockCommon: records alike share one (kernel/bpf/
    # sockdecode.py), so ten thousand TIME_WAITs of one server share a few (keyed by id: kept
    # alive by ``kernel`` meanwhile). (Usable: not a request_sock, whose flags are not its
    # listener's; of this protocol), its local port, and the kernel's flags.
    commons: dict[int, tuple[bool, int, SockOpts]] = {}
    proto = req.proto
    out = []
    for i, e in enumerate(table.entries):
        r = e.socket
        if r.proto is not proto:
            continue
        st = by_cookie.get(r.cookie) if r.cookie is not None else None
        kernel_opts = None
        if st is not None:
            known = commons.get(id(st.common))
            if known is None:
                c = st.common
                usable = c.kind is not SockKind.REQUEST and c.proto is proto
                known = commons[id(c)] = (usable, c.local.port, kernel_holder(e, st).opts)
            if known[0] and known[1] == r.local.port:
                kernel_opts = known[2]
            else:
                st = None
        got = read.get(i) if read is not None else None
        if got is None and e.owners and st is None:
            got = _read_flags(e)
        if got is not None and got[1] is Provenance.READ:
            out.append(HolderFacts(e, got[0], Provenance.READ, st))
            continue
        if kernel_opts is not None:
            # The kernel's own sk_reuse/sk_reuseport/ipv6only (a TIME_WAIT's tw_* copies too),
            # whoever owns the socket. Bound-only TCP sockets are in no table the iterator walks:
            # they (and sockets made since) take the paths below.
            out.append(HolderFacts(e, kernel_opts, Provenance.KERNEL, st))
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
    comms: dict[int, str | None] = {}  # a forked server's workers share one parent: read it once
    for e in owned:
        pids = holders_of.get(e.socket.inode, set())
        for o in e.owners:
            if o.pid in hints:
                continue
            parent = None
            if o.ppid:
                if o.ppid not in comms:
                    comms[o.ppid] = _comm(o.ppid, root)
                parent = comms[o.ppid]
            lost = None
            # A worker whose process-group leader is gone and who was re-parented to init (or a
            # subreaper) was started by a parent that has exited. Only those re-parented need
            # their group read (one /proc stat each: a forked server's workers have a parent).
            if o.ppid in (0, 1):
                pgid = stat_field(o.pid, PGRP, root)
                if pgid and pgid != o.pid and not os.path.exists(f"{root}/{pgid}"):
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
