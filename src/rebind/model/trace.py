"""`rebind trace` events: decoded records, the requests they ask, and the models' answers as a
:class:`Snapshot`. Pure.

A record comes from the kernel program (:mod:`rebind.kernel.bpf.trace_prog`, layout
:data:`~rebind.kernel.bpf.trace_prog.EVENT`); everything in it is what the failing socket looked
like at the failing call. The blockers seen "at that instant" come from the same pipeline as
`rebind why` (observer-free: nothing is bound) and are attached as a :class:`Snapshot`.

An event's line and its JSON (``rebind.trace/1``, docs/json.md) are built in
:mod:`rebind.render.trace`.
"""

from __future__ import annotations

import enum
import errno as _errno
from dataclasses import dataclass

from rebind.errors import UsageError
from rebind.model.advice import BlockerInfo, Diagnosis, WhyVerdict
from rebind.model.birth import phrase as birth_phrase
from rebind.model.connect import ConnectResult
from rebind.model.diagnosis import NO_SOCKET_KINDS, HolderKind, describe_owner, fmt_seconds, kind_phrase
from rebind.model.records import IPAddress, Proto

AF_INET, AF_INET6 = 2, 10
IPPROTO_TCP, IPPROTO_UDP = 6, 17


class Kind(enum.IntEnum):
    """The failing call (the numbers are the kernel program's EVENT.KIND)."""

    BIND = 1
    LISTEN = 2
    CONNECT = 3


#: What `rebind trace` reports without --errno: the errors rebind's models explain.
DEFAULT_ERRNOS = ("EADDRINUSE", "EADDRNOTAVAIL", "EACCES")


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One failing call, as the kernel saw it when the call returned."""

    kind: Kind
    errno: int
    pid: int  # tgid, initial pid namespace
    tid: int
    comm: str
    cgroup_id: int
    netns: int
    family: int  # the socket's (AF_INET, AF_INET6)
    proto: Proto | None  # None: another protocol (MPTCP, SCTP, ping...)
    fd: int
    #: bind: the address asked for; connect: the destination; listen: the bound address.
    addr: IPAddress | None
    port: int
    scope_id: int = 0
    #: The socket's own bound address and port at the call (connect: its source, if bound).
    local_addr: IPAddress | None = None
    local_port: int = 0
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False
    bound_dev_if: int = 0
    uid: int = 0
    inode: int = 0
    arg: int = 0  # addrlen, or listen's backlog
    mono_ns: int = 0  # CLOCK_MONOTONIC at the failure
    ts: float = 0.0  # wall clock, from mono_ns

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    @property
    def where(self) -> str:
        if self.addr is None:
            return f"?:{self.port}"
        host = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        return f"{host}:{self.port}"

    @property
    def flags(self) -> tuple[str, ...]:
        out = []
        if self.reuseaddr:
            out.append("SO_REUSEADDR")
        if self.reuseport:
            out.append("SO_REUSEPORT")
        if self.v6only and self.family == AF_INET6:
            out.append("IPV6_V6ONLY")
        if self.bound_dev_if:
            out.append(f"SO_BINDTODEVICE={self.bound_dev_if}")
        return tuple(out)


def parse_errnos(text: str | None) -> frozenset[int]:
    """``EADDRINUSE,EACCES`` or numbers, or ``all``; UsageError for an unknown name."""
    if text is None:
        return frozenset(getattr(_errno, n) for n in DEFAULT_ERRNOS)
    out: set[int] = set()
    for part in text.split(","):
        name = part.strip().upper()
        if not name:
            continue
        if name == "ALL":
            return frozenset(range(1, 4096))
        if name.isascii() and name.isdigit():
            value = int(name)
        else:
            value = getattr(_errno, name, 0) if name.startswith("E") and name.isidentifier() else 0
        if not isinstance(value, int) or not 0 < value < 4096:
            raise UsageError(f"--errno: {part.strip()!r} is not an errno name (e.g. EADDRINUSE) or number")
        out.add(value)
    if not out:
        raise UsageError("--errno: no errno given (e.g. EADDRINUSE,EADDRNOTAVAIL,EACCES, or all)")
    return frozenset(out)


def wanted(ev: TraceEvent, ports: frozenset[int]) -> bool:
    """The PORT filter: the port asked for, or (connect) the socket's own bound port."""
    return not ports or ev.port in ports or (ev.kind is Kind.CONNECT and ev.local_port in ports)


# ---------------------------------------------------------------------------------------------
# The snapshot: what the model names, taken right after the failure


