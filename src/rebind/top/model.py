"""The view model of `rebind top`: ports, their sockets, owners, countdowns and bars. Pure.

Everything here is computed from a socket table (records + owners) and kernel settings passed
in as data, so it is tested without root and without a kernel.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from rebind.model.assess import BindNow, HolderFacts, judge, kernel_holder, kernel_state_of, port_state
from rebind.model.birth import Birth
from rebind.model.birth import phrase as birth_phrase
from rebind.model.conflict import BindRequest, KernelSettings
from rebind.model.localhost import LocalhostResolution, find_split, loopback_only
from rebind.model.records import Owner, Proto, SocketEntry, SocketRecord, State, process_label
from rebind.model.sockstate import SockState
from rebind.textsafe import visible

#: States in which a socket *holds* the port for itself (a server's socket): these decide
#: whether a port "exists" in the view and who its owners are.
HOLDING_STATES = frozenset({State.LISTEN, State.BOUND_INACTIVE, State.CLOSE})

# Display order of rows inside a port: holders first, leftovers last (what frees by itself).
_STATE_ORDER = {
    State.LISTEN: 0,
    State.BOUND_INACTIVE: 1,
    State.CLOSE: 2,
    State.ESTABLISHED: 3,
    State.SYN_RECV: 4,
    State.NEW_SYN_RECV: 4,
    State.CLOSE_WAIT: 5,
    State.FIN_WAIT1: 6,
    State.LAST_ACK: 6,
    State.CLOSING: 6,
    State.FIN_WAIT2: 7,
    State.TIME_WAIT: 8,
}


class Bindable(enum.StrEnum):
    """Would ``bind(0.0.0.0:PORT)`` + ``listen()`` (as `rebind why PORT` asks) work now?"""

    YES = "yes"
    NO = "no"
    #: A plain bind fails but one with SO_REUSEADDR works (e.g. only listeners' leftovers).
    REUSEADDR = "reuseaddr"
    #: Depends on flags inet_diag does not report (SO_REUSEADDR of a TIME_WAIT, ...).
    UNKNOWN = "unknown"

    @property
    def mark(self) -> str:
        return _MARKS[self]


_MARKS = {Bindable.YES: "✓", Bindable.NO: "✗", Bindable.REUSEADDR: "✓ra", Bindable.UNKNOWN: "?"}


@dataclass(frozen=True, slots=True, order=True)
class PortKey:
    port: int
    proto: Proto

    def __str__(self) -> str:
        return f"{self.port}/{self.proto.value}"


@dataclass(frozen=True, slots=True)
class OwnerView:
    """A process holding a socket on the port. Text fields are raw: escape when showing."""

    pid: int
    name: str
    user: str | None = None
    start_ticks: int | None = None
    cmdline: tuple[str, ...] = ()
    #: systemd unit and container, when another part of rebind learns them (issue 15).
    unit: str | None = None
    container: str | None = None

    @property
    def identity(self) -> tuple[int, int | None]:
        """pid + start time: a recycled pid is another process."""
        return (self.pid, self.start_ticks)

    @property
    def label(self) -> str:
        """``name[pid]`` with every control character escaped (safe to print)."""
        return process_label(self.name, self.pid)

    @property
    def detail(self) -> str:
        """``name[pid] user unit container``, escaped."""
        parts = [self.label]
        for extra in (self.user, self.unit, self.container):
            if extra:
                parts.append(visible(extra))
        return " ".join(parts)

    @classmethod
    def of(cls, o: Owner) -> OwnerView:
        return cls(
            pid=o.pid,
            name=o.name,
            user=o.user,
            start_ticks=o.start_ticks,
            cmdline=o.cmdline,
            unit=getattr(o, "unit", None),
            container=getattr(o, "container", None),
        )


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One socket (holders) or a group of alike sockets (connections, leftovers) on a port."""

    state: State
    #: Local address (no port: the port is the row's PortKey); IPv6 in brackets.
    addr: str
    count: int = 1
    #: Longest time left (ms) at sampling time, for TIME_WAIT / orphan FIN_WAIT2.
    left_ms: int | None = None
    #: LISTEN: accept queue length and backlog (inet_diag's rqueue / wqueue).
    queue: int | None = None
    backlog: int | None = None
    #: LISTEN/UNCONN: sockets bound to this very address (a SO_REUSEPORT group when > 1).
    group: int = 1
    owners: tuple[OwnerView, ...] = ()
    #: Monotonic time the row was read (``left_ms`` counts from then); 0: the snapshot's.
    sampled: float = 0.0
    #: Who bound the holding socket and when (birth certificate, `rebind trace --install`):
    #: shown where no owner is (--no-owners, the owner gone or not visible).
    birth: Birth | None = None


