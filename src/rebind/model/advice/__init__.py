"""`rebind why`, pure: from the gathered facts to one answer and its words.

Flow: request -> facts (kernel/facts.py: table, owners, flags with provenance, settings, safe
trial binds) -> :func:`advise` (this module) -> render (render/why.py). No I/O here, so every
sentence is unit-tested without root.

The kernel is ground truth for the bind() stage: when a trial bind ran, its answer is the
verdict, and a model disagreement is named with what could explain it. The model predicts the
listen() stage and every alternative (a trial in the port's bind bucket would change the bucket's
fast-reuse cache for every later bind; see conflict.probe_is_harmless).

Rooms: ``records`` (facts, verdict, blockers, attempts, diagnosis), ``inference`` (grouping the
leftovers, flags from the trials), ``headline``; this module decides (``assess``, ``decide``,
``cross_check``, ``advise``) and re-exports the names its callers use.
"""

from __future__ import annotations

import errno as E
import itertools
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from rebind.model.advice.headline import headline
from rebind.model.advice.inference import group_holders as group_holders
from rebind.model.advice.inference import infer_from_trials as infer_from_trials
from rebind.model.advice.records import Assessment as Assessment
from rebind.model.advice.records import Attempt as Attempt
from rebind.model.advice.records import BlockerInfo as BlockerInfo
from rebind.model.advice.records import Diagnosis as Diagnosis
from rebind.model.advice.records import Disagreement as Disagreement
from rebind.model.advice.records import Facts as Facts
from rebind.model.advice.records import OwnerView as OwnerView
from rebind.model.advice.records import WhyVerdict as WhyVerdict
from rebind.model.assess import HolderFacts as HolderFacts  # re-exported: its old home
from rebind.model.assess import Provenance as Provenance
from rebind.model.assess import judge
from rebind.model.conflict import Alternative, Outcome, Rule, SockOpts, Stage, Verdict, alternatives
from rebind.model.containers import ContainerRef
from rebind.model.diagnosis import Fix, HolderKind, classify, fixes_for
from rebind.model.records import Proto, SocketEntry, SocketTable, State
from rebind.model.request import BindRequest, TrialResult
from rebind.slotted import twin

# --------------------------------------------------------------------------------------------
# The answer.


def assess(request: BindRequest, facts: Facts) -> Assessment:
    """The model's answer from the facts, with flags inferred from whatever trials ran.

    Observer-free when ``facts.trials`` is empty (gather(..., trials=False)): nothing is bound.
    """
    groups = infer_from_trials(group_holders(facts.holders), facts.settings, facts.trials)
    reps = [g[0].holder for g in groups]
    # the one assessment (model/assess.py), with the bucket state the kernel read
    outcome = judge(request, reps, facts.settings, port=facts.port).outcome
    holders = tuple(itertools.chain.from_iterable(groups))
    return Assessment(request, outcome, holders, groups)


def decide(req: BindRequest, outcome: Outcome, trial: TrialResult | None) -> WhyVerdict:
    """The verdict: the kernel's trial for bind(), the model for listen() and when no trial ran."""
    bind_fails = outcome.verdict is Verdict.FAIL and outcome.stage is Stage.BIND
    if trial is not None:
        if not trial.ok:
            return WhyVerdict.BUSY if trial.errno == E.EADDRINUSE else WhyVerdict.CANNOT_BIND
        if outcome.stage is Stage.BIND or outcome.verdict is Verdict.OK:
            # A bind-stage FAIL is a disagreement, a bind-stage DEPENDS is decided: the kernel
            # wins. (evaluate() stops at bind(); listen() rechecks the same holders, which
            # let bind() through: only a listener can refuse listen(), and it refuses bind too.)
            return WhyVerdict.FREE
    elif bind_fails:
        return WhyVerdict.BUSY if outcome.errno == E.EADDRINUSE else WhyVerdict.CANNOT_BIND
    elif outcome.verdict is Verdict.OK:
        return WhyVerdict.FREE
    if outcome.verdict is Verdict.FAIL:  # at listen(): bind() works
        return WhyVerdict.LISTEN_FAILS
    return WhyVerdict.UNCERTAIN


