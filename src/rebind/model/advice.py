"""`rebind why`, pure: from the gathered facts to one answer and its words.

Flow: request -> facts (kernel/facts.py: table, owners, flags with provenance, settings, safe
trial binds) -> :func:`advise` (this module) -> render (render/why.py). No I/O here, so every
sentence is unit-tested without root.

The kernel is ground truth for the bind() stage: when a trial bind ran, its answer is the
verdict, and a model disagreement is named with what could explain it. The model predicts the
listen() stage and every alternative (a trial in the port's bind bucket would change the bucket's
fast-reuse cache for every later bind; see conflict.probe_is_harmless).
"""

from __future__ import annotations

import enum
import errno as E
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from rebind.model.assess import HolderFacts as HolderFacts  # re-exported: its old home
from rebind.model.assess import Provenance as Provenance
from rebind.model.assess import judge
from rebind.model.conflict import (
    Alternative,
    Blocker,
    Flag,
    Holder,
    KernelSettings,
    Outcome,
    PortState,
    Rule,
    SockOpts,
    Stage,
    Verdict,
    alternatives,
    evaluate,
)
from rebind.model.containers import ContainerRef
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
from rebind.model.records import Proto, SocketEntry, SocketTable, State
from rebind.model.request import BindRequest, TrialResult
from rebind.model.sockstate import SockStates, Unavailable


class WhyVerdict(enum.StrEnum):
    """The answer, one word; ``Diagnosis.headline`` is the sentence."""

    FREE = "free"  # bind() works now (and listen(), when asked)
    LISTEN_FAILS = "listen-fails"  # bind() works, listen() fails with EADDRINUSE
    BUSY = "busy"  # EADDRINUSE: sockets hold the port
    CANNOT_BIND = "cannot-bind"  # no socket involved: EACCES, EADDRNOTAVAIL, EINVAL
    UNCERTAIN = "uncertain"  # depends on flags nobody could read, and no trial could decide

    @property
    def bindable(self) -> bool:
        return self is WhyVerdict.FREE


