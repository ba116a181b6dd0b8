""" "Would a restart bind?" for each address the operator watches. Pure: no I/O.

This is the one assessment of rebind (``model.assess.judge``: the conflict model over the socket
table, never a trial bind -- a scrape must not perturb kernel state), with the facts this module
assembles once per port (:func:`port_holders`, :func:`restart_request`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rebind.exporter.facts import MISSING_FACT, Missing, PortKey, ServerFlags, Snapshot, Watch, norm
from rebind.model.assess import (
    BindNow,
    HolderFacts,
    Judgement,
    Provenance,
    judge,
    kernel_holder,
    kernel_state_of,
    port_state,
)
from rebind.model.conflict import BindRequest, Flag, KernelSettings, SockOpts
from rebind.model.records import Family, IPAddress, Proto, SocketEntry, SocketRecord, State
from rebind.model.sockstate import SockState


def on_port(records: Iterable[SocketRecord], key: PortKey) -> list[SocketRecord]:
    return [r for r in records if r.local.port == key.port and r.proto is key.proto]


#: The flags a server is assumed to use when they could not be read: nearly every server sets
#: SO_REUSEADDR (and its accepted sockets inherit it).
ASSUMED = ServerFlags(SockOpts(reuseaddr=True, reuseport=False), Provenance.ASSUMED)


def server_flags(snap: Snapshot, w: Watch) -> ServerFlags:
    """The flags of the server on ``w``: read (now or in an earlier scrape), else assumed."""
    got = dict(snap.server_flags).get(w)
    return got if got is not None and got.exact else ASSUMED


def _own_states(proto: Proto) -> frozenset[State]:
    """What a restart closes: the server's listeners (TCP) or bound sockets (UDP)."""
    return frozenset({State.LISTEN}) if proto is Proto.TCP else frozenset({State.CLOSE})


class _Listeners:
    """The listeners of one port, indexed so that finding a socket's parent is O(1): linear work
    per scrape whatever number of listeners and connections other users create."""

    def __init__(self, records: Iterable[SocketRecord]) -> None:
        self.by_addr: dict[IPAddress, SocketRecord] = {}
        self.wild: dict[Family, SocketRecord] = {}
        self.dual: SocketRecord | None = None  # a [::] listener without IPV6_V6ONLY
        for r in records:
            if r.state is not State.LISTEN:
                continue
            if r.local.is_wildcard:
                self.wild.setdefault(r.family, r)
                if r.local.addr.version == 6 and r.v6only is not True and self.dual is None:
                    self.dual = r
            else:
                self.by_addr.setdefault(norm(r.local.addr), r)

    def parent(self, r: SocketRecord) -> SocketRecord | None:
        """The listener whose address the socket's local address falls under (its accept()
        children): the same address, else a wildcard of its family, else a dual-stack [::]."""
        return self.by_addr.get(norm(r.local.addr)) or self.wild.get(r.family) or self.dual


def port_holders(
    records: Sequence[SocketRecord],
    key: PortKey,
    servers: Mapping[IPAddress, ServerFlags],
    kernel: Mapping[int, SockState] | None = None,
) -> tuple[HolderFacts, ...]:
    """The sockets on the port with what is known of their flags, built once per port.

    ``servers``: the flags of the server on each watched address of the port (normalised
    address -> :func:`server_flags`). Flags are facts or the stated assumption, never a guess:

    * a connection or leftover under a live listener of a watched server is that server's (an
      accepted socket inherits sk_reuse; inet_twsk_alloc copies it into the TIME_WAIT): the
      server's flags, with their provenance (read: ``inferred-listener``; else ``assumed``, the
      same assumption the restart is judged with);
    * a leftover with no live listener above it takes the flags of a watched server on its
      address only if they were *read* while that server lived; otherwise they are unknown --
      the seed's case: a server without SO_REUSEADDR is gone, its TIME_WAIT refuses the restart;
    * every other socket (a listener of someone else, a stray bind, a client that took the port
      as its source port) has unknown flags: the conflict model says where they decide.

    ``kernel`` (cookie -> the socket as the BPF iterator read it) comes first: the kernel's own
    sk_reuse / sk_reuseport / ipv6only (a TIME_WAIT's tw_* copies) are facts for every socket,
    a squatter's and an invisible owner's included, and carry the bucket and chain position
    :func:`rebind.model.assess.port_state` derives the port's state from.
    """
    recs = on_port(records, key)
    listeners = _Listeners(recs)
    wild = [(a, f) for a, f in servers.items() if a.is_unspecified]
    out: list[HolderFacts] = []
    for r in recs:
        st = kernel_state_of(r, kernel)
        if st is not None:
            out.append(kernel_holder(SocketEntry(r), st))
            continue
        opts, prov = SockOpts(), Provenance.UNKNOWN
        if r.state not in (State.LISTEN, State.BOUND_INACTIVE, State.CLOSE):
            parent = listeners.parent(r)
            if parent is not None:
                f = servers.get(norm(parent.local.addr))
                if f is not None:
                    how = Provenance.INFERRED_LISTENER if f.exact else Provenance.ASSUMED
                    opts, prov = f.opts, how
                if opts.v6only is None and r.v6only is None:
                    # inet_diag reports v6only for LISTEN/CLOSE only; a child keeps its listener's.
                    opts = SockOpts(opts.reuseaddr, opts.reuseport, parent.v6only)
            elif r.is_mini:
                f = servers.get(norm(r.local.addr))
                if f is None or not f.exact:
                    v = norm(r.local.addr).version  # a dual-stack [::] server covers both
                    f = next((g for a, g in wild if g.exact and a.version in (v, 6)), None)
                if f is not None and f.exact:
                    opts, prov = f.opts, Provenance.INFERRED_LISTENER
        out.append(HolderFacts(SocketEntry(r), opts, prov))
    return tuple(out)


