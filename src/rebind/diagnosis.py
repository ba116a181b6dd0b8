"""`rebind why`: gather the facts (socket table, owners, flags, settings, trial binds), ask the
model, and cross-check it against the kernel.

The trial bind is ground truth for the bind() stage; the model explains it and predicts the
listen() stage. When they disagree, the diagnosis says so loudly: that is a bug in the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address

from rebind.kernel.trial import TrialResult, trial_bind
from rebind.model.conflict import (
    BindRequest,
    Blocker,
    Holder,
    KernelSettings,
    Outcome,
    Rule,
    SockOpts,
    Stage,
    Verdict,
    evaluate,
)
from rebind.model.diagnosis import (
    NO_SOCKET_KINDS,
    Fix,
    HolderKind,
    ProcessHint,
    classify,
    describe_owner,
    fixes_for,
    fmt_seconds,
    kind_phrase,
)
from rebind.model.records import Owner, Proto, SocketEntry, SocketTable, State


@dataclass(frozen=True, slots=True)
class BlockerInfo:
    entry: SocketEntry
    blocker: Blocker
    kind: HolderKind
    opts: SockOpts
    #: "read" (pidfd_getfd + getsockopt), "inferred" (from the listener or a trial), or "unknown".
    opts_source: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One way to bind, tried for real (bind stage) and predicted (listen stage)."""

    label: str
    request: BindRequest
    trial: TrialResult
    outcome: Outcome

    @property
    def works(self) -> bool:
        return self.trial.ok and self.outcome.verdict is not Verdict.FAIL


@dataclass(frozen=True, slots=True)
class Diagnosis:
    request: BindRequest
    outcome: Outcome
    trial: TrialResult
    blockers: tuple[BlockerInfo, ...]
    attempts: tuple[Attempt, ...]
    fixes: tuple[Fix, ...]
    frees_in_ms: int | None
    verdict: str
    table: SocketTable
    settings: KernelSettings
    #: Non-empty when the model and the trial bind disagree (a bug to fix).
    disagreement: str = ""

    @property
    def bindable(self) -> bool:
        return self.trial.ok and self.outcome.verdict is not Verdict.FAIL


def default_request(
    port: int,
    *,
    addr: str | IPv4Address | IPv6Address | None = None,
    proto: Proto = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
) -> BindRequest:
    a = ip_address(addr) if isinstance(addr, str) else addr
    return BindRequest(
        proto=proto,
        addr=a if a is not None else IPv4Address("0.0.0.0"),
        port=port,
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=v6only,
        uid=os.geteuid(),
        listen=proto is Proto.TCP,
    )


def _try(req: BindRequest) -> TrialResult:
    return trial_bind(
        req.proto, req.addr, req.port, reuseaddr=req.reuseaddr, reuseport=req.reuseport, v6only=req.v6only
    )


def diagnose(req: BindRequest, *, owners: bool = True, table: SocketTable | None = None) -> Diagnosis:
    from rebind.kernel.sysctl import kernel_settings
    from rebind.sockets import socket_table

    settings = kernel_settings()
    table = table or socket_table(ports=[req.port], protos=[req.proto], owners=owners)
    trial = _try(req)
    holders, sources = _holders(table, req)
    outcome = evaluate(req, holders, settings)
    # Resolve unknown flags on timewait sockets with the kernel itself: a SO_REUSEADDR trial
    # succeeds over a TIME_WAIT only if that TIME_WAIT's socket had SO_REUSEADDR too.
    holders, sources = _infer_from_trial(req, holders, sources, settings)
    outcome = evaluate(req, holders, settings)
    attempts = tuple(_attempts(req, holders, settings))
    hints = _process_hints(table)
    infos = _blocker_infos(outcome, table, holders, sources, hints, settings)
    frees = _frees_in(infos)
    disagreement = _cross_check(outcome, trial)
    old_flag = _old_reuseaddr(infos)
    fixes = fixes_for(
        [b.kind for b in infos],
        port=req.port,
        proto=req.proto,
        frees_in_ms=frees,
        old_reuseaddr=old_flag,
        pids=sorted({o.pid for b in infos for o in b.entry.owners}),
        can_destroy=_can_destroy(),
    )
    if outcome.verdict is Verdict.OK and trial.ok:
        fixes = []
    verdict = _verdict_line(req, outcome, trial, infos, frees)
    return Diagnosis(
        request=req,
        outcome=outcome,
        trial=trial,
        blockers=tuple(infos),
        attempts=attempts,
        fixes=tuple(fixes),
        frees_in_ms=frees,
        verdict=verdict,
        table=table,
        settings=settings,
        disagreement=disagreement,
    )


def _can_destroy() -> bool:
    from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

    return has_cap(CAP_NET_ADMIN) and kernel_version() >= (6, 0)