@dataclass(frozen=True, slots=True)
class PortView:
    key: PortKey
    rows: tuple[SocketRow, ...] = ()
    bindable: Bindable = Bindable.YES
    #: Asked for on the command line: shown even with no socket.
    watched: bool = False
    #: Issue 20: localhost split-brain mark (``localhost-split``, ``lh:v6-only``), or None.
    localhost: str | None = None

    @property
    def held(self) -> bool:
        """Some socket holds the port for a server (listening or bound)."""
        return any(r.state in HOLDING_STATES for r in self.rows)

    @property
    def owners(self) -> tuple[OwnerView, ...]:
        """Owners of the holding sockets, each process once, in pid order."""
        seen: dict[tuple[int, int | None], OwnerView] = {}
        for r in self.rows:
            if r.state in HOLDING_STATES:
                for o in r.owners:
                    seen.setdefault(o.identity, o)
        return tuple(sorted(seen.values(), key=lambda o: o.pid))


@dataclass(frozen=True, slots=True)
class Snapshot:
    ports: tuple[PortView, ...]
    #: Wall clock (epoch seconds) and monotonic clock when the sample was taken.
    taken_at: float = 0.0
    mono: float = 0.0
    #: CPU and wall seconds the sample cost (rebind's own process; kernel time included).
    cpu_s: float = 0.0
    wall_s: float = 0.0
    source: str = "netlink"
    warnings: tuple[str, ...] = ()

    def by_key(self) -> dict[PortKey, PortView]:
        return {p.key: p for p in self.ports}


# ---------------------------------------------------------------------------------------------
# Bindable now (the conflict model over the table: never a trial bind)

#: (port, its sockets, settings, uid, the kernel's state of sockets by cookie) -> the answer
Assess = Callable[[PortKey, Sequence[SocketRecord], KernelSettings, int, Mapping[int, SockState]], Bindable]


def _holder_key(r: SocketRecord) -> tuple[object, ...]:
    # bind() conflicts compare local addresses only (inet_bind_conflict, udp_lib_lport_inuse):
    # sockets that differ only by remote end or cookie decide alike, so 10 000 TIME_WAITs to
    # different clients are judged once.
    return (r.proto, r.family, r.state, r.local, r.v6only, r.uid, r.is_mini, r.ifindex)


def assess_bindable(
    key: PortKey,
    sockets: Sequence[SocketRecord],
    settings: KernelSettings,
    uid: int,
    kernel: Mapping[int, SockState] | None = None,
) -> Bindable:
    """Would a plain ``bind(0.0.0.0:PORT)`` (+ ``listen()`` for TCP) by ``uid`` succeed now?

    The one assessment (rebind.model.assess.judge: the conflict model) over the sockets the
    table shows. ``kernel``: the sockets as the BPF iterator / lookup read them, by inet_diag
    cookie (top/sampler.py, as `why` reads them): their own SO_REUSEADDR/SO_REUSEPORT and the
    port's state (TCP bind bucket, UDP chain order, rebind.model.assess.port_state); a socket
    not in it has unknown flags. No trial bind, so watching a port never changes the kernel's
    state (a trial bind would briefly occupy the port and could make a restarting server fail).
    """
    unique: dict[tuple[object, ...], HolderFacts] = {}
    for r in sockets:
        if r.proto is key.proto and r.local.port == key.port:
            st = kernel_state_of(r, kernel)
            if st is None:
                unique.setdefault(_holder_key(r), HolderFacts(SocketEntry(r)))
                continue
            h = kernel_holder(SocketEntry(r), st)
            # sockets alike but for their flags decide differently: the flags are part of the key
            unique.setdefault((*_holder_key(r), h.opts), h)
    req = BindRequest(
        proto=key.proto,
        addr=IPv4Address("0.0.0.0"),
        port=key.port,
        uid=uid,
        listen=key.proto is Proto.TCP,
    )
    holders, port = port_state(req, tuple(unique.values()))
    plain = judge(req, holders, settings, port=port)  # the one assessment (rebind.model.assess)
    if plain.now is BindNow.BINDABLE:
        return Bindable.YES
    if plain.now is BindNow.UNKNOWN:
        return Bindable.UNKNOWN
    if judge(replace(req, reuseaddr=True), holders, settings, port=port).now is BindNow.BINDABLE:
        return Bindable.REUSEADDR
    return Bindable.NO