@dataclass(frozen=True, slots=True)
class BlockerView:
    """One blocker, flattened for lines and JSON (render/trace.py)."""

    kind: str  # HolderKind value, or "range" for a connect's port range
    text: str  # the words of a line: "TIME_WAIT 127.0.0.1:8080 → 127.0.0.1:5000 left by ..."
    state: str | None = None
    local: str | None = None
    remote: str | None = None
    left_ms: int | None = None
    pids: tuple[int, ...] = ()
    group: int = 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The model's answer for the event's request, read just after the event."""

    verdict: str  # WhyVerdict value (bind/listen) or connect Verdict value
    reason: str  # one line
    blockers: tuple[BlockerView, ...] = ()
    headline: str = ""
    #: Milliseconds between the failure and the end of the snapshot.
    after_ms: float | None = None
    #: The snapshot could not be taken (namespace gone, no permission): why.
    error: str | None = None


def unavailable(why: str) -> Snapshot:
    return Snapshot(verdict="unknown", reason=f"no snapshot: {why}", error=why)


# ---------------------------------------------------------------------------------------------
# From the models' answers to a Snapshot (pure)


def _timed_text(kind: HolderKind, words: str, where: str) -> str:
    """'TIME_WAIT left by a server ...' with the endpoints right after the state's name."""
    if kind in (HolderKind.TIME_WAIT, HolderKind.ORPHAN_FIN_WAIT2):
        first, _, rest = words.partition(" ")
        if kind is HolderKind.ORPHAN_FIN_WAIT2:  # "an orphaned FIN_WAIT2 left by ..."
            return f"{words} {where}"
        return f"{first} {where} {rest}"
    return f"{words} {where}"


def _blocker_view(b: BlockerInfo) -> BlockerView:
    r = b.entry.socket
    if b.kind in NO_SOCKET_KINDS:
        return BlockerView(kind=b.kind.value, text=b.blocker.reason)
    remote = f" → {r.remote}" if r.remote.port else ""
    text = _timed_text(b.kind, kind_phrase(b.kind, r, b.opts.reuseaddr), f"{r.local}{remote}")
    if b.entry.owners:
        text += f" ({describe_owner(b.entry.owners)})"
    elif r.birth is not None:  # no owner scan (--no-owners) or the owner is gone: the certificate
        text += f" ({birth_phrase(r.birth, r.birth.at)})"
    if r.is_mini and r.expires_ms is not None:
        text += f", {fmt_seconds(r.expires_ms)} left"
    if b.group > 1:
        text += f" (and {b.group - 1} like it)"
    if not b.blocker.certain:
        text += " (depends on a flag nobody can read)"
    return BlockerView(
        kind=b.kind.value,
        text=text,
        state=r.state.label,
        local=str(r.local),
        remote=str(r.remote) if r.remote.port else None,
        left_ms=r.expires_ms if r.is_mini else None,
        pids=tuple(sorted({o.pid for o in b.entry.owners})),
        group=b.group,
    )


def from_diagnosis(d: Diagnosis) -> Snapshot:
    """The bind/listen model's answer (observer-free `why`) as a one-line reason."""
    views = []
    seen: set[int] = set()
    last = None
    for b in d.blockers:
        if b.blocker is last:
            continue  # a group's members follow their representative: one look a run
        last = b.blocker
        if id(last) in seen:
            continue  # one representative per group of identical leftovers
        seen.add(id(last))
        views.append(_blocker_view(b))
    if d.verdict is WhyVerdict.FREE:
        reason = f"gone by the snapshot: {d.headline}"
    elif views:
        reason = views[0].text
        if len(views) > 1:
            reason += f"; and {len(views) - 1} more"
        if d.verdict is WhyVerdict.LISTEN_FAILS:
            reason += " (at listen())"
    else:
        reason = d.headline
    return Snapshot(verdict=d.verdict.value, reason=reason, blockers=tuple(views), headline=d.headline)


def from_connect(res: ConnectResult) -> Snapshot:
    """The client-port model's answer: where the range went."""
    acc = res.accounting
    lo, hi = res.effective_range
    parts = [f"{n} {k}" for k, n in sorted(acc.counts.items(), key=lambda kv: -kv[1]) if n]
    reason = f"{acc.usable} of {acc.total} ports of {lo}-{hi} usable"
    if parts:
        reason += f" ({', '.join(parts)})"
    if res.consumers:
        c = res.consumers[0]
        held = c.total  # None: connections elsewhere not counted (model/connect: RangeBuckets)
        count = held if held is not None else f"{c.to_destination + c.by_bind} to it or by bind()"
        reason += f"; most held by {c.name} (pid {c.pid}): {count}"
    views = tuple(
        BlockerView(
            kind="time-wait",
            text=tw.why,
            state=tw.holder.entry.socket.state.label,
            local=str(tw.holder.entry.socket.local),
            remote=str(tw.holder.entry.socket.remote),
            left_ms=tw.left_ms,
        )
        for tw in res.time_waits[:16]
    )
    return Snapshot(verdict=res.outcome.verdict.value, reason=reason, blockers=views, headline=res.headline)