def cross_check(
    req: BindRequest, outcome: Outcome, trial: TrialResult | None, table: SocketTable
) -> Disagreement | None:
    """Model against kernel for the bind() stage; None when they agree (or nothing to compare)."""
    if trial is None or outcome.verdict is Verdict.DEPENDS:
        return None
    bind_fails = outcome.verdict is Verdict.FAIL and outcome.stage is Stage.BIND
    if bind_fails and trial.ok:
        why = ""
        if req.proto is Proto.TCP and outcome.errno == E.EADDRINUSE and req.reuseport:
            why = (
                "the port's SO_REUSEPORT cache (tb->fastreuseport; inet_csk_update_fastreuse) holds "
                "your uid and an address covering yours from an earlier SO_REUSEPORT bind on the "
                "port, whose socket may since have cleared the flag or closed: sk_reuseport_match() "
                "then skips the conflict check"
            )
        return Disagreement(
            f"the model predicted bind() to fail with {E.errorcode.get(outcome.errno or 0)}, "
            "but the kernel's trial bind succeeded",
            why,
        )
    if not bind_fails and not trial.ok:
        why = ""
        if trial.errno == E.EADDRINUSE and table.source == "procfs":
            why = (
                "/proc/net/tcp does not list bound-but-not-listening sockets (rebind fell back to it: "
                "inet_diag unavailable or REBIND_FORCE_PROCFS=1); such a socket holds the port"
            )
        elif trial.errno == E.EADDRINUSE:
            why = "a socket bound between rebind's dump and its trial bind, or one in another VRF"
        return Disagreement(
            f"the model predicted bind() to succeed, but the kernel said {trial.error_name}", why
        )
    if bind_fails and not trial.ok and outcome.errno != trial.errno:
        return Disagreement(
            f"the model predicted {E.errorcode.get(outcome.errno or 0)}, the kernel said {trial.error_name}"
        )
    return None


_NO_SOCKET_RULES = {
    Rule.PRIVILEGED_PORT: HolderKind.PRIVILEGED_PORT,
    Rule.ADDRESS_NOT_LOCAL: HolderKind.ADDRESS_NOT_LOCAL,
    Rule.ADDRESS_TENTATIVE: HolderKind.ADDRESS_TENTATIVE,
    Rule.INVALID_ADDRESS: HolderKind.INVALID_ADDRESS,
}


def _owner_view(entry: SocketEntry, facts: Facts) -> OwnerView:
    if entry.owners:
        return OwnerView.SEEN
    if entry.socket.is_mini:
        return OwnerView.NONE_NEEDED
    if not facts.table.owners_scanned:
        return OwnerView.NOT_SCANNED
    return OwnerView.OUTSIDE if facts.owners_complete else OwnerView.UNKNOWN


def blocker_infos(outcome: Outcome, a: Assessment, facts: Facts) -> list[BlockerInfo]:
    """One BlockerInfo per blocking socket (a group's members share their representative's)."""
    by_key = {g[0].entry.socket.key: g for g in a.groups}
    # a group's members share their state (group_holders' key): its first says for all
    listener = any(g[0].entry.socket.state is State.LISTEN for g in a.groups)
    out: list[BlockerInfo] = []
    add = out.append
    for b in outcome.blockers:
        if b.rule in _NO_SOCKET_RULES:
            out.append(
                BlockerInfo(
                    SocketEntry(b.holder.socket), b, _NO_SOCKET_RULES[b.rule], SockOpts(), Provenance.READ
                )
            )
            continue
        group = by_key.get(b.holder.socket.key) or (HolderFacts(SocketEntry(b.holder.socket)),)
        rep = group[0]
        kind = classify(
            rep.entry,
            hints=facts.hints,
            listener_on_port=listener,
            ephemeral=facts.settings.ip_local_port_range,
        )
        n = len(group)
        views: dict[bool, OwnerView] = {}
        for h in group:
            e = h.entry
            has = bool(e.owners)
            view = views.get(has)
            if view is None:  # group members agree on everything but owners and peers
                view = views[has] = _owner_view(e, facts)
            # BlockerInfo(e, b, kind, h.opts, h.provenance, view, n), built in a plain class of
            # its slots (rebind/slotted.py): one a socket, ten thousand at a TIME_WAIT port
            info = _InfoSlots()
            info.entry, info.blocker, info.kind, info.opts = e, b, kind, h.opts
            info.provenance, info.owners, info.group = h.provenance, view, n
            info.__class__ = BlockerInfo
            add(info)
    return out


