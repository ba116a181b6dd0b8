"""Where the range went: the accounting port by port, the time-wait entries to the destination,
the processes holding ports of the range, and the sustainable connection rate (C8, C10, C12)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from rebind.model.connect.facts import TIME_WAIT_MS, ConnectSettings, PortHolder
from rebind.model.connect.outcome import Accounting, Capacity, Consumer, PortUse, TimeWaitInfo
from rebind.model.connect.request import ConnectRequest, is_loopback, norm_addr
from rebind.model.connect.rules import PortMap
from rebind.model.connect.tw import tw_left_ms, tw_reuse_check, tw_reuse_delay_ms
from rebind.model.records import IPAddress, Owner, Proto, State


def accounting_of(
    req: ConnectRequest,
    uses: PortMap,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
) -> Accounting:
    counts = uses.counts()
    usable = uses.usable_count()
    half = req.port_range is None
    half_usable = uses.usable_count(parity_of_lo=half)
    half_total = (uses.total + 1) // 2 if half else uses.total
    half_total -= uses.count(PortUse.RESERVED, parity_of_lo=half)
    ambiguous = (
        0
        if req.proto is Proto.UDP
        else sum(
            1
            for p, hs in by_port.items()
            if lo <= p <= hi
            for h in hs
            if h.port_from_bind is None and h.socket.state not in (State.LISTEN, State.BOUND_INACTIVE)
        )
    )
    best: int | None = None
    if ambiguous and req.proto is Proto.TCP and req.own_choice and req.local_port is None:
        best = usable + uses.count(PortUse.UNKNOWN_ORIGIN) + uses.count(PortUse.TIME_WAIT_UNKNOWN)
    return Accounting(
        total=hi - lo + 1,
        usable=usable,
        counts=counts,
        first_half_usable=half_usable,
        first_half_total=half_total,
        ambiguous=ambiguous,
        usable_best=best,
    )


def time_waits_of(
    req: ConnectRequest, hs: Sequence[PortHolder], settings: ConnectSettings, src: IPAddress
) -> list[TimeWaitInfo]:
    out = []
    explicit_port = req.local_port is not None or (req.bind_before_connect and not req.bind_address_no_port)
    for h in hs:
        r = h.socket
        if r.is_mini and r.remote.port == req.dport and norm_addr(r.remote.addr) == req.dst:
            ok, why = tw_reuse_check(h, settings, explicit_port=explicit_port)
            out.append(TimeWaitInfo(h, tw_left_ms(r), ok, why))
    out.sort(key=lambda t: t.left_ms or 0)
    return out


def consumers_of(
    hs: Sequence[PortHolder], uses: PortMap, req: ConnectRequest, src: IPAddress, *, count_other: bool = True
) -> list[Consumer]:
    """The processes holding ports of the range. ``count_other`` False: the holders are not every
    socket of the range (a bind-hash summary stood for the rest, evaluate_connect), so
    connections elsewhere are not counted (``other`` None) and a process holding only those is
    not listed: its count would be a guess."""
    ports: dict[int, dict[str, set[int]]] = defaultdict(lambda: {"dst": set(), "bind": set(), "other": set()})
    info: dict[int, Owner] = {}
    for h in hs:
        r = h.socket
        p = r.local.port
        if p not in uses:
            continue
        if r.remote.port == req.dport and norm_addr(r.remote.addr) == req.dst:
            kind = "dst"
        elif uses.get(p).by_bind or h.explicit:
            kind = "bind"
        elif count_other:
            kind = "other"
        else:
            continue
        for o in h.entry.owners:
            info.setdefault(o.pid, o)
            ports[o.pid][kind].add(p)
    out = [
        Consumer(
            pid=pid,
            name=info[pid].name,
            user=info[pid].user,
            cmdline=info[pid].cmdline,
            to_destination=len(k["dst"]),
            by_bind=len(k["bind"] - k["dst"]),
            other=len(k["other"] - k["dst"] - k["bind"]) if count_other else None,
        )
        for pid, k in ports.items()
    ]
    # (-total) after the first two keys orders as (-other) does
    out.sort(key=lambda c: (-c.to_destination, -c.by_bind, -(c.other or 0), c.pid))
    return out


#: connect-rules C12: what one connect() costs, measured on 6.18.
SLOW_PATH_NOTE = (
    "connect() costs 18–35 µs while a port of lo's parity is usable; once that half is used up for "
    "this 4-tuple every call first walks all of it: 0.28–0.43 ms on a 10,000-port range, 3–5 ms on "
    "the default 28,232-port range, and a failing call walks the whole range (1.2–9.6 ms) (C12)"
)


def capacity_of(
    req: ConnectRequest,
    acc: Accounting,
    tws: Sequence[TimeWaitInfo],
    settings: ConnectSettings,
    window_s: float | None,
) -> Capacity:
    c = acc.counts
    live = c.get(PortUse.IN_USE_TO_DESTINATION.value, 0)
    gone = (
        PortUse.RESERVED,
        PortUse.UNKNOWN_ORIGIN,
        PortUse.TIME_WAIT_UNKNOWN,
        *(u for u in PortUse if u.by_bind),
    )
    base = acc.total - sum(c.get(u.value, 0) for u in gone)
    base = max(base - live, 0)
    # Would a future time-wait entry to this destination be taken over (C8)?
    loop = is_loopback(req.dst) or (req.src is not None and is_loopback(req.src))
    reusable = settings.tcp_timestamps != 0 and (settings.tw_reuse == 1 or (settings.tw_reuse == 2 and loop))
    tw_s = (tw_reuse_delay_ms(settings) if reusable else TIME_WAIT_MS) / 1000
    observed = len(tws) / 60.0 if window_s else None
    slow = acc.first_half_usable == 0 and acc.usable > 0 and req.port_range is None and req.own_choice
    used_half = 1.0 - (acc.first_half_usable / acc.first_half_total if acc.first_half_total else 0.0)
    if slow:
        note = "on the slow path now: " + SLOW_PATH_NOTE
    elif used_half >= 0.5:
        note = f"{used_half:.0%} of connect()'s first half is used for this destination; " + SLOW_PATH_NOTE
    else:
        note = "fast path: a port of the first parity half is usable (C10)"
    return Capacity(
        usable_for_destination=base,
        time_wait_seconds=tw_s,
        sustainable_per_s=base / tw_s if tw_s else math.inf,
        observed_per_s=observed,
        slow_path=slow,
        used_fraction_first_half=used_half,
        note=note,
    )
