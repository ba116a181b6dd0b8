"""TCP: inet_csk_get_port() for an explicit port. Per holder ``inet_bind_conflict`` (the
SO_REUSEADDR and SO_REUSEPORT exemptions, bind-rules.md §1.3-1.4) over the sockets the bhash2
search reaches (``addresses.relevant``), unless the bucket's fast path skips the check."""

from __future__ import annotations

from collections.abc import Sequence

from rebind.model.conflict.addresses import relevant
from rebind.model.conflict.bucket import fast_path
from rebind.model.conflict.inputs import BucketState, Holder, KernelSettings, is_timewait
from rebind.model.conflict.outcome import Blocker, Check, Flag, Rule, Stage, Verdict
from rebind.model.conflict.unknowns import Facts, blocker, fact_choices, unsure
from rebind.model.conflict.words import describe_all
from rebind.model.records import SocketRecord, State
from rebind.model.request import BindRequest


def _pair(req: BindRequest, e: SocketRecord, f: Facts) -> Rule | None:
    """inet_bind_conflict(relax=true, reuseport_ok=true) for one holder; None = no conflict."""
    listening = e.state is State.LISTEN
    if req.reuseaddr and f.reuseaddr and not listening:
        return None
    # sk_reuseport on both, and sk2 in TIME_WAIT or uid_eq(uid, sk_uid(sk2)).
    if req.reuseport and f.reuseport and (is_timewait(e) or f.same_uid):
        return None
    if req.reuseport and f.reuseport:
        return Rule.REUSEPORT_OTHER_UID
    if listening:
        if f.reuseport and f.same_uid and not req.reuseport:
            return Rule.REUSEPORT_MISSING_NEW
        return Rule.LISTENER_NEVER_YIELDS if req.reuseaddr else Rule.PLAIN_OVERLAP
    if req.reuseaddr and not f.reuseaddr:
        return Rule.REUSEADDR_MISSING_OLD
    if f.reuseaddr and not req.reuseaddr:
        return Rule.REUSEADDR_MISSING_NEW
    if f.reuseport and (f.same_uid or is_timewait(e)) and not req.reuseport:
        return Rule.REUSEPORT_MISSING_NEW
    if req.reuseport and not f.reuseport:
        return Rule.REUSEPORT_MISSING_OLD
    return Rule.PLAIN_OVERLAP


def _judge(req: BindRequest, h: Holder, stage: Stage, sure: bool) -> Blocker | None:
    """Blocker if h conflicts for at least one assignment of its unknown facts."""
    results = [_pair(req, h.socket, f) for f, _ in fact_choices(req, h)]
    rules = [r for r in results if r is not None]
    if not rules:
        return None
    certain = len(rules) == len(results) and sure
    return blocker(
        req, h, stage, rules[0], certain=certain, sure=sure, act=lambda f: _pair(req, h.socket, f) is None
    )


def check(
    req: BindRequest,
    holders: Sequence[Holder],
    settings: KernelSettings,
    bucket: BucketState | None,
    stage: Stage,
) -> Check:
    """inet_csk_get_port() for an explicit port."""
    on_port = [h for h in holders if h.socket.proto is req.proto and h.socket.local.port == req.port]
    # A specific address: the address-any buckets (inet_bhash2_addr_any_conflict), then its own
    # bucket (inet_bhash2_conflict); a wildcard: every socket on the port (relevant decides).
    blockers = [b for h, s in relevant(req, on_port, settings) if (b := _judge(req, h, stage, s)) is not None]
    fast = fast_path(bucket, req, stage, settings) if on_port else False
    if fast:
        # check_bind_conflict = false: neither inet_bhash2_addr_any_conflict nor
        # inet_csk_bind_conflict runs; the bind succeeds whatever the other sockets are.
        notes = (
            (
                "the port's SO_REUSEPORT fast path (tb->fastreuseport: same uid and address as the "
                "last SO_REUSEPORT binder) skips the conflict check that "
                + describe_all(b.holder for b in blockers)
                + " would fail",
            )
            if blockers
            else ()
        )
        return Check(Verdict.OK, (), notes)
    if fast is None and blockers:
        note = (
            "the port's SO_REUSEPORT cache (tb->fastreuseport, tb->fastuid, tb->fast_rcv_saddr) "
            "is unknown: it keeps the uid and address of the last SO_REUSEPORT bind on the port, "
            "also after that socket cleared the flag or closed, and a bind that matches it skips "
            "the conflict check (sk_reuseport_match)"
        )
        return Check(Verdict.DEPENDS, tuple(unsure(req, b, Flag.BUCKET) for b in blockers), (note,))
    if any(b.certain for b in blockers):
        return Check(Verdict.FAIL, tuple(sorted(blockers, key=lambda b: not b.certain)))
    return Check(Verdict.DEPENDS if blockers else Verdict.OK, tuple(blockers))
