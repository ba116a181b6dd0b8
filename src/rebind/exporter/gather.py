"""One scrape's facts from the kernel: kernel-filtered inet_diag dumps, sysctls, route lookups.

Each table is walked at most once per scrape, however many ports and destinations are
watched: the filters are OR-ed into one bytecode program (see :mod:`.bytecode`).

* TCP, every state but LISTEN / bound-inactive (the established hash): local port watched, or
  remote endpoint a ``--dest``.
* TCP LISTEN + bound-inactive (the listening hash and bhash2): local port watched, or inside
  the ephemeral range (what bind() holds there).
* UDP, per family, only when a UDP port is watched.

Nothing here binds, connects or destroys: a scrape never changes kernel state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from rebind.errors import EnvironmentProblem, KernelError
from rebind.exporter import bytecode as bc
from rebind.exporter.facts import Dest, EphemeralRange, Missing, Reason, Snapshot, Watch, norm
from rebind.exporter.route import NoRoute, source_for
from rebind.model.conflict import KernelSettings
from rebind.model.records import Family, IPAddress, Proto, SocketRecord, State

#: inet_diag's TCP_BOUND_INACTIVE state bit (91051f003948).
BOUND_INACTIVE_SINCE = (6, 8)
_SERVER_STATES = frozenset({State.LISTEN, State.BOUND_INACTIVE})
_CONN_STATES = frozenset(State) - _SERVER_STATES


_SERVER_METRICS = ("rebind_sockets", "rebind_port_bindable", "rebind_listener_accept_queue")
_CLIENT_METRICS = ("rebind_ephemeral_bind_held_ports", "rebind_connect_free_ports", "rebind_connect_timewait")


def _sysctl(path: str) -> str | None:
    try:
        with open(f"/proc/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return None


def read_ephemeral() -> EphemeralRange | None:
    """ip_local_port_range is "lo<TAB>hi"; ip_local_reserved_ports "8080,9000-9010"."""
    text = _sysctl("net/ipv4/ip_local_port_range")
    reserved_text = _sysctl("net/ipv4/ip_local_reserved_ports")
    if text is None or reserved_text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split())
        reserved: set[int] = set()
        for part in reserved_text.split(","):
            if part.strip():
                a, _, b = part.strip().partition("-")
                reserved.update(range(int(a), int(b or a) + 1))
    except ValueError:
        return None
    return EphemeralRange(lo, hi, frozenset(reserved))


def read_settings(rng: EphemeralRange | None) -> KernelSettings:
    from rebind.kernel.sysctl import kernel_version

    def num(path: str, default: int) -> int:
        v = _sysctl(path)
        return int(v) if v is not None and v.lstrip("-").isdigit() else default

    base = KernelSettings(
        unprivileged_port_start=num("net/ipv4/ip_unprivileged_port_start", 1024),
        bindv6only=num("net/ipv6/bindv6only", 0) == 1,
        kernel_version=kernel_version(),
    )
    if rng is None:
        return base
    return replace(base, ip_local_port_range=(rng.lo, rng.hi), ip_local_reserved_ports=rng.reserved)


Dumper = Callable[[Proto, Family | None, frozenset[State], bytes], Iterable[SocketRecord]]


def netlink_dumper() -> tuple[Dumper, Callable[[], None]]:
    """A dump function over one NETLINK_SOCK_DIAG socket for the whole scrape, and its closer."""
    from rebind.kernel.diag import DiagSocket

    sock = DiagSocket()

    def dump(
        proto: Proto, family: Family | None, states: frozenset[State], code: bytes
    ) -> Iterable[SocketRecord]:
        return sock.dump(family, proto, states, bytecode=code)

    return dump, sock.close


def gather(watches: Sequence[Watch], dests: Sequence[Dest], *, dumper: Dumper | None = None) -> Snapshot:
    """Gather one scrape's facts. Never raises for a kernel or permission problem: what could
    not be gathered is None in the snapshot and named in ``missing``."""
    t0 = time.perf_counter()
    missing: list[Missing] = []
    rng = read_ephemeral()
    if rng is None:
        missing += [
            Missing(m, Reason.SYSCTL_UNREADABLE)
            for m in (
                "rebind_ephemeral_range_ports",
                "rebind_ephemeral_bind_held_ports",
                "rebind_connect_free_ports",
            )
        ]
    settings = read_settings(rng)
    sources, no_route = _sources(dests)
    missing += [Missing("rebind_connect_free_ports", Reason.NO_ROUTE) for _ in no_route[:1]]
    bi_visible = settings.kernel_version >= BOUND_INACTIVE_SINCE
    close: Callable[[], None] = lambda: None  # noqa: E731
    source = "netlink"
    if dumper is None:
        try:
            if os.environ.get("REBIND_FORCE_PROCFS"):  # as rebind.kernel.diag.netlink_available
                raise EnvironmentProblem("REBIND_FORCE_PROCFS is set")
            dumper, close = netlink_dumper()
        except EnvironmentProblem:
            dumper, source, bi_visible = procfs_dumper, "procfs", False
            missing.append(Missing("rebind_sockets", Reason.NETLINK_UNAVAILABLE))
    if not bi_visible and source == "netlink":
        missing.append(Missing("rebind_sockets", Reason.KERNEL_TOO_OLD))
    try:
        watched, dest_socks, bound = _dumps(dumper, watches, dests, rng, missing)
    finally:
        close()
    return Snapshot(
        watches=tuple(watches),
        dests=tuple(dests),
        watched=watched,
        dest_sockets=dest_socks,
        bound_in_range=bound,
        ephemeral=rng,
        sources=sources,
        settings=settings,
        bound_inactive_visible=bi_visible,
        source=source,
        missing=tuple(missing),
        duration_s=time.perf_counter() - t0,
    )


def _sources(dests: Sequence[Dest]) -> tuple[tuple[tuple[Dest, IPAddress | None], ...], list[Dest]]:
    out: list[tuple[Dest, IPAddress | None]] = []
    failed = []
    for d in dests:
        try:
            src = source_for(d.addr)
        except (NoRoute, OSError):
            src = None
        if src is None:
            failed.append(d)
        out.append((d, src))
    return tuple(out), failed


def _dumps(
    dump: Dumper,
    watches: Sequence[Watch],
    dests: Sequence[Dest],
    rng: EphemeralRange | None,
    missing: list[Missing],
) -> tuple[tuple[SocketRecord, ...] | None, tuple[SocketRecord, ...] | None, tuple[SocketRecord, ...] | None]:
    tcp_ports = sorted({w.port for w in watches if w.proto is Proto.TCP})
    udp_ports = sorted({w.port for w in watches if w.proto is Proto.UDP})
    watched: list[SocketRecord] | None = []
    dest_socks: list[SocketRecord] | None = []
    bound: list[SocketRecord] | None = []
    try:
        # The established hash: watched ports' connections and TIME_WAIT, and every --dest's.
        terms = [[bc.sport_eq(p)] for p in tcp_ports] + [[bc.remote_is(d.addr, d.port)] for d in dests]
        if terms:
            want = {(norm(d.addr), d.port) for d in dests}
            for r in dump(Proto.TCP, None, _CONN_STATES, bc.any_of(terms)):
                if r.local.port in tcp_ports and watched is not None:
                    watched.append(r)
                if (norm(r.remote.addr), r.remote.port) in want and dest_socks is not None:
                    dest_socks.append(r)
        # The listening hash and bhash2: watched listeners, and bind()-held ports of the range.
        terms = [[bc.sport_eq(p)] for p in tcp_ports]
        if rng is not None and rng.lo <= rng.hi:
            terms.append([bc.sport_ge(rng.lo), bc.sport_le(rng.hi)])
        if terms:
            for r in dump(Proto.TCP, None, _SERVER_STATES, bc.any_of(terms)):
                if r.local.port in tcp_ports and watched is not None:
                    watched.append(r)
                if rng is not None and rng.lo <= r.local.port <= rng.hi and bound is not None:
                    bound.append(r)
        if udp_ports:
            code = bc.any_of([[bc.sport_eq(p)] for p in udp_ports])
            for fam in (Family.INET, Family.INET6):
                if watched is not None:
                    watched.extend(dump(Proto.UDP, fam, frozenset({State.CLOSE, State.ESTABLISHED}), code))
    except (KernelError, EnvironmentProblem, OSError) as exc:
        reason = Reason.PERMISSION_DENIED if isinstance(exc, PermissionError) else Reason.KERNEL_ERROR
        missing += [
            Missing(m, reason)
            for m in (
                "rebind_sockets",
                "rebind_port_bindable",
                "rebind_listener_accept_queue",
                *_CLIENT_METRICS,
            )
        ]
        return None, None, None
    return (
        tuple(watched) if watched is not None else None,
        tuple(dest_socks) if dest_socks is not None else None,
        tuple(bound) if bound is not None else None,
    )


def procfs_dumper(
    proto: Proto, family: Family | None, states: frozenset[State], code: bytes
) -> Iterable[SocketRecord]:
    """/proc/net when netlink is unavailable: the same questions, filtered in Python by
    re-running the bytecode's intent (the callers filter again by port and remote)."""
    from rebind.kernel import procnet

    fams = (Family.INET, Family.INET6) if family is None else (family,)
    return procnet.iter_sockets(protos=(proto,), families=fams, states=states, ports=None)