def _holders(table: SocketTable, req: BindRequest) -> tuple[list[Holder], list[str]]:
    from rebind.kernel.pidfd import socket_flags

    listeners = [e for e in table.entries if e.socket.state is State.LISTEN]
    holders: list[Holder] = []
    sources: list[str] = []
    for e in table.entries:
        if e.socket.proto is not req.proto:
            continue
        opts, src = SockOpts(), "unknown"
        for o in e.owners:
            flags = socket_flags(o.pid, o.fd, o.start_ticks)
            if flags is not None:
                opts, src = SockOpts(*flags), "read"
                break
        parent = _listener_for(e, listeners) if e.socket.state is not State.LISTEN else None
        if src == "unknown" and not e.owners and parent is not None:
            # A child's TIME_WAIT normally carries its listener's flags (inet_twsk_alloc copies
            # sk_reuse from the child, which inherited it from the listener at accept()).
            for o in parent.owners:
                flags = socket_flags(o.pid, o.fd, o.start_ticks)
                if flags is not None:
                    opts, src = SockOpts(*flags), "inferred"
                    break
        if opts.v6only is None and e.socket.v6only is None and parent is not None:
            # inet_diag reports v6only only for LISTEN/CLOSE sockets; an accepted child (and its
            # TIME_WAIT) keeps the dual-stack listener's ipv6only.
            opts = SockOpts(opts.reuseaddr, opts.reuseport, parent.socket.v6only)
        holders.append(Holder(e.socket, opts))
        sources.append(src)
    return holders, sources


def _listener_for(e: SocketEntry, listeners: list[SocketEntry]) -> SocketEntry | None:
    for lst in listeners:
        la = lst.socket.local
        if la.port == e.socket.local.port and (la.is_wildcard or la.addr == e.socket.local.addr):
            return lst
    return None


def _infer_from_trial(
    req: BindRequest, holders: list[Holder], sources: list[str], settings: KernelSettings
) -> tuple[list[Holder], list[str]]:
    # Ownerless leftovers (TIME_WAIT, orphaned FIN_WAIT*/LAST_ACK/CLOSING) keep the flag of the
    # socket that closed, and nothing exposes it -- except the kernel's own answer to a bind.
    unknown = [
        i
        for i, (h, src) in enumerate(zip(holders, sources, strict=True))
        if src == "unknown" and h.opts.reuseaddr is None and h.socket.state is not State.LISTEN
    ]
    if not unknown or req.proto is not Proto.TCP:
        return holders, sources
    others_ok = [h for i, h in enumerate(holders) if i not in unknown]
    probe = replace(req, reuseaddr=True, reuseport=False, listen=False)
    # Only meaningful when nothing else would block the probe on its own.
    if evaluate(probe, others_ok, settings).verdict is not Verdict.OK:
        return holders, sources
    res = _try(probe)
    if res.ok:
        value: bool | None = True
    elif len(unknown) == 1:
        value = False
    else:
        return holders, sources  # at least one lacked it; cannot say which
    new = list(holders)
    srcs = list(sources)
    for i in unknown:
        new[i] = Holder(holders[i].socket, replace(holders[i].opts, reuseaddr=value))
        srcs[i] = "inferred"
    return new, srcs


def _attempts(req: BindRequest, holders: list[Holder], settings: KernelSettings) -> list[Attempt]:
    variants: list[tuple[str, BindRequest]] = [
        ("as asked", req),
        ("plain bind()", replace(req, reuseaddr=False, reuseport=False)),
        ("with SO_REUSEADDR", replace(req, reuseaddr=True, reuseport=False)),
        ("with SO_REUSEPORT", replace(req, reuseaddr=False, reuseport=True)),
    ]
    alt = _alternative_address(req)
    if alt is not None:
        variants.append((f"on {alt}", replace(req, addr=alt, v6only=True if alt.version == 6 else None)))
    seen: set[BindRequest] = set()
    out = []
    for label, r in variants:
        if r in seen:
            continue
        seen.add(r)
        out.append(Attempt(label, r, _try(r), evaluate(r, holders, settings)))
    return out


def _alternative_address(req: BindRequest) -> IPv4Address | IPv6Address | None:
    if req.addr.version == 4:
        # Leftovers hold only their own concrete address; another 127/8 address is often free.
        return IPv4Address("127.0.0.2") if req.addr != IPv4Address("127.0.0.2") else IPv4Address("127.0.0.3")
    return None


def _process_hints(table: SocketTable) -> dict[int, ProcessHint]:
    """Process-tree facts for owners: one /proc stat read each (owners can number hundreds)."""
    from rebind.kernel.owners import proc_root
    from rebind.kernel.procstat import PGRP, stat_field

    holders_of: dict[int | None, set[int]] = {}
    for e in table.entries:
        holders_of.setdefault(e.socket.inode, set()).update(o.pid for o in e.owners)
    hints: dict[int, ProcessHint] = {}
    root = proc_root()
    for e in table.entries:
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


