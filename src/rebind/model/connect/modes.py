"""Each way a client gets its port, evaluated over the range: connect()'s own choice
(__inet_hash_connect, C4–C10), bind(ip, 0) before connect() (inet_csk_find_open_port, C13),
a fixed local port (C17/C19, the bind model's answer first), UDP (udp_lib_get_port, C20–C23);
and the bound source address's own check (EADDRNOTAVAIL, §0.1). Each returns the outcome and the
range's :class:`PortMap`."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

from rebind.model.connect.facts import ConnectSettings, PortHolder, RangeBuckets
from rebind.model.connect.outcome import (
    EADDRINUSE,
    EADDRNOTAVAIL,
    EAGAIN,
    ERRNO_NAMES,
    ConnectOutcome,
    PortUse,
    Stage,
    Verdict,
)
from rebind.model.connect.request import ConnectRequest, fmt_endpoint
from rebind.model.connect.rules import (
    LIVE_STATES,
    PortMap,
    classify_bind_any,
    classify_own_choice,
    classify_udp,
    same_tuple,
)
from rebind.model.connect.tw import tw_reuse_check
from rebind.model.records import IPAddress, Proto

if TYPE_CHECKING:
    from rebind.model import conflict as bindmodel


def source_problem(
    req: ConnectRequest, bind_settings: bindmodel.KernelSettings | None
) -> ConnectOutcome | None:
    """A bound source address must be local: __inet_bind / __inet6_bind refuse any other with
    EADDRNOTAVAIL before a port is looked at (inet_addr_valid_or_nonlocal: RTN_LOCAL, unless
    IP_FREEBIND / IP_TRANSPARENT / ip_nonlocal_bind; connect-rules §0.1). The bind() model's own
    check, so both answers are one (port 0: only the address and privilege checks run)."""
    if bind_settings is None or req.src is None or req.src.is_unspecified:
        return None
    if req.local_port is None and not req.bind_before_connect:
        return None
    from rebind.model import conflict as bindmodel  # imported where used: a plain request needs none

    breq = bindmodel.BindRequest(proto=req.proto, addr=req.src, port=0, reuseaddr=req.reuseaddr, listen=False)
    bo = bindmodel.evaluate(breq, (), bind_settings)
    if bo.verdict is bindmodel.Verdict.OK or bo.errno != EADDRNOTAVAIL:
        return None
    why = bo.blockers[0].reason if bo.blockers else f"{req.src} is not an address of this host"
    return ConnectOutcome(
        Verdict.FAIL,
        EADDRNOTAVAIL,
        Stage.BIND,
        f'bind({req.src}, {req.local_port or 0}) fails with EADDRNOTAVAIL ("Cannot assign requested '
        f'address") before connect() is reached: {why}. Use an address of this namespace, or set '
        "IP_FREEBIND (or net.ipv4.ip_nonlocal_bind=1) if it is meant to appear later.",
    )


def uses_own_choice(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    assume_ambiguous: bool | None = None,
    buckets: RangeBuckets | None = None,
) -> PortMap:
    """Each port as connect()'s own choice sees it. ``assume_ambiguous`` None: the answer the
    model can stand by -- a port usable only if an ambiguous socket got it from connect() is
    UNKNOWN_ORIGIN (not usable); True/False: assume every ambiguous socket bound / did not.
    ``buckets``: the range's ports from the bind hash; ``by_port`` then holds only the sockets
    the answer names (evaluate_connect)."""
    uses = PortMap(lo, hi)
    held: frozenset[int] = frozenset()
    bind_made: frozenset[int] = frozenset()
    if buckets is not None:
        held, bind_made = buckets.held, buckets.bind_made
    shared, bound, reserved = PortUse.SHARED, PortUse.BIND_BEFORE_CONNECT, PortUse.RESERVED
    # the uses below that are never FREE go straight into the map (as uses[p] = ... would put
    # them, in the same order): most of a busy range's ports, one dict store each
    special, reserved_ports = uses.special, settings.reserved
    for p in _special_ports(by_port, settings, lo, hi, held):
        if p in reserved_ports:
            special[p] = reserved
            continue
        on = by_port.get(p, ())
        made = (p in bind_made) if p in held else None
        if not on and made is not None:
            # A held port no holder was read for: its bucket alone decides (a connect()-made
            # one is shared: no holder means no socket to this destination on it). Most ports
            # of a busy range: no per-port classification.
            special[p] = bound if made else shared
            continue
        if assume_ambiguous is not None:
            uses[p] = classify_own_choice(req, src, on, settings, assume_ambiguous, made)[0]
            continue
        best = classify_own_choice(req, src, on, settings, False, made)[0]
        if best.usable and not classify_own_choice(req, src, on, settings, True, made)[0].usable:
            best = PortUse.UNKNOWN_ORIGIN
        uses[p] = best
    return uses


def _special_ports(
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    held: frozenset[int] = frozenset(),
) -> list[int]:
    """Ports of [lo, hi] that are reserved or used by some socket (``held``: a bucket in the
    bind hash); every other one is free. In order: the accounting's counts list the uses in
    the order they are first met."""
    ports = {p for p in by_port if lo <= p <= hi} | {p for p in settings.reserved if lo <= p <= hi}
    ports.update(p for p in held if lo <= p <= hi)
    return sorted(ports)


def _odd_reach(req: ConnectRequest, uses: PortMap, *, connect: bool) -> bool | None:
    """C1: with an odd count one end is out of reach in each call. True: fine; None: may fail."""
    if uses.total % 2 == 0 or uses.total == 1:
        return True
    if connect and req.port_range is not None:
        return True  # __inet_hash_connect walks the whole per-socket range (6.8+)
    if uses.interior_usable() or (uses.get(uses.lo).usable and uses.get(uses.hi).usable):
        return True
    return None


def own_choice(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    buckets: RangeBuckets | None = None,
) -> tuple[ConnectOutcome, PortMap]:
    uses = uses_own_choice(req, by_port, settings, lo, hi, src, buckets=buckets)
    usable = uses.usable_count()
    unknown = uses.count(PortUse.UNKNOWN_ORIGIN)
    unknown_ts = uses.count(PortUse.TIME_WAIT_UNKNOWN)
    if not usable and unknown_ts and not unknown:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                f"connect() may fail with EADDRNOTAVAIL: no port of {lo}-{hi} is surely usable. "
                f"{unknown_ts} port(s) carry a TIME_WAIT of this 4-tuple that connect() takes over only "
                "if the old connection used TCP timestamps (tcp_twsk_unique), which the socket table "
                "does not show: the worst case says no.",
            ),
            uses,
        )
    if not usable and unknown:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                f"connect() may fail with EADDRNOTAVAIL: no port of {lo}-{hi} is surely usable. "
                f"{unknown} port(s) are held by client sockets that inet_diag cannot place: if they "
                "got their ports from bind(), as the worst case assumes, connect() cannot use them "
                "(__inet_hash_connect skips a bucket that is not connect-only, C6); only if connect() "
                "chose them would they be shared.",
            ),
            uses,
        )
    if not usable:
        return (
            ConnectOutcome(
                Verdict.FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                'connect() fails with EADDRNOTAVAIL ("Cannot assign requested address"): no port of '
                f"{lo}-{hi} is usable for {fmt_endpoint(src, 0)[:-2]} → {fmt_endpoint(req.dst, req.dport)} "
                "— each one is reserved, held by a socket that got it from bind(), or already carries "
                "this 4-tuple (__inet_hash_connect).",
            ),
            uses,
        )
    if _odd_reach(req, uses, connect=True) is None:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRNOTAVAIL,
                Stage.CONNECT,
                f"only {', '.join(map(str, uses.usable_ports()))} is usable, at an end of an odd-sized "
                "range: each "
                "connect() reaches only count-1 ports, chosen by a hidden offset (C1) — it may fail.",
            ),
            uses,
        )
    return ConnectOutcome(Verdict.OK, None, None, f"connect() gets a local port: {usable} usable"), uses


def bind_any(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
) -> tuple[ConnectOutcome, PortMap]:
    new = req.src if req.src is not None else src
    new_v6only = False
    uses = PortMap(lo, hi)
    for p in _special_ports(by_port, settings, lo, hi):
        if p in settings.reserved:
            uses[p] = PortUse.RESERVED
            continue
        uses[p] = classify_bind_any(new, new_v6only, by_port.get(p, ()))[0]
    usable = uses.usable_count()
    notes: tuple[str, ...] = ()
    if not usable:
        if settings.autobind_reuse and req.reuseaddr:
            notes = ("ip_autobind_reuse=1 with SO_REUSEADDR: a second pass may share a port (C16)",)
            return (
                ConnectOutcome(
                    Verdict.MAY_FAIL,
                    EADDRINUSE,
                    Stage.BIND,
                    "bind(ip, 0) finds no wholly unused port; ip_autobind_reuse may let it share one "
                    "whose owners all set SO_REUSEADDR, then connect() checks the 4-tuple (C16).",
                    notes,
                ),
                uses,
            )
        return (
            ConnectOutcome(
                Verdict.FAIL,
                EADDRINUSE,
                Stage.BIND,
                f'bind({new}, 0) fails with EADDRINUSE ("Address already in use") before connect() is '
                f"reached: bind-before-connect needs a port of {lo}-{hi} that no socket uses on that "
                "address, whatever its destination (inet_csk_find_open_port) — connections to other "
                "servers count too. Set IP_BIND_ADDRESS_NO_PORT before bind().",
            ),
            uses,
        )
    if _odd_reach(req, uses, connect=False) is None:
        return (
            ConnectOutcome(
                Verdict.MAY_FAIL,
                EADDRINUSE,
                Stage.BIND,
                "only a port at an end of an odd-sized range is free: bind(ip, 0) may not reach it (C1).",
            ),
            uses,
        )
    return (
        ConnectOutcome(
            Verdict.OK,
            None,
            None,
            f"bind(ip, 0) finds a wholly unused port ({usable} left), and connect() then uses it",
        ),
        uses,
    )


def _named_blocker(blockers: tuple[bindmodel.Blocker, ...]) -> bindmodel.Blocker:
    """The blocker the answer names: a certain one first, a live socket before a time-wait
    entry, then by its endpoints -- never the holders' order, which is the order the socket
    table was read in (the established hash's, or the bind hash's: kernel/connect_lookup.py)."""

    def rank(b: bindmodel.Blocker) -> tuple[bool, bool, str, str]:
        r = b.holder.socket
        return (not b.certain, r.is_mini, str(r.local), str(r.remote))

    return min(blockers, key=rank)


def fixed_port(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    bind_settings: bindmodel.KernelSettings | None = None,
    buckets: RangeBuckets | None = None,
) -> tuple[ConnectOutcome, PortMap]:
    assert req.local_port is not None
    port = req.local_port
    on = by_port.get(port, [])
    bind_addr = req.src if req.src is not None else src
    from rebind.model import conflict as bindmodel  # imported where used: a plain request needs none

    breq = bindmodel.BindRequest(
        proto=Proto.TCP, addr=bind_addr, port=port, reuseaddr=req.reuseaddr, uid=0, listen=False
    )
    holders = [
        bindmodel.Holder(h.socket, bindmodel.SockOpts(reuseaddr=h.reuseaddr, reuseport=h.reuseport))
        for h in on
    ]
    # The client's capabilities are not ours to know: a port below ip_unprivileged_port_start is
    # not what this question is about. Addresses: source_problem checked them already.
    bsettings = bindmodel.KernelSettings(local_addresses=None, cap_net_bind_service=True)
    bo = bindmodel.evaluate(breq, holders, bsettings)
    uses = uses_own_choice(req, by_port, settings, lo, hi, src, buckets=buckets)
    if bo.verdict is not bindmodel.Verdict.OK:
        why = _named_blocker(bo.blockers).reason if bo.blockers else "another socket holds it"
        verdict = Verdict.FAIL if bo.verdict is bindmodel.Verdict.FAIL else Verdict.MAY_FAIL
        return (
            ConnectOutcome(
                verdict,
                EADDRINUSE,
                Stage.BIND,
                f"bind({fmt_endpoint(bind_addr, port)}) fails with EADDRINUSE: {why}. A client that binds a "
                "fixed port blocks itself and everyone else; no kernel setting fixes this design (C19).",
                bo.notes,
            ),
            uses,
        )
    for h in on:
        r = h.socket
        if not same_tuple(r, src, req.dst, req.dport):
            continue
        if r.state in LIVE_STATES and not r.is_mini:
            return (
                ConnectOutcome(
                    Verdict.FAIL,
                    EADDRNOTAVAIL,
                    Stage.CONNECT,
                    f"bind() works (SO_REUSEADDR), but connect() fails with EADDRNOTAVAIL: "
                    f"{fmt_endpoint(src, port)} → {fmt_endpoint(req.dst, req.dport)} is already a live "
                    "connection (same 4-tuple, C17/C19). Fixed-port SO_REUSEADDR clients block each other.",
                ),
                uses,
            )
        if r.is_mini:
            ok, why = tw_reuse_check(h, settings, explicit_port=True)
            if ok is None:
                return (
                    ConnectOutcome(
                        Verdict.MAY_FAIL,
                        EADDRNOTAVAIL,
                        Stage.CONNECT,
                        "connect() may fail with EADDRNOTAVAIL: the old connection's time-wait entry holds "
                        f"the same 4-tuple, and it is taken over {why} (C17).",
                    ),
                    uses,
                )
            if not ok:
                return (
                    ConnectOutcome(
                        Verdict.FAIL,
                        EADDRNOTAVAIL,
                        Stage.CONNECT,
                        f"connect() fails with EADDRNOTAVAIL: the old connection's time-wait entry holds "
                        f"the same 4-tuple and {why} (C17).",
                    ),
                    uses,
                )
    return ConnectOutcome(Verdict.OK, None, None, f"bind() to port {port} and connect() both work"), uses


def udp_port(
    req: ConnectRequest,
    by_port: dict[int, list[PortHolder]],
    settings: ConnectSettings,
    lo: int,
    hi: int,
    src: IPAddress,
    uid: int,
) -> tuple[ConnectOutcome, PortMap]:
    if req.local_port is not None:
        bind_addr = (
            req.src
            if req.src is not None
            else (IPv4Address("0.0.0.0") if req.dst.version == 4 else IPv6Address("::"))
        )
        from rebind.model import conflict as bindmodel  # imported where used: a plain request needs none

        breq = bindmodel.BindRequest(
            proto=Proto.UDP,
            addr=bind_addr,
            port=req.local_port,
            reuseaddr=req.reuseaddr,
            uid=uid,
            listen=False,
        )
        holders = [
            bindmodel.Holder(h.socket, bindmodel.SockOpts(reuseaddr=h.reuseaddr, reuseport=h.reuseport))
            for h in by_port.get(req.local_port, [])
        ]
        bsettings = bindmodel.KernelSettings(local_addresses=None)
        bo = bindmodel.evaluate(breq, bindmodel.udp_chain_order(holders), bsettings)
        if bo.verdict is not bindmodel.Verdict.OK:
            return (
                ConnectOutcome(
                    Verdict.FAIL if bo.verdict is bindmodel.Verdict.FAIL else Verdict.MAY_FAIL,
                    EADDRINUSE,
                    Stage.BIND,
                    f"bind() of UDP port {req.local_port} fails with EADDRINUSE",
                ),
                PortMap(lo, hi),
            )
        return ConnectOutcome(Verdict.OK, None, None, "bind() and connect() work (UDP)"), PortMap(lo, hi)
    # The autobind address is the wildcard, or the bound address with IP_BIND_ADDRESS_NO_PORT (C22).
    wildcard = IPv4Address("0.0.0.0") if req.dst.version == 4 else IPv6Address("::")
    new = req.src if req.bind_before_connect and req.src is not None else wildcard
    uses = PortMap(lo, hi)
    for p in _special_ports(by_port, settings, lo, hi):
        if p in settings.reserved:
            uses[p] = PortUse.RESERVED
            continue
        uses[p] = classify_udp(req, new, by_port.get(p, ()), uid)[0]
    usable = uses.usable_count()
    plain_bind = req.bind_before_connect and not req.bind_address_no_port
    if not usable:
        err, stage = (EADDRINUSE, Stage.BIND) if plain_bind else (EAGAIN, Stage.CONNECT)
        call = "bind(ip, 0)" if plain_bind else "connect()/sendto()"
        return (
            ConnectOutcome(
                Verdict.FAIL,
                err,
                stage,
                f"{call} fails with {ERRNO_NAMES[err]}: every UDP port of {lo}-{hi} is held on an "
                "overlapping address — UDP shares nothing by destination (udp_lib_get_port, C20/C21).",
            ),
            uses,
        )
    return ConnectOutcome(Verdict.OK, None, None, f"UDP autobind finds a port ({usable} free)"), uses
