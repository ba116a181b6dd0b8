"""Facts nobody could read: a holder's SO_REUSEADDR, SO_REUSEPORT or uid may be unknown. The
rules run once per assignment of the unknown ones; a holder blocks *certainly* when every
assignment conflicts, and the facts whose value flips the answer are named (``decided_by``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from itertools import product

from rebind.model.conflict.inputs import Holder
from rebind.model.conflict.outcome import Blocker, Flag, Rule, Stage
from rebind.model.conflict.words import reason
from rebind.model.request import BindRequest


@dataclass(frozen=True, slots=True)
class Facts:
    """One concrete assignment of a holder's possibly-unknown facts."""

    reuseaddr: bool
    reuseport: bool
    same_uid: bool


#: What a protocol's rule does with one assignment (TCP: blocks or not; UDP: skip/share/conflict).
Act = Callable[[Facts], Hashable]

_FACT_FLAGS = (Flag.REUSEADDR, Flag.REUSEPORT, Flag.UID)


def _both(known: bool | None) -> tuple[bool, ...]:
    return (known,) if known is not None else (False, True)


def fact_choices(req: BindRequest, h: Holder) -> list[tuple[Facts, tuple[Flag, ...]]]:
    """Every assignment of the unknown facts, and which facts were unknown."""
    e = h.socket
    same_uid = e.uid == req.uid if e.uid is not None or e.is_mini else None
    ra, rp, uid = _both(h.opts.reuseaddr), _both(h.opts.reuseport), _both(same_uid)
    unknown = tuple(f for f, vs in zip(_FACT_FLAGS, (ra, rp, uid), strict=True) if len(vs) == 2)
    return [(Facts(a, p, u), unknown) for a, p, u in product(ra, rp, uid)]


def _flip(f: Facts, flag: Flag) -> Facts:
    if flag is Flag.REUSEADDR:
        return replace(f, reuseaddr=not f.reuseaddr)
    if flag is Flag.REUSEPORT:
        return replace(f, reuseport=not f.reuseport)
    return replace(f, same_uid=not f.same_uid)


def deciding(req: BindRequest, h: Holder, act: Act) -> tuple[Flag, ...]:
    """The unknown facts whose value changes what the rule does with this holder."""
    choices = fact_choices(req, h)
    unknown = choices[0][1]
    return tuple(
        flag
        for flag in _FACT_FLAGS
        if flag in unknown and any(act(f) != act(_flip(f, flag)) for f, _ in choices)
    )


def blocker(
    req: BindRequest, h: Holder, stage: Stage, rule: Rule, *, certain: bool, sure: bool, act: Act
) -> Blocker:
    """The holder as a blocker; uncertain ones name what decides (``sure`` False: its v6only,
    which decides whether the kernel compares it at all)."""
    decided_by = () if certain else deciding(req, h, act) + (() if sure else (Flag.V6ONLY,))
    return Blocker(h, stage, rule, certain, reason(req, h, rule, decided_by), decided_by)


def unsure(req: BindRequest, b: Blocker, *flags: Flag) -> Blocker:
    """The blocker made uncertain by facts of the port or the kernel build (``flags``)."""
    decided_by = b.decided_by + tuple(f for f in flags if f not in b.decided_by)
    return replace(b, certain=False, decided_by=decided_by, reason=reason(req, b.holder, b.rule, decided_by))
