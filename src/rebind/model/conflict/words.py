"""The conflict model's words: how a holder is described, why it blocks (one sentence per kernel
rule), and what an unknown fact would change. `why`, `free` and the exporter print these."""

from __future__ import annotations

from collections.abc import Iterable

from rebind.model.conflict.inputs import Holder, is_timewait
from rebind.model.conflict.outcome import Blocker, Flag, Rule
from rebind.model.records import Proto, SocketRecord, State
from rebind.model.request import BindRequest


def describe(e: SocketRecord) -> str:
    remote = "" if e.remote.port == 0 else f" -> {e.remote}"
    if e.is_mini and e.state is State.FIN_WAIT2:
        what = "orphaned FIN_WAIT2 (handled as TIME_WAIT)"
    elif e.state is State.BOUND_INACTIVE:
        what = "bound, not listening,"
    elif e.proto is Proto.UDP:
        what = "UDP socket"
    else:
        what = e.state.label
    return f"{what} {e.local}{remote}"


def describe_all(holders: Iterable[Holder]) -> str:
    return ", ".join(describe(h.socket) for h in holders)


def _flag_word(v: bool | None, name: str) -> str:
    return f"{name} unknown" if v is None else (f"with {name}" if v else f"without {name}")


_RULE_TEXT = {
    Rule.LISTENER_NEVER_YIELDS: "a listening socket never yields to SO_REUSEADDR; only SO_REUSEPORT on "
    "both sockets (same user) shares a listener",
    Rule.REUSEADDR_MISSING_OLD: "SO_REUSEADDR on your side cannot help: both sockets need it",
    Rule.REUSEADDR_MISSING_NEW: "it has SO_REUSEADDR but your socket does not; "
    "set SO_REUSEADDR before bind()",
    Rule.REUSEPORT_MISSING_NEW: "it has SO_REUSEPORT (same user); set SO_REUSEPORT before bind() to share",
    Rule.REUSEPORT_MISSING_OLD: "SO_REUSEPORT on your side cannot help: it does not have SO_REUSEPORT",
    Rule.PLAIN_OVERLAP: "its address overlaps yours and neither SO_REUSEADDR (both sides, not listening) "
    "nor SO_REUSEPORT (both sides, same user) applies",
    Rule.UDP_OVERLAP: "UDP sockets share a port only if both set SO_REUSEADDR, or both set SO_REUSEPORT "
    "as the same user",
}

#: Facts of the port or the kernel build (not of the holder) that an answer may hinge on; each
#: has its own note (tcp.py, udp.py), so the holder's own sentence only names them.
_GLOBAL_FLAGS = {
    Flag.BUCKET: "port's SO_REUSEPORT cache lets the bind skip this check (unknown: no BPF iterator)",
    Flag.UDP_RULE: "kernel build stops at an earlier same-uid SO_REUSEPORT socket (its UDP rule is "
    "not calibrated here)",
    Flag.CHAIN_ORDER: "UDP hash chain puts a same-uid SO_REUSEPORT socket before it (chain order unknown)",
}


def _own(decided_by: Iterable[Flag]) -> str:
    """The holder's own unknown facts among ``decided_by``, joined ("" when none)."""
    return " and ".join(str(f) for f in decided_by if f not in _GLOBAL_FLAGS)


def reason(req: BindRequest, h: Holder, rule: Rule, decided_by: tuple[Flag, ...]) -> str:
    """One sentence: the holder, its SO_REUSEADDR, the rule that makes it block, the unknowns."""
    e = h.socket
    if is_timewait(e):
        head = f"{describe(e)} left by a socket {_flag_word(h.opts.reuseaddr, 'SO_REUSEADDR')}"
    else:
        head = f"{describe(e)} ({_flag_word(h.opts.reuseaddr, 'SO_REUSEADDR')})"
    if rule is Rule.REUSEPORT_OTHER_UID:
        who = "an unknown user" if e.uid is None else f"uid {e.uid}"
        text = f"SO_REUSEPORT is shared only within one user: it belongs to {who}, yours to uid {req.uid}"
    else:
        text = _RULE_TEXT.get(rule, str(rule))
    if own := _own(decided_by):
        text += f" — unless its {own} is what sharing needs; nobody could read it"
    others = [_GLOBAL_FLAGS[f] for f in decided_by if f in _GLOBAL_FLAGS]
    if others:
        text += " — unless the " + " or the ".join(others)
    return f"{head}; {text}"


def unknown_notes(blockers: Iterable[Blocker]) -> list[str]:
    """One note per blocker whose own unknown facts decide (the port's have their own note)."""
    return [
        f"depends on the {own} of {describe(b.holder.socket)}: EADDRINUSE if it blocks, ok if not"
        for b in blockers
        if (own := _own(b.decided_by))
    ]


def race_note(h: Holder) -> str:
    """A bound-inactive SO_REUSEADDR peer: whoever calls listen() first wins (C3, D7)."""
    return (
        f"{describe(h.socket)} shares the port through SO_REUSEADDR: whichever calls listen() first "
        "wins, the other's listen() fails with EADDRINUSE (inet_csk_listen_start checks again)"
    )