def _blocker_infos(
    outcome: Outcome,
    table: SocketTable,
    holders: list[Holder],
    sources: list[str],
    hints: dict[int, ProcessHint],
    settings: KernelSettings,
) -> list[BlockerInfo]:
    entries = {e.socket.key: e for e in table.entries}
    src_of = {h.socket.key: s for h, s in zip(holders, sources, strict=True)}
    listener = any(e.socket.state is State.LISTEN for e in table.entries)
    out = []
    for b in outcome.blockers:
        e = entries.get(b.holder.socket.key, SocketEntry(b.holder.socket))
        if b.rule in _NO_SOCKET_RULES:
            kind = _NO_SOCKET_RULES[b.rule]
        else:
            kind = classify(e, hints=hints, listener_on_port=listener, ephemeral=settings.ip_local_port_range)
        out.append(BlockerInfo(e, b, kind, b.holder.opts, src_of.get(b.holder.socket.key, "unknown")))
    return out


_NO_SOCKET_RULES = {
    Rule.PRIVILEGED_PORT: HolderKind.PRIVILEGED_PORT,
    Rule.ADDRESS_NOT_LOCAL: HolderKind.ADDRESS_NOT_LOCAL,
}


def _frees_in(infos: list[BlockerInfo]) -> int | None:
    """When the last blocker goes away by itself; None if any blocker has no timer."""
    if not infos:
        return None
    times = []
    for b in infos:
        r = b.entry.socket
        if r.is_mini and r.expires_ms is not None:
            times.append(r.expires_ms)
        else:
            return None
    return max(times)


def _old_reuseaddr(infos: list[BlockerInfo]) -> bool | None:
    vals = {b.opts.reuseaddr for b in infos if not b.entry.owners}
    return vals.pop() if len(vals) == 1 else None


def _cross_check(outcome: Outcome, trial: TrialResult) -> str:
    bind_fails = outcome.verdict is Verdict.FAIL and outcome.stage is Stage.BIND
    if outcome.verdict is Verdict.DEPENDS:
        return ""
    if bind_fails and trial.ok:
        return f"the model predicted bind() to fail with errno {outcome.errno}, but a trial bind succeeded"
    if not bind_fails and not trial.ok:
        return f"the model predicted bind() to succeed, but a trial bind failed: {trial}"
    if bind_fails and not trial.ok and outcome.errno != trial.errno:
        return f"the model predicted errno {outcome.errno}, the kernel said {trial.errno}"
    return ""


def _verdict_line(
    req: BindRequest, outcome: Outcome, trial: TrialResult, infos: list[BlockerInfo], frees: int | None
) -> str:
    where = f"{req.port}/{req.proto.value}"
    if trial.ok and outcome.verdict is Verdict.OK:
        return f"{where} is free: bind() works now" + (" and so will listen()" if req.listen else "")
    if trial.ok and outcome.stage is Stage.LISTEN:
        return f"{where}: bind() works, but listen() would fail with EADDRINUSE"
    if not infos:
        return f"{where} cannot be bound: {trial}"
    first = infos[0]
    if first.kind in NO_SOCKET_KINDS:
        on = f" on {req.addr}" if first.kind is HolderKind.ADDRESS_NOT_LOCAL else ""
        return f"{where} cannot be bound{on}: {first.blocker.reason} ({trial.error_name or 'predicted'})"
    phrase = kind_phrase(first.kind, first.entry.socket, first.opts.reuseaddr)
    if (
        first.kind in (HolderKind.TIME_WAIT, HolderKind.ORPHAN_FIN_WAIT2)
        and len({b.kind for b in infos}) == 1
    ):
        count = f"{len(infos)} " if len(infos) > 1 else ""
        phrase = f"{count}{phrase}"
    owners = describe_owner(first.entry.owners) if first.entry.owners else ""
    tail = f" — free in {fmt_seconds(frees)}" if frees is not None else ""
    by = f" ({owners})" if owners else ""
    more = (
        f" and {len(infos) - 1} more"
        if len(infos) > 1
        and first.kind
        not in (
            HolderKind.TIME_WAIT,
            HolderKind.ORPHAN_FIN_WAIT2,
        )
        else ""
    )
    return f"{where} is busy: {phrase}{by}{more}{tail}"


def explain_bind_failure(
    host: str, port: int, proto: str = "tcp", reuseaddr: bool = True, reuseport: bool = False
) -> str:
    """A short multi-line explanation for a failed bind, for other commands (e.g. `rebind run`)."""
    try:
        d = diagnose(
            default_request(port, addr=host, proto=Proto(proto), reuseaddr=reuseaddr, reuseport=reuseport)
        )
    except Exception as exc:  # explaining must never hide the original failure
        return f"(could not diagnose: {exc})"
    lines = [d.verdict]
    for b in d.blockers[:5]:
        lines.append(f"  - {b.blocker.reason}")
    if d.fixes:
        f = d.fixes[0]
        lines.append(f"  fix: {f.title}" + (f": {f.command}" if f.command else ""))
    return "\n".join(lines)


def owner_summary(owners: tuple[Owner, ...]) -> str:
    return describe_owner(owners)