# ---------------------------------------------------------------------------------------------
# Building the view


def _addr(r: SocketRecord) -> str:
    a = r.local.addr
    return f"[{a}]" if a.version == 6 else str(a)


def _owners(entries: Iterable[SocketEntry]) -> tuple[OwnerView, ...]:
    seen: dict[tuple[int, int | None], OwnerView] = {}
    for e in entries:
        for o in e.owners:
            v = OwnerView.of(o)
            seen.setdefault(v.identity, v)
    return tuple(sorted(seen.values(), key=lambda o: o.pid))


def build_rows(entries: Sequence[SocketEntry], sampled: float = 0.0) -> tuple[SocketRow, ...]:
    """Rows for one port: each holding socket alone; connections and leftovers grouped by
    (state, local address) with a count and the longest time left."""
    rows: list[SocketRow] = []
    group_size: dict[tuple[object, ...], int] = {}
    for e in entries:
        r = e.socket
        if r.state in HOLDING_STATES:
            k = (r.proto, r.state, r.local)
            group_size[k] = group_size.get(k, 0) + 1
    grouped: dict[tuple[State, str], list[SocketEntry]] = {}
    for e in entries:
        r = e.socket
        if r.state in HOLDING_STATES:
            listening = r.state is State.LISTEN
            rows.append(
                SocketRow(
                    state=r.state,
                    addr=_addr(r),
                    queue=r.rqueue if listening else None,
                    backlog=r.wqueue if listening else None,
                    group=group_size[(r.proto, r.state, r.local)],
                    owners=_owners([e]),
                    sampled=sampled,
                    birth=r.birth,
                )
            )
        else:
            grouped.setdefault((r.state, _addr(r)), []).append(e)
    for (state, addr), members in grouped.items():
        lefts = [m.socket.expires_ms for m in members if m.socket.is_mini and m.socket.expires_ms is not None]
        rows.append(
            SocketRow(
                state=state,
                addr=addr,
                count=len(members),
                left_ms=max(lefts) if lefts else None,
                owners=_owners(members),
                sampled=sampled,
            )
        )
    return sort_rows(rows)


def sort_rows(rows: Iterable[SocketRow]) -> tuple[SocketRow, ...]:
    return tuple(sorted(rows, key=lambda row: (_STATE_ORDER.get(row.state, 9), row.addr)))


def reduce_holders(records: Iterable[SocketRecord]) -> list[SocketRecord]:
    """One record per kind of bind conflict (see _holder_key), keeping the longest timer: what
    the bindable assessment needs from thousands of TIME_WAITs, in a few records."""
    best: dict[tuple[object, ...], SocketRecord] = {}
    for r in records:
        k = _holder_key(r)
        old = best.get(k)
        if old is None or (r.expires_ms or 0) > (old.expires_ms or 0):
            best[k] = r
    return list(best.values())


def build_ports(
    entries: Iterable[SocketEntry],
    *,
    settings: KernelSettings,
    uid: int,
    watched: Iterable[PortKey] = (),
    assess: Assess = assess_bindable,
    sampled: float = 0.0,
    extra_rows: Mapping[PortKey, Sequence[SocketRow]] | None = None,
    extra_sockets: Mapping[PortKey, Sequence[SocketRecord]] | None = None,
    localhost: LocalhostResolution | None = None,
    kernel: Mapping[int, SockState] | None = None,
) -> tuple[PortView, ...]:
    """One view per (port, protocol) in the entries, plus every watched one (even if empty).

    ``extra_rows`` / ``extra_sockets``: rows and (reduced) sockets read at an earlier refresh
    (the costly kernel walks run less often on big tables, rebind.top.cadence). ``kernel``:
    the sockets' kernel state by cookie (assess_bindable).
    """
    kernel = kernel or {}
    extra_rows = extra_rows or {}
    extra_sockets = extra_sockets or {}
    by_key: dict[PortKey, list[SocketEntry]] = {}
    want = set(watched)
    for k in (*want, *extra_rows):
        by_key.setdefault(k, [])
    for e in entries:
        by_key.setdefault(PortKey(e.socket.local.port, e.socket.proto), []).append(e)
    out = []
    for k in sorted(by_key):
        members = by_key[k]
        rows = build_rows(members, sampled)
        if k in extra_rows:
            rows = sort_rows((*rows, *extra_rows[k]))
        socks = [m.socket for m in members] + list(extra_sockets.get(k, ()))
        view = PortView(key=k, rows=rows, bindable=assess(k, socks, settings, uid, kernel), watched=k in want)
        if localhost is not None and k.proto is Proto.TCP:
            view = replace(view, localhost=localhost_mark(k.port, members, localhost))
        out.append(view)
    return tuple(out)


