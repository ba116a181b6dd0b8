"""UDP: udp_lib_get_port() -> udp_lib_lport_inuse() (bind-rules.md §2). Both SO_REUSEADDR, or
both SO_REUSEPORT as the same uid, share the port. Upstream returns at the first same-uid
SO_REUSEPORT socket in the port's hash-chain order; some builds check every socket
(``KernelSettings.udp_first_match``, calibrated per build by kernel/calibrate.py)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rebind.model.conflict.addresses import relevant
from rebind.model.conflict.inputs import Holder, KernelSettings
from rebind.model.conflict.outcome import Check, Flag, Rule, Stage, Verdict
from rebind.model.conflict.unknowns import Facts, blocker, fact_choices, unsure
from rebind.model.conflict.words import describe, describe_all
from rebind.model.records import Family
from rebind.model.request import BindRequest


class _Act(enum.Enum):
    SKIP = 0  # not relevant: udp_lib_lport_inuse goes on to the next socket
    SHARE = 1  # same-uid SO_REUSEPORT: it returns 0 (free) at once
    CONFLICT = 2


def _pair(req: BindRequest, f: Facts) -> tuple[_Act, Rule | None]:
    """udp_lib_lport_inuse() for one overlapping holder (devices and addresses already match)."""
    if req.reuseaddr and f.reuseaddr:
        return _Act.SKIP, None
    if req.reuseport and f.reuseport and f.same_uid:
        return _Act.SHARE, None
    if req.reuseport and f.reuseport:
        return _Act.CONFLICT, Rule.REUSEPORT_OTHER_UID
    if req.reuseaddr and not f.reuseaddr:
        return _Act.CONFLICT, Rule.REUSEADDR_MISSING_OLD
    if f.reuseaddr and not req.reuseaddr:
        return _Act.CONFLICT, Rule.REUSEADDR_MISSING_NEW
    if f.reuseport and f.same_uid and not req.reuseport:
        return _Act.CONFLICT, Rule.REUSEPORT_MISSING_NEW
    return _Act.CONFLICT, Rule.UDP_OVERLAP


@dataclass(frozen=True, slots=True)
class _Holder:
    """One UDP holder with the acts (and rules) it answers a bind with."""

    holder: Holder
    sure: bool  # False: its v6only is unknown and decides whether it is checked at all
    pairs: tuple[tuple[_Act, Rule | None], ...]
    acts: frozenset[_Act]


def _first_match_in_order(hs: Sequence[_Holder]) -> tuple[set[Verdict], list[_Holder]]:
    """Upstream udp_lib_lport_inuse() in chain order: the first relevant socket decides."""
    endings: set[Verdict] = set()
    met: list[_Holder] = []
    for u in hs:
        met.append(u)
        if _Act.CONFLICT in u.acts:
            endings.add(Verdict.FAIL)
        if _Act.SHARE in u.acts:
            endings.add(Verdict.OK)
        if _Act.SKIP not in u.acts:
            return endings, met
    endings.add(Verdict.OK)
    return endings, met


def _unordered(hs: Sequence[_Holder], *, early_stop: bool) -> set[Verdict]:
    """The endings when the order does not matter or is unknown. ``early_stop``: upstream's
    rule with the chain order unknown (any holder may come first, a same-uid SO_REUSEPORT one
    lets the bind through); else builds without the early stop, where a same-uid SO_REUSEPORT
    match does not end the scan, so any conflicting socket anywhere in the chain refuses the
    bind (calibrated on 6.18.44-fc)."""
    endings: set[Verdict] = set()
    if any(_Act.CONFLICT in u.acts for u in hs):
        endings.add(Verdict.FAIL)
    if (early_stop and any(_Act.SHARE in u.acts for u in hs)) or all(u.acts - {_Act.CONFLICT} for u in hs):
        endings.add(Verdict.OK)
    return endings


def check(req: BindRequest, holders: Sequence[Holder], settings: KernelSettings, chain_order: bool) -> Check:
    """udp_lib_get_port() -> udp_lib_lport_inuse(), under the rule this kernel build has.

    Each holder has a set of possible actions over its unknown facts; the reachable endings (ok /
    EADDRINUSE) over the possible rules (``settings.udp_first_match``) and chain orders
    (``chain_order``: the holders are given in it) give the verdict.
    """
    hs: list[_Holder] = []
    for h, sure in relevant(req, holders, settings):
        pairs = tuple(_pair(req, f) for f, _ in fact_choices(req, h))
        acts = frozenset({a for a, _ in pairs} | (set() if sure else {_Act.SKIP}))
        hs.append(_Holder(h, sure, pairs, acts))
    in_order, met = _first_match_in_order(hs)
    first = in_order if chain_order else _unordered(hs, early_stop=True)
    every = _unordered(hs, early_stop=False)
    rule = settings.udp_first_match
    endings = first if rule is True else every if rule is False else first | every
    flags: list[Flag] = []
    if rule is None and first != every:
        flags.append(Flag.UDP_RULE)
    if rule is not False and not chain_order and first != in_order:
        flags.append(Flag.CHAIN_ORDER)
    # Who can refuse the bind: everyone checked under some possible rule and order.
    checked = hs if rule is False or not chain_order else (hs if rule is None else met)
    blockers = [
        blocker(
            req,
            u.holder,
            Stage.BIND,
            next(r for _, r in u.pairs if r is not None),
            certain=u.acts == {_Act.CONFLICT},
            sure=u.sure,
            act=lambda f: _pair(req, f)[0],
        )
        for u in checked
        if _Act.CONFLICT in u.acts
    ]
    notes = _notes(
        flags,
        sharer=next((u.holder for u in met if _Act.SHARE in u.acts), None),
        missed=[u.holder for u in hs[len(met) :] if _Act.CONFLICT in u.acts],
        only_ok=rule is True and chain_order and endings == {Verdict.OK},
    )
    if endings == {Verdict.OK}:
        return Check(Verdict.OK, (), notes)
    if endings == {Verdict.FAIL}:
        return Check(Verdict.FAIL, tuple(sorted(blockers, key=lambda b: not b.certain)), notes)
    return Check(Verdict.DEPENDS, tuple(unsure(req, b, *flags) for b in blockers), notes)


def _notes(
    flags: list[Flag], *, sharer: Holder | None, missed: list[Holder], only_ok: bool
) -> tuple[str, ...]:
    notes: list[str] = []
    if only_ok and sharer is not None and missed:
        notes.append(
            "udp_lib_lport_inuse() stops at the first same-uid SO_REUSEPORT socket ("
            + describe(sharer.socket)
            + "), so the older "
            + describe_all(missed)
            + " is never checked"
        )
    if Flag.UDP_RULE in flags:
        notes.append(
            "kernel builds differ here: upstream udp_lib_lport_inuse() stops at the first same-uid "
            "SO_REUSEPORT socket (ok), some builds check every socket (EADDRINUSE); rebind could not "
            "calibrate this one (it needs a private network namespace: run as root once)"
        )
    if Flag.CHAIN_ORDER in flags:
        notes.append(
            "udp_lib_lport_inuse() stops at the first same-uid SO_REUSEPORT socket in the port's "
            "hash chain, and the chain's order is unknown (only the BPF socket iterator reads it)"
        )
    return tuple(notes)


def udp_chain_order(holders_oldest_first: Iterable[Holder]) -> list[Holder]:
    """UDP holders in primary hash-chain order, from the order they were bound.

    udp_lib_get_port() adds a socket at the head of the port's chain (sk_add_node_rcu), except
    an IPv6 SO_REUSEPORT socket, which goes to the tail (sk_add_node_tail_rcu) so that v4 and
    v6 reuseport groups stay ordered. An unknown reuseport flag is treated as unset.
    """
    chain: list[Holder] = []
    for h in holders_oldest_first:
        if h.socket.family is Family.INET6 and h.opts.reuseport:
            chain.append(h)
        else:
            chain.insert(0, h)
    return chain