class OwnerView(enum.StrEnum):
    """How much of a socket's owners rebind could see."""

    SEEN = "seen"
    NONE_NEEDED = "none-needed"  # timewait mini-sockets have no owner
    NOT_SCANNED = "not-scanned"
    OUTSIDE = "outside-pid-namespace"  # root read every fd here: the holder is elsewhere
    UNKNOWN = "unknown"  # not root, or some processes could not be read


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything `why` knows, gathered by kernel/facts.py (or built by hand in tests)."""

    request: BindRequest
    holders: tuple[HolderFacts, ...]
    settings: KernelSettings
    table: SocketTable = field(default_factory=lambda: SocketTable(()))
    hints: Mapping[int, ProcessHint] = field(default_factory=dict)
    #: Trial binds that ran (only harmless ones: conflict.probe_is_harmless), keyed by request.
    trials: Mapping[BindRequest, TrialResult] = field(default_factory=dict)
    #: Why the as-asked trial did not run ("" when it ran, or trials were off).
    trial_skipped: str = ""
    #: The port's kernel state beside its sockets (bucket cache, UDP chain order); None = unknown.
    port: PortState | None = None
    can_destroy: bool = False
    #: Root read every process's fds (a socket without owners is held outside this PID namespace).
    owners_complete: bool = False
    #: What the BPF socket iterator read for the port, or why it could not (None: not asked).
    kernel: SockStates | Unavailable | None = None


@dataclass(frozen=True, slots=True)
class BlockerInfo:
    entry: SocketEntry
    blocker: Blocker
    kind: HolderKind
    opts: SockOpts
    provenance: Provenance
    owners: OwnerView = OwnerView.SEEN
    #: Blockers identical but for their remote end (TIME_WAITs of one server): how many share
    #: this one's group (the model judged one representative).
    group: int = 1

    @property
    def opts_source(self) -> str:
        return self.provenance.value


@dataclass(frozen=True, slots=True)
class Attempt:
    """One way to bind: the model's prediction, and the kernel's trial when one ran."""

    label: str
    request: BindRequest
    outcome: Outcome
    trial: TrialResult | None = None

    @property
    def works(self) -> bool:
        if self.trial is not None and not self.trial.ok:
            return False
        if self.trial is not None and self.outcome.stage is Stage.BIND:
            return True  # the kernel overrules a bind-stage prediction
        return self.outcome.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class Disagreement:
    text: str
    #: What could explain it (a documented limitation or kernel cache), or "" for a model bug.
    explanation: str = ""

    @property
    def is_bug(self) -> bool:
        return not self.explanation


@dataclass(frozen=True, slots=True)
class Assessment:
    """The observer-free answer (no trial bind): what the exporter and `why` build on."""

    request: BindRequest
    outcome: Outcome
    holders: tuple[HolderFacts, ...]
    groups: tuple[tuple[HolderFacts, ...], ...]

    @property
    def bindable(self) -> bool | None:
        if self.outcome.verdict is Verdict.DEPENDS:
            return None
        return self.outcome.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class Diagnosis:
    request: BindRequest
    outcome: Outcome
    #: The as-asked trial bind; None when it could not run harmlessly.
    trial: TrialResult | None
    blockers: tuple[BlockerInfo, ...]
    attempts: tuple[Attempt, ...]
    fixes: tuple[Fix, ...]
    frees_in_ms: int | None
    verdict: WhyVerdict
    headline: str
    table: SocketTable
    settings: KernelSettings
    disagreement: Disagreement | None = None
    notes: tuple[str, ...] = ()

    @property
    def bindable(self) -> bool:
        return self.verdict.bindable


# --------------------------------------------------------------------------------------------
# Grouping: the verdict needs one representative per rule, and the count for the rest.


def _group_key(h: HolderFacts) -> tuple[object, ...] | None:
    r = h.entry.socket
    if h.entry.owners or r.proto is Proto.UDP:
        return None  # owned sockets are named one by one; UDP order matters (chain order)
    # Plain values, not the frozen dataclasses: hashing 10k Endpoint/SockOpts costs more than
    # the whole model run (why 9000 on the benchmark load).
    o = h.opts
    return (
        r.proto,
        r.state,
        r.is_mini,
        int(r.local.addr),
        r.local.port,
        r.v6only,
        r.uid,
        r.ifindex,
        o.reuseaddr,
        o.reuseport,
        o.v6only,
        h.provenance,
    )


def group_holders(holders: Iterable[HolderFacts]) -> tuple[tuple[HolderFacts, ...], ...]:
    """Identical ownerless leftovers (same local end, state and flags) in one group, in order."""
    groups: dict[object, list[HolderFacts]] = {}
    for i, h in enumerate(holders):
        key = _group_key(h)
        groups.setdefault(key if key is not None else ("single", i), []).append(h)
    return tuple(tuple(g) for g in groups.values())


def _with_opts(group: tuple[HolderFacts, ...], opts: SockOpts, prov: Provenance) -> tuple[HolderFacts, ...]:
    return tuple(HolderFacts(h.entry, opts, prov) for h in group)  # not replace(): 10k of them


# --------------------------------------------------------------------------------------------
# Flags from the kernel's answers.

#: Trials that say something about the holders (other errors fail before any conflict check).
_INFORMATIVE = (None, E.EADDRINUSE)
#: Enumerating assignments is exponential; past this many unknown groups nothing is inferred.
_MAX_UNKNOWN_GROUPS = 3


def infer_from_trials(
    groups: tuple[tuple[HolderFacts, ...], ...],
    settings: KernelSettings,
    trials: Mapping[BindRequest, TrialResult],
) -> tuple[tuple[HolderFacts, ...], ...]:
    """Fill unknown SO_REUSEADDR/SO_REUSEPORT with the only values every trial agrees with.

    Ownerless leftovers (TIME_WAIT, orphaned FIN_WAIT2) keep the flags of the socket that closed
    and nothing exposes them -- except the kernel's answers to binds. TCP and UDP alike. A failed
    trial says "at least one blocks", so it is used only when each unknown group is one socket.
    """
    unknown = [i for i, g in enumerate(groups) if _unknown_flags(g[0].opts)]
    if not unknown or len(unknown) > _MAX_UNKNOWN_GROUPS:
        return groups
    useful = {r: t for r, t in trials.items() if (t.errno if not t.ok else None) in _INFORMATIVE}
    if not useful:
        return groups
    choices = [_opts_choices(groups[i][0].opts) for i in unknown]
    consistent = []
    for assignment in itertools.product(*choices):
        reps = [g[0].holder for g in groups]
        for i, opts in zip(unknown, assignment, strict=True):
            reps[i] = Holder(reps[i].socket, opts)
        if all(_consistent(req, t, reps, settings, groups, unknown) for req, t in useful.items()):
            consistent.append(assignment)
    if not consistent:
        return groups  # the kernel contradicts every assignment: a cache effect, not the flags
    out = list(groups)
    for k, i in enumerate(unknown):
        values = {a[k] for a in consistent}
        if len(values) == 1:
            opts = values.pop()
            if opts != groups[i][0].opts:
                out[i] = _with_opts(groups[i], opts, Provenance.INFERRED_TRIAL)
        else:
            ra = {a[k].reuseaddr for a in consistent}
            rp = {a[k].reuseport for a in consistent}
            base = groups[i][0].opts
            opts = SockOpts(
                ra.pop() if len(ra) == 1 else base.reuseaddr,
                rp.pop() if len(rp) == 1 else base.reuseport,
                base.v6only,
            )
            if opts != base:
                out[i] = _with_opts(groups[i], opts, Provenance.INFERRED_TRIAL)
    return tuple(out)


def _unknown_flags(o: SockOpts) -> bool:
    return o.reuseaddr is None or o.reuseport is None


def _opts_choices(o: SockOpts) -> list[SockOpts]:
    ra = (o.reuseaddr,) if o.reuseaddr is not None else (False, True)
    rp = (o.reuseport,) if o.reuseport is not None else (False, True)
    return [SockOpts(a, p, o.v6only) for a in ra for p in rp]


def _consistent(
    req: BindRequest,
    trial: TrialResult,
    reps: list[Holder],
    settings: KernelSettings,
    groups: tuple[tuple[HolderFacts, ...], ...],
    unknown: list[int],
) -> bool:
    predicted = evaluate(replace(req, listen=False), reps, settings).verdict
    if predicted is Verdict.DEPENDS:
        return True
    if not trial.ok and any(len(groups[i]) > 1 for i in unknown):
        return True  # "at least one of the group blocks" cannot pin the group's flags
    return (predicted is Verdict.OK) == trial.ok


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
    holders = tuple(h for g in groups for h in g)
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
    listener = any(h.entry.socket.state is State.LISTEN for h in a.holders)
    out: list[BlockerInfo] = []
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
            has = bool(h.entry.owners)
            if has not in views:  # group members agree on everything but owners and peers
                views[has] = _owner_view(h.entry, facts)
            out.append(BlockerInfo(h.entry, b, kind, h.opts, h.provenance, views[has], n))
    return out


def frees_in(infos: Iterable[BlockerInfo]) -> int | None:
    """When the last blocker goes away by itself; None if any blocker has no timer."""
    latest: int | None = None
    seen: set[int] = set()
    for b in infos:
        if id(b.blocker) not in seen:  # the kind is per group: one check per group
            seen.add(id(b.blocker))
            if b.kind not in _TIMED:
                return None
        ms = b.entry.socket.expires_ms
        if ms is None:
            return None
        latest = ms if latest is None else max(latest, ms)
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
        hidden = any(b.owners is OwnerView.OUTSIDE for b in infos)
        fixes = fixes_for(
            [b.kind for b in infos],
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


# --------------------------------------------------------------------------------------------
# The headline: one sentence that always agrees with the verdict (and so the exit code).


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