def localhost_mark(port: int, members: Sequence[SocketEntry], res: LocalhostResolution) -> str | None:
    """The same mark `rebind ls` shows (rebind.cli.render.localhost_marks): a split port, or a
    one-family listener bound to the loopback address itself."""
    f = find_split(port, members, res)
    return f.kind.marker if f is not None and loopback_only(f) else None


# ---------------------------------------------------------------------------------------------
# Display helpers


def left_now(left_ms: int | None, sampled_mono: float, now_mono: float) -> int | None:
    """Milliseconds left now, from what was left at sampling time (never negative)."""
    if left_ms is None:
        return None
    return max(0, left_ms - int((now_mono - sampled_mono) * 1000))


def fmt_left(ms: int | None) -> str:
    """``41s``, ``1m05s``; whole seconds rounded up so a countdown never shows 0s early."""
    if ms is None:
        return ""
    s = math.ceil(ms / 1000)
    if s < 120:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s"


def bar(fill: int | None, cap: int | None, width: int = 8) -> str:
    """``███░░░░░ 3/8``: accept queue against backlog. Any non-empty queue shows one cell."""
    if fill is None or cap is None:
        return ""
    width = max(width, 1)
    if cap <= 0:
        cells = width if fill > 0 else 0
    else:
        cells = min(width, math.ceil(fill * width / cap)) if fill > 0 else 0
    return "█" * cells + "░" * (width - cells) + f" {fill}/{cap}"


def owners_text(owners: Sequence[OwnerView], limit: int = 2) -> str:
    """``nginx[12] root, nginx[13] www +3``: escaped process-supplied text."""
    if not owners:
        return ""
    shown = ", ".join(o.detail for o in owners[:limit])
    extra = len(owners) - limit
    return f"{shown} +{extra}" if extra > 0 else shown


def row_owners_text(row: SocketRow, width: int | None = None) -> str:
    """The owners cell: the owners, else the birth certificate (``bound by python[7] at 12:03:07``)."""
    if row.owners or row.birth is None:
        return owners_text(row.owners) if width is None else fit_owners(row.owners, width)
    text = birth_phrase(row.birth, row.birth.at)
    return text if width is None else cut(text, width)


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` terminal cells, ending with ``…`` when cut (never silently:
    a cut that hides a second owner must show that something is missing)."""
    from rich.cells import cell_len, set_cell_size

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    return set_cell_size(text, width - 1).rstrip() + "…"


def fit_owners(owners: Sequence[OwnerView], width: int, limit: int = 2) -> str:
    """:func:`owners_text` in ``width`` cells: the full ``name[pid] user`` form when it fits,
    else ``name[pid]`` only (so a second owner, e.g. the app under `rebind run`, stays
    visible), else cut with an ellipsis."""
    from rich.cells import cell_len

    full = owners_text(owners, limit)
    if cell_len(full) <= width:
        return full
    labels = ", ".join(o.label for o in owners[:limit])
    extra = len(owners) - limit
    short = f"{labels} +{extra}" if extra > 0 else labels
    return cut(short, width)


def matches(view: PortView, query: str) -> bool:
    """Every whitespace-separated term of ``query`` appears in the port, protocol, a state,
    an address, or an owner's name, pid, user, unit or container (case-insensitive)."""
    terms = query.lower().split()
    if not terms:
        return True
    hay = [str(view.key.port), view.key.proto.value, str(view.key)]
    for r in view.rows:
        hay += [r.state.label.lower(), r.state.name.lower(), r.addr.lower()]
        for o in r.owners:
            hay += [o.name.lower(), str(o.pid)]
            hay += [x.lower() for x in (o.user, o.unit, o.container) if x]
    return all(any(t in h for h in hay) for t in terms)


def filter_ports(views: Iterable[PortView], query: str) -> tuple[PortView, ...]:
    return tuple(v for v in views if matches(v, query))


def by_key(views: Iterable[PortView]) -> Mapping[PortKey, PortView]:
    return {v.key: v for v in views}
