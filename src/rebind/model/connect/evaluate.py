"""Predict one connect() now: the source, the mode's outcome, the accounting, the capacity,
the ranked fixes and the headline, in one :class:`ConnectResult`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from rebind.model.connect.accounting import accounting_of, capacity_of, consumers_of, time_waits_of
from rebind.model.connect.facts import ConnectSettings, PortHolder, RangeBuckets, summary_suffices
from rebind.model.connect.fixes import rank_fixes
from rebind.model.connect.modes import (
    bind_any,
    fixed_port,
    own_choice,
    source_problem,
    udp_port,
    uses_own_choice,
)
from rebind.model.connect.outcome import (
    EADDRNOTAVAIL,
    Accounting,
    ConnectOutcome,
    ConnectResult,
    Stage,
    Verdict,
)
from rebind.model.connect.request import ConnectRequest, connect_source, fmt_endpoint, norm_addr
from rebind.model.connect.rules import PortMap, effective_range
from rebind.model.records import IPAddress, Proto

if TYPE_CHECKING:
    from rebind.model import conflict as bindmodel


def evaluate_connect(
    req: ConnectRequest,
    holders: Iterable[PortHolder],
    settings: ConnectSettings,
    *,
    route_src: IPAddress | None = None,
    observed_window_s: float | None = 60.0,
    uid: int = 0,
    bind_settings: bindmodel.KernelSettings | None = None,
    servers: frozenset[int] | None = None,
    buckets: RangeBuckets | None = None,
) -> ConnectResult:
    """Predict the outcome of ``req`` now, with the range accounting and ranked fixes.

    ``holders``: TCP (or UDP, for ``req.proto`` UDP) sockets in the namespace whose local port
    lies in the effective range — at least every socket to the destination and every socket
    holding its port by bind() — plus, for a fixed local port, every socket on that port.
    ``route_src``: the address the route picks when the request binds no specific address.
    ``bind_settings``: the netns's bind() facts (local addresses, ip_nonlocal_bind): with them a
    source address is checked as __inet_bind does (EADDRNOTAVAIL unless local); None skips it.
    ``servers``: ports that servers of this netns hold (TCP listening or bound-inactive sockets,
    unconnected UDP sockets outside the range) -- a widened range must not take them in, and
    the printed fix reserves those inside the range; None (unknown): no widening is proposed.
    ``buckets``: every TCP port of the range from the kernel's bind hash (RangeBuckets), for
    the requests :func:`summary_suffices` admits (ValueError for others). ``holders`` may then
    be only the sockets the answer names: every socket to the destination (the 4-tuples, the
    time-wait entries), every listening or bound-inactive socket of the range and every socket
    on its bind-made ports (the consumers' ``by_bind``), every socket on a fixed local port.
    The consumers' ``other`` (connections elsewhere, on connect()-made ports) is then not
    counted (None).
    """
    if buckets is not None and not summary_suffices(
        req.proto, own_choice=req.own_choice, fixed_port=req.local_port is not None
    ):
        raise ValueError(f"a bind-hash summary cannot answer {req.describe}: it needs every socket")
    hs = [h for h in holders if h.socket.proto is req.proto]
    lo, hi = effective_range(settings, req.port_range)
    bound_addr = req.src if req.src is not None else None
    src = norm_addr(bound_addr) if bound_addr is not None and not bound_addr.is_unspecified else None
    if src is None:
        src = norm_addr(route_src) if route_src is not None else connect_source(req)
        if src.is_unspecified:
            src = connect_source(replace(req, src=None))
    by_port: dict[int, list[PortHolder]] = defaultdict(list)
    for h in hs:
        by_port[h.socket.local.port].append(h)

    bad_src = source_problem(req, bind_settings)
    if bad_src is not None:
        outcome, uses = bad_src, uses_own_choice(req, by_port, settings, lo, hi, src, buckets=buckets)
    elif req.proto is Proto.UDP:
        outcome, uses = udp_port(req, by_port, settings, lo, hi, src, uid)
    elif req.local_port is not None:
        outcome, uses = fixed_port(req, by_port, settings, lo, hi, src, bind_settings, buckets)
    elif req.bind_before_connect and not req.bind_address_no_port:
        outcome, uses = bind_any(req, by_port, settings, lo, hi, src)
    else:
        outcome, uses = own_choice(req, by_port, settings, lo, hi, src, buckets)

    acc = accounting_of(req, uses, by_port, settings, lo, hi, src)
    tws = time_waits_of(req, hs, settings, src)
    consumers = consumers_of(hs, uses, req, src, count_other=buckets is None)
    cap = None
    # UDP autobind honours IP_LOCAL_PORT_RANGE too (C3): its map is the one a slice needs.
    own: PortMap | None = uses if req.proto is Proto.UDP and req.local_port is None else None
    if req.proto is Proto.TCP:
        # Capacity is about this destination's 4-tuple space: connect()'s own choice, whatever
        # the request does before connect(). So is the per-socket range fix (a plain connect()).
        own = uses
        if not req.own_choice:
            own = uses_own_choice(req, by_port, settings, lo, hi, src, buckets=buckets)
        cap = capacity_of(
            req, accounting_of(req, own, by_port, settings, lo, hi, src), tws, settings, observed_window_s
        )
    fixes = (
        ()
        if bad_src is not None
        else tuple(rank_fixes(req, outcome, acc, tws, settings, (lo, hi), uses=own, src=src, servers=servers))
    )
    head = _headline(req, outcome, acc, (lo, hi))
    return ConnectResult(
        request=replace(req, src=req.src if req.src is not None else src),
        settings=settings,
        effective_range=(lo, hi),
        outcome=outcome,
        accounting=acc,
        time_waits=tuple(tws),
        consumers=tuple(consumers),
        capacity=cap,
        fixes=fixes,
        headline=head,
    )


def _headline(req: ConnectRequest, o: ConnectOutcome, acc: Accounting, rng: tuple[int, int]) -> str:
    target = fmt_endpoint(req.dst, req.dport)
    if o.stage is Stage.BIND and o.errno == EADDRNOTAVAIL:
        return f"bind() for {target} would fail with EADDRNOTAVAIL: source {req.src} is not local"
    what = f"{acc.usable} of {acc.total} ports of {rng[0]}-{rng[1]} usable"
    if acc.usable_best is not None and acc.usable_best != acc.usable:
        what += f" (worst case; {acc.usable_best} if every unplaced client port came from connect())"
    if o.verdict is Verdict.OK:
        return f"connect() to {target} would get a local port: {what}"
    if o.verdict is Verdict.MAY_FAIL:
        return f"connect() to {target} may fail with {o.errno_name}: {what}"
    call = "bind()" if o.stage is Stage.BIND else "connect()"
    return f"{call} for {target} would fail with {o.errno_name}: {what}"