def restart_request(w: Watch, flags: ServerFlags) -> BindRequest:
    """A restarting server's bind() on the watched address, with the flags it was seen with (else
    SO_REUSEADDR), then listen() for TCP. Privilege and the address are assumed (the server has
    them: a configured address is not re-checked per scrape)."""
    o = flags.opts
    return BindRequest(
        proto=w.proto,
        addr=w.addr,
        port=w.port,
        reuseaddr=o.reuseaddr if o.reuseaddr is not None else True,
        reuseport=bool(o.reuseport),
        v6only=o.v6only if w.addr.version == 6 else None,
        uid=flags.uid or 0,
        listen=w.proto is Proto.TCP,
        freebind=True,
    )


def assess_restart(
    holders: Sequence[HolderFacts], w: Watch, flags: ServerFlags, settings: KernelSettings
) -> Judgement:
    """Would the server on ``w`` get its port back if it restarted now? ``holders`` from
    :func:`port_holders` (once per port); the server's own listeners on ``w.addr`` are left out
    (the restart closes them), every other socket -- a squatter on another address included --
    is judged as a holder."""
    own = _own_states(w.proto)
    mine = norm(w.addr)
    hs = tuple(
        h for h in holders if not (h.entry.socket.state in own and norm(h.entry.socket.local.addr) == mine)
    )
    req = restart_request(w, flags)
    # The bucket outlives the restart's own listeners whenever another socket is left in it (its
    # cache is not recomputed when a socket leaves), and with none left the restart finds no holder.
    hs, port = port_state(req, hs)
    return judge(req, hs, _server_settings(settings), port=port)


def _server_settings(s: KernelSettings) -> KernelSettings:
    return KernelSettings(
        unprivileged_port_start=s.unprivileged_port_start,
        bindv6only=s.bindv6only,
        cap_net_bind_service=True,
        local_addresses=None,
        ip_local_port_range=s.ip_local_port_range,
        ip_local_reserved_ports=s.ip_local_reserved_ports,
        kernel_version=s.kernel_version,
        udp_first_match=s.udp_first_match,
    )


def bindable_value(j: Judgement) -> int:
    """1 only when the restart certainly binds; 0 when it fails or when unknown (never
    optimistic: rebind_exporter_missing names the missing fact)."""
    return 1 if j.bindable else 0


@dataclass(frozen=True, slots=True)
class RestartAnswer:
    watch: Watch
    judgement: Judgement


def restart_answers(snap: Snapshot) -> list[RestartAnswer]:
    """Every watched address's answer: holders built once per port, judged per address."""
    if snap.watched is None:
        return []
    by_port: dict[PortKey, list[Watch]] = {}
    for w in snap.watches:
        by_port.setdefault(w.key, []).append(w)
    out: list[RestartAnswer] = []
    kernel = {st.cookie: st for st in snap.kernel}
    for key, ws in by_port.items():
        servers: dict[IPAddress, ServerFlags] = {}
        for w in ws:
            f = server_flags(snap, w)
            servers[norm(w.addr)] = f
        holders = port_holders(snap.watched, key, servers, kernel)
        for w in ws:
            out.append(RestartAnswer(w, assess_restart(holders, w, servers[norm(w.addr)], snap.settings)))
    return out


def missing_facts(answers: Iterable[RestartAnswer]) -> list[Missing]:
    """rebind_exporter_missing entries for bindable series that are 0 only for want of a fact."""
    flags = {f for a in answers if a.judgement.now is BindNow.UNKNOWN for f in a.judgement.missing}
    return [Missing("rebind_port_bindable", MISSING_FACT[f]) for f in Flag if f in flags]
