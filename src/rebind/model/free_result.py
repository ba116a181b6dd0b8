"""What carrying out a `rebind free` plan did, and what still holds the port. Pure.

``actions/free.py`` fills a :class:`FreeResult` in (each process's :class:`Fate` comes from the
escalation, ``model/free_escalation.py``); :func:`explain_remaining` says, for every socket that
still blocks the bind after acting, why it is still there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rebind.errors import ExitCode
from rebind.model.advice import Diagnosis
from rebind.model.diagnosis import fmt_seconds
from rebind.model.free import FreePlan, HostFacts, Refused, Target, is_socket_blocker, no_owner_reason
from rebind.model.records import Owner, SocketRecord, State, owner_label, socket_label
from rebind.textsafe import visible


class Fate(enum.StrEnum):
    EXITED = "exited"  # after the first signal
    KILLED = "killed"  # after SIGKILL (escalation)
    SURVIVED = "survived"  # still alive after SIGKILL (uninterruptible sleep?)
    GONE = "gone"  # had exited before it was signalled
    REUSED = "reused"  # the pid now names another process: not signalled
    DENIED = "denied"  # the kernel refused the signal (EPERM)
    RELEASED = "released"  # no longer held a blocking socket when its turn came: not signalled
    UNVERIFIED = "unverified"  # its fds could not be read to confirm it still holds one: not signalled


@dataclass(frozen=True, slots=True)
class ProcessOutcome:
    target: Target
    fate: Fate
    signals: tuple[str, ...] = ()
    #: Seconds from the first signal until the process was seen gone.
    seconds: float | None = None


class SocketFate(enum.StrEnum):
    DESTROYED = "destroyed"
    GONE = "gone"  # already gone when we asked (ENOENT)
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SocketOutcome:
    socket: SocketRecord
    fate: SocketFate
    error: str = ""


@dataclass(frozen=True, slots=True)
class FreeResult:
    plan: FreePlan
    processes: tuple[ProcessOutcome, ...]
    sockets: tuple[SocketOutcome, ...]
    #: The diagnosis after acting: ``after.trial`` is the verifying trial bind.
    after: Diagnosis
    #: One line per thing that still holds the port (empty when it is bindable); process names
    #: in them are escaped (rebind.textsafe.visible).
    remaining: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.after.bindable

    @property
    def exit_code(self) -> int:
        """0 bindable now; the plan's obstacle status; 3 if a signal was not permitted; else 1."""
        if self.ok:
            return 0
        if self.plan.obstacles:
            return self.plan.exit_code
        if any(p.fate is Fate.DENIED for p in self.processes):
            return int(ExitCode.ENVIRONMENT)
        return int(ExitCode.NO_MATCH)


def explain_remaining(result: FreeResult, facts: HostFacts) -> tuple[str, ...]:
    """One line per socket that still blocks the bind, saying why it is still there."""
    after = result.after
    if after.bindable:
        return ()
    refused = {r.pid: r for r in result.plan.refused}
    fates = {o.target.pid: o for o in result.processes}
    failed = {s.socket.key: s.error for s in result.sockets if s.fate is SocketFate.FAILED}
    lines: list[str] = []
    for b in after.blockers:
        r = b.entry.socket
        what = socket_label(r)
        if not is_socket_blocker(b):
            lines.append(f"{b.blocker.reason} (no socket involved)")
        elif not r.inode:
            lines.append(f"{what}: {_orphan_note(r, failed.get(r.key), facts)}")
        elif not b.entry.owners:
            lines.append(f"{what}: {no_owner_reason(after.table.scan, facts.euid)}")
        else:
            idle = _IDLE_NOTE if r.state is State.BOUND_INACTIVE else ""
            lines.extend(f"{what}: {_owner_note(o, refused, fates)}{idle}" for o in b.entry.owners)
    if not after.blockers:
        lines.append(f"{after.trial}, but no socket that blocks it is visible")
    return tuple(visible(line) for line in lines)


def _orphan_note(r: SocketRecord, error: str | None, facts: HostFacts) -> str:
    if r.is_mini and r.expires_ms is not None:
        left = f"frees by itself in {fmt_seconds(r.expires_ms)}"
    else:
        left = "frees when the kernel gives up on the connection"
    why = error or facts.destroy_blocked(r) or "appeared after the last SOCK_DESTROY pass"
    return f"{why}; {left}"


_IDLE_NOTE = (
    " (bound but not listening: a listener stopped by SOCK_DESTROY or shutdown() keeps an "
    "explicitly bound port until every fd to it is closed)"
)


def _owner_note(o: Owner, refused: dict[int, Refused], fates: dict[int, ProcessOutcome]) -> str:
    who = f"{owner_label(o)} fd {o.fd}"
    if o.pid in refused:
        return f"held by {who}, left alone: {refused[o.pid].reason}"
    outcome = fates.get(o.pid)
    if outcome is not None and outcome.fate in (Fate.SURVIVED, Fate.DENIED):
        return f"held by {who}, which {outcome.fate.value} ({' then '.join(outcome.signals) or 'no signal'})"
    if outcome is not None and outcome.fate is Fate.UNVERIFIED:
        return f"held by {who}, not signalled: its fds could not be read to confirm it still held the socket"
    return (
        f"held by {who}, which was not in the plan (started or forked after planning, or it "
        "inherited the fd); run `rebind free` again"
    )