_InfoSlots = twin(BlockerInfo)


def frees_in(infos: Iterable[BlockerInfo]) -> int | None:
    """When the last blocker goes away by itself; None if any blocker has no timer."""
    latest: int | None = None
    last = None
    for b in infos:
        if b.blocker is not last:  # the kind is per group (a run of one blocker): checked once
            last = b.blocker
            if b.kind not in _TIMED:
                return None
        ms = b.entry.socket.expires_ms
        if ms is None:
            return None
        if latest is None or ms > latest:  # not max(): once per TIME_WAIT
            latest = ms
    return latest


_TIMED = frozenset({HolderKind.TIME_WAIT, HolderKind.ORPHAN_FIN_WAIT2})


def old_reuseaddr(infos: Iterable[BlockerInfo]) -> bool | None:
    vals = {b.opts.reuseaddr for b in infos if not b.entry.owners}
    return vals.pop() if len(vals) == 1 else None


def trial_for(trials: Mapping[BindRequest, TrialResult], req: BindRequest) -> TrialResult | None:
    """The trial that tried ``req``'s bind() (trials are keyed by the bind-only request)."""
    return trials.get(replace(req, listen=False) if req.listen else req)


def attempts_for(req: BindRequest, a: Assessment, facts: Facts) -> tuple[Attempt, ...]:
    """conflict.alternatives, each with the kernel's answer where a harmless trial ran."""
    reps = [g[0].holder for g in a.groups]

    def attempt(x: Alternative) -> Attempt:
        return Attempt(x.label, x.request, x.outcome, trial_for(facts.trials, x.request))

    alts = alternatives(req, reps, facts.settings, works=lambda x: attempt(x).works)
    return tuple(attempt(x) for x in alts)


def _containers(infos: Sequence[BlockerInfo]) -> tuple[ContainerRef, ...]:
    """The containers behind the blockers' proxies, each once, in blocker order."""
    seen: dict[str, ContainerRef] = {}
    for b in infos:
        for o in b.entry.owners:
            if o.container is not None and (o.proxy is not None or b.kind is HolderKind.CONTAINER_PROXY):
                seen.setdefault(o.container.id, o.container)
    return tuple(seen.values())


_VIEW, _KIND = operator.attrgetter("owners"), operator.attrgetter("kind")


def advise(facts: Facts) -> Diagnosis:
    """The whole answer: verdict, headline, blockers, what works, fixes, cross-check."""
    req = facts.request
    a = assess(req, facts)
    outcome = a.outcome
    trial = trial_for(facts.trials, req)
    verdict = decide(req, outcome, trial)
    infos = blocker_infos(outcome, a, facts)
    frees = frees_in(infos)
    disagreement = cross_check(req, outcome, trial, facts.table)
    fixes: list[Fix] = []
    if not verdict.bindable:
        hidden = OwnerView.OUTSIDE in map(_VIEW, infos)  # (enum members: == is "is")
        fixes = fixes_for(
            list(map(_KIND, infos)),
            port=req.port,
            proto=req.proto,
            frees_in_ms=frees,
            old_reuseaddr=old_reuseaddr(infos),
            pids=sorted({o.pid for b in infos for o in b.entry.owners}),
            can_destroy=facts.can_destroy,
            new_reuseaddr=req.reuseaddr,
            holder_hidden=hidden,
            addr=str(req.addr),
            containers=_containers(infos),
            reserved=facts.settings.ip_local_reserved_ports,
        )
    notes = list(outcome.notes)
    if facts.trial_skipped:
        notes.append(facts.trial_skipped)
    return Diagnosis(
        request=req,
        outcome=outcome,
        trial=trial,
        blockers=tuple(infos),
        attempts=attempts_for(req, a, facts),
        fixes=tuple(fixes),
        frees_in_ms=frees,
        verdict=verdict,
        headline=headline(req, verdict, outcome, trial, infos, frees),
        table=facts.table,
        settings=facts.settings,
        disagreement=disagreement,
        notes=tuple(notes),
    )
