"""Before the model runs: identical ownerless leftovers grouped (one representative each: `why`
scales with the table, not with ten thousand TIME_WAITs), and the flags nobody could read filled
in from the kernel's answers to the trial binds, where every trial agrees on one value."""

from __future__ import annotations

import errno as E
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import replace

from rebind.model.assess import HolderFacts, Provenance
from rebind.model.conflict import Holder, KernelSettings, SockOpts, Verdict, evaluate
from rebind.model.records import Proto
from rebind.model.request import BindRequest, TrialResult


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
    """Identical ownerless leftovers (same local end, state and flags) in one group, in order.

    Holders alike share their local Endpoint and SockOpts objects (the decoders and gatherers
    make one per SockCommon): each distinct (local end object, flags object, and the plain
    fields of the key) finds its group once by _group_key, then by those objects' identity
    (kept alive by ``holders`` meanwhile) -- ten thousand TIME_WAITs of one server, one
    _group_key."""
    groups: dict[object, list[HolderFacts]] = {}
    by_identity: dict[tuple[object, ...], list[HolderFacts]] = {}
    udp = Proto.UDP
    for i, h in enumerate(holders):
        e = h.entry
        r = e.socket
        if e.owners or r.proto is udp:
            groups[("single", i)] = [h]
            continue
        # what _group_key reads, by identity where it reads into an object
        same = (id(r.local), id(h.opts), r.proto, r.state, r.timer, r.v6only, r.uid, r.ifindex, h.provenance)
        group = by_identity.get(same)
        if group is None:
            key = _group_key(h)
            group = groups.get(key)
            if group is None:
                group = groups[key] = []
            by_identity[same] = group
        group.append(h)
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
