"""The headline: one sentence that always agrees with the verdict (and so the exit code)."""

from __future__ import annotations

import errno as E

from rebind.model.advice.records import BlockerInfo, OwnerView, WhyVerdict
from rebind.model.conflict import Flag, Outcome, Verdict
from rebind.model.diagnosis import NO_SOCKET_KINDS, HolderKind, describe_owner, fmt_seconds, kind_phrase
from rebind.model.request import BindRequest, TrialResult

#: Facts of the port or the kernel build, not of a socket (conflict.Flag).
_PORT_FACTS = frozenset({Flag.BUCKET, Flag.UDP_RULE, Flag.CHAIN_ORDER})


def headline(
    req: BindRequest,
    verdict: WhyVerdict,
    outcome: Outcome,
    trial: TrialResult | None,
    infos: list[BlockerInfo],
    frees: int | None,
) -> str:
    where = f"{req.port}/{req.proto.value}"
    if verdict is WhyVerdict.FREE and outcome.verdict is not Verdict.OK:
        return f"{where} is free: the kernel's trial bind works now"
    if verdict is WhyVerdict.FREE:
        return f"{where} is free: bind() works now" + (" and so will listen()" if req.listen else "")
    if verdict is WhyVerdict.LISTEN_FAILS:
        return f"{where}: bind() works, but listen() would fail with EADDRINUSE" + _by(infos)
    if verdict is WhyVerdict.UNCERTAIN:
        every = {f for b in infos for f in b.blocker.decided_by}
        own = sorted(str(f) for f in every if f not in _PORT_FACTS)
        parts = [f"the {' and '.join(own)} of sockets nobody could read"] if own else []
        parts += sorted(f"the {f} (nothing here reads it)" for f in every if f in _PORT_FACTS)
        parts = parts or ["the flags of sockets nobody could read"]
        return f"{where} may be busy: it depends on " + " and ".join(parts) + _by(infos)
    sockets = [b for b in infos if b.kind not in NO_SOCKET_KINDS]
    if verdict is WhyVerdict.CANNOT_BIND or not sockets:
        return _cannot_bind(req, verdict, outcome, trial, infos)
    first = sockets[0]
    phrase = kind_phrase(first.kind, first.entry.socket, first.opts.reuseaddr)
    timed = (HolderKind.TIME_WAIT, HolderKind.ORPHAN_FIN_WAIT2)
    same_timed = first.kind in timed and len({b.kind for b in sockets}) == 1
    if same_timed and len(sockets) > 1:
        phrase = f"{len(sockets)} {phrase}"
    owner = _owner_words(first)
    more = f" and {len(sockets) - 1} more" if len(sockets) > 1 and not same_timed else ""
    tail = f" — free in {fmt_seconds(frees)}" if frees is not None else ""
    return f"{where} is busy: {phrase}{owner}{more}{tail}"


def _by(infos: list[BlockerInfo]) -> str:
    sockets = [b for b in infos if b.kind not in NO_SOCKET_KINDS]
    if not sockets:
        return ""
    first = sockets[0]
    return f" ({kind_phrase(first.kind, first.entry.socket, first.opts.reuseaddr)}{_owner_words(first)})"


def _owner_words(b: BlockerInfo) -> str:
    if b.entry.owners:
        return f" ({describe_owner(b.entry.owners)})"
    if b.owners is OwnerView.OUTSIDE:
        return " (held by a process outside this PID namespace)"
    if b.owners is OwnerView.UNKNOWN:
        return " (owner not visible: run as root to see it)"
    return ""


def _cannot_bind(
    req: BindRequest,
    verdict: WhyVerdict,
    outcome: Outcome,
    trial: TrialResult | None,
    infos: list[BlockerInfo],
) -> str:
    where = f"{req.port}/{req.proto.value}"
    plain = [b for b in infos if b.kind in NO_SOCKET_KINDS]
    err = trial.error_name if trial is not None and not trial.ok else E.errorcode.get(outcome.errno or 0)
    if plain:
        b = plain[0]
        on = f" on {req.addr}" if b.kind is not HolderKind.PRIVILEGED_PORT else ""
        return f"{where} cannot be bound{on}: {b.blocker.reason} ({err or 'predicted'})"
    if verdict is WhyVerdict.BUSY:
        return (
            f"{where} is busy: the kernel refuses bind() with EADDRINUSE, "
            "but no socket that blocks it is visible"
        )
    return f"{where} cannot be bound: {trial}" if trial is not None else f"{where} cannot be bound ({err})"
