"""Events of `rebind top` (ports appearing/disappearing, owners changing), their JSON-lines
record format (``rebind.top.event/1``, docs/top.md) and `rebind history`. Pure.

A port *appears* when a socket starts holding it for a server (LISTEN, bound-but-not-listening,
bound UDP) and *disappears* when none does any more. Owners are the processes holding those
sockets, identified by pid and start time (a recycled pid is another owner).
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rebind.model.records import Proto, process_label
from rebind.textsafe import visible
from rebind.top.model import HOLDING_STATES, OwnerView, PortKey, PortView

SCHEMA = "rebind.top.event/1"


class EventKind(enum.StrEnum):
    APPEARED = "appeared"
    GONE = "gone"
    OWNER_ADDED = "owner-added"
    OWNER_REMOVED = "owner-removed"


@dataclass(frozen=True, slots=True)
class Binder:
    """Who bound a port's holding socket, and when: its birth certificate (`rebind trace
    --install`), kept in the record because the binder may be gone (or never seen by an owner
    scan) by the time someone reads `rebind history`. ``comm`` is the binder's own choice."""

    pid: int
    comm: str
    at: float

    @property
    def label(self) -> str:
        return process_label(self.comm, self.pid)


@dataclass(frozen=True, slots=True)
class Event:
    ts: float
    kind: EventKind
    key: PortKey
    owner: OwnerView | None = None
    #: States of the holding sockets (``LISTEN``, ``BOUND_INACTIVE``, ``UNCONN``), for context.
    states: tuple[str, ...] = ()
    #: Seen at the first sample (already there when top started), not a change.
    initial: bool = False
    #: Owner events of this port left out of the record just before this one (rate limit,
    #: :class:`OwnerEventRate`); 0 on screen and in records without a gap.
    suppressed: int = 0
    #: ``appeared``: who bound the holding socket, where a birth certificate names it.
    binder: Binder | None = None


def _states(v: PortView | None) -> tuple[str, ...]:
    if v is None:
        return ()
    return tuple(sorted({r.state.label for r in v.rows if r.state in HOLDING_STATES}))


def _binder(v: PortView) -> Binder | None:
    """The first holding socket's certificate (rows come in the sampler's order)."""
    for r in v.rows:
        if r.state in HOLDING_STATES and r.birth is not None:
            return Binder(r.birth.pid, r.birth.comm, r.birth.at)
    return None


def diff(prev: Mapping[PortKey, PortView] | None, cur: Mapping[PortKey, PortView], ts: float) -> list[Event]:
    """Events between two samples; ``prev=None`` (first sample) reports what is there as initial."""
    initial = prev is None
    before = {k: v for k, v in (prev or {}).items() if v.held}
    after = {k: v for k, v in cur.items() if v.held}
    out: list[Event] = []
    for k in sorted(set(before) | set(after)):
        old, new = before.get(k), after.get(k)
        old_owners = {o.identity: o for o in old.owners} if old else {}
        new_owners = {o.identity: o for o in new.owners} if new else {}
        if new is not None and old is None:
            out.append(
                Event(ts, EventKind.APPEARED, k, states=_states(new), initial=initial, binder=_binder(new))
            )
        for ident in sorted(set(new_owners) - set(old_owners), key=_order):
            out.append(Event(ts, EventKind.OWNER_ADDED, k, new_owners[ident], _states(new), initial))
        for ident in sorted(set(old_owners) - set(new_owners), key=_order):
            out.append(Event(ts, EventKind.OWNER_REMOVED, k, old_owners[ident], _states(new or old)))
        if old is not None and new is None:
            out.append(Event(ts, EventKind.GONE, k, states=_states(old)))
    return out


def _order(ident: tuple[int, int | None]) -> tuple[int, int]:
    return (ident[0], ident[1] or 0)


# ---------------------------------------------------------------------------------------------
# What a record may cost (audit 2026-12-05 M3: a user restarting a listener whose argv was
# thirteen 120 KB arguments made root's record grow 3.8 MB/s)

#: Per owner: at most this many command-line arguments, and this many bytes of them as stored
#: (JSON with ensure_ascii: a non-ASCII character costs 6 or 12 bytes, so the cap is on what is
#: written, not on characters). An owner cut short is recorded with ``"truncated": true``.
MAX_CMDLINE_ARGS = 32
MAX_CMDLINE_BYTES = 4096
#: Name, user, unit, container: bytes as stored, each.
MAX_FIELD_BYTES = 256
#: The longest line `rebind history` reads. A capped record line stays under ~6 KiB; the margin
#: lets history read records written before the caps, while one line of /dev/zero-like input
#: cannot take more memory than this.
MAX_LINE_BYTES = 1 << 20


def _json_cost(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string written with ensure_ascii (quotes excluded)."""
    return len(json.dumps(text, ensure_ascii=True)) - 2


def cap_text(text: str, budget: int) -> tuple[str, bool]:
    """The longest prefix of ``text`` that costs at most ``budget`` bytes as stored, and
    whether anything was cut. Linear in the budget, not in the text (a 120 KB argument)."""
    if len(text) <= budget and _json_cost(text) <= budget:
        return text, False
    used = 0
    for i, ch in enumerate(text):
        used += _json_cost(ch)
        if used > budget:
            return text[:i], True
    return text, False  # pragma: no cover - only reached when the fast check was pessimistic


def cap_cmdline(args: Iterable[str]) -> tuple[tuple[str, ...], bool]:
    """At most MAX_CMDLINE_ARGS arguments and MAX_CMDLINE_BYTES bytes of them; cut or not."""
    out: list[str] = []
    left = MAX_CMDLINE_BYTES
    for i, arg in enumerate(args):
        if i >= MAX_CMDLINE_ARGS:
            return tuple(out), True
        kept, cut = cap_text(arg, left)
        out.append(kept)
        if cut:
            return tuple(out), True
        left -= _json_cost(kept)
    return tuple(out), False


def _capped_field(v: str | None) -> tuple[str | None, bool]:
    if v is None:
        return None, False
    return cap_text(v, MAX_FIELD_BYTES)


@dataclass(slots=True)
class OwnerEventRate:
    """Per-port budget of owner events in the record: a token bucket of ``burst`` events that
    refills one event every ``refill_s`` seconds (event time, so it is pure and testable).

    A port whose owners churn (a listener restarted in a loop) gets its first ``burst`` owner
    events recorded, then one every ``refill_s``; the next recorded owner event of that port
    carries ``suppressed``: how many were left out. ``appeared``/``gone`` events are small and
    always recorded, so when a port was held stays exact; only who held it during the churn is
    summarised. The defaults let a reload of a 30-worker server through (60 events).
    """

    burst: int = 64
    refill_s: float = 2.0
    _tokens: dict[PortKey, tuple[float, float]] = field(default_factory=dict)
    _dropped: dict[PortKey, int] = field(default_factory=dict)

    def admit(self, events: Iterable[Event]) -> list[Event]:
        out: list[Event] = []
        for e in events:
            if e.owner is None:
                out.append(e)
                continue
            tokens, last = self._tokens.get(e.key, (float(self.burst), e.ts))
            tokens = min(float(self.burst), tokens + max(0.0, e.ts - last) / self.refill_s)
            if tokens >= 1.0:
                tokens -= 1.0
                gap = self._dropped.pop(e.key, 0)
                out.append(replace(e, suppressed=gap) if gap else e)
            else:
                self._dropped[e.key] = self._dropped.get(e.key, 0) + 1
            self._tokens[e.key] = (tokens, e.ts)
        return out

    @property
    def dropped(self) -> int:
        """Owner events left out and not yet reported by a later recorded event."""
        return sum(self._dropped.values())


# ---------------------------------------------------------------------------------------------
# JSON lines


def to_json(e: Event) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "ts": round(e.ts, 3),
        "time": _dt.datetime.fromtimestamp(e.ts, _dt.UTC).isoformat(timespec="milliseconds"),
        "event": e.kind.value,
        "proto": e.key.proto.value,
        "port": e.key.port,
        "states": list(e.states),
        "initial": e.initial,
        "suppressed": e.suppressed,
        "owner": None,
        # additive: the birth certificate of an appeared port's socket (null without one)
        "bound_by": None
        if e.binder is None
        else {"pid": e.binder.pid, "comm": _capped_field(e.binder.comm)[0], "at": round(e.binder.at, 6)},
    }
    if e.owner is not None:
        o = e.owner
        cmdline, cut = cap_cmdline(o.cmdline)
        texts = {k: _capped_field(v) for k, v in (("name", o.name), ("user", o.user), ("unit", o.unit))}
        texts["container"] = _capped_field(o.container)
        doc["owner"] = {
            "pid": o.pid,
            "start_ticks": o.start_ticks,
            "name": texts["name"][0],
            "user": texts["user"][0],
            "cmdline": list(cmdline),
            "unit": texts["unit"][0],
            "container": texts["container"][0],
            "truncated": cut or any(c for _, c in texts.values()),
        }
    return doc


def to_line(e: Event) -> str:
    # ensure_ascii: a hostile name cannot put raw control bytes or a newline into the file.
    return json.dumps(to_json(e), ensure_ascii=True, separators=(",", ":")) + "\n"


class BadRecord(ValueError):
    """A line that is not a rebind.top.event/1 record."""


def _opt_str(v: Any, what: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise BadRecord(f"{what} is not a string")


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRecord(f"{what} is not an integer in {lo}-{hi}")
    return v


def _binder_of(bd: Any) -> Binder | None:
    """``bound_by`` of a record: absent or null (records before it, no certificate), else checked."""
    if bd is None:
        return None
    if not isinstance(bd, dict):
        raise BadRecord("bound_by is not an object")
    at = bd.get("at")
    if isinstance(at, bool) or not isinstance(at, int | float) or not 0 <= at < 1e11:
        raise BadRecord("bound_by.at is not a time")
    comm = bd.get("comm")
    if not isinstance(comm, str):
        raise BadRecord("bound_by.comm is not a string")
    return Binder(_int(bd.get("pid"), "bound_by.pid", 0, 2**31), comm, float(at))


def from_json(doc: Any) -> Event:
    if not isinstance(doc, dict):
        raise BadRecord("not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise BadRecord(f"schema is not {SCHEMA}")
    try:
        kind = EventKind(str(doc.get("event")))
        proto = Proto(str(doc.get("proto")))
    except ValueError:
        raise BadRecord("unknown event or proto") from None
    ts = doc.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 <= ts < 1e11:
        raise BadRecord("ts is not a time")
    port = _int(doc.get("port"), "port", 0, 65535)
    states = doc.get("states", [])
    if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
        raise BadRecord("states is not a list of strings")
    owner = None
    od = doc.get("owner")
    if od is not None:
        if not isinstance(od, dict):
            raise BadRecord("owner is not an object")
        cmdline = od.get("cmdline", [])
        if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
            raise BadRecord("owner.cmdline is not a list of strings")
        ticks = od.get("start_ticks")
        owner = OwnerView(
            pid=_int(od.get("pid"), "owner.pid", 0, 2**31),
            name=_opt_str(od.get("name"), "owner.name") or "?",
            user=_opt_str(od.get("user"), "owner.user"),
            start_ticks=None if ticks is None else _int(ticks, "owner.start_ticks", 0, 2**63),
            cmdline=tuple(cmdline),
            unit=_opt_str(od.get("unit"), "owner.unit"),
            container=_opt_str(od.get("container"), "owner.container"),
        )
    suppressed = doc.get("suppressed", 0)
    return Event(
        binder=_binder_of(doc.get("bound_by")),
        ts=float(ts),
        kind=kind,
        key=PortKey(port, proto),
        owner=owner,
        states=tuple(states),
        initial=doc.get("initial") is True,
        suppressed=_int(suppressed, "suppressed", 0, 2**63),
    )


def record_docs(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON) of each non-blank line of a record file (top's and trace's
    alike); raises BadRecord naming the line of the first that is too long or not JSON."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise BadRecord(f"line {n}: longer than {MAX_LINE_BYTES} bytes")
        try:
            doc = json.loads(line)
        except ValueError:
            raise BadRecord(f"line {n}: not JSON") from None
        except RecursionError:  # "[" * 200000: the decoder's recursion limit, not a crash
            raise BadRecord(f"line {n}: JSON nested too deeply") from None
        yield n, doc


def parse_lines(lines: Iterable[str]) -> Iterator[Event]:
    """Events of a record file; raises BadRecord naming the line number of the first bad one."""
    for n, doc in record_docs(lines):
        try:
            yield from_json(doc)
        except BadRecord as exc:
            raise BadRecord(f"line {n}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Human-readable lines (the events pane and `rebind history`)


def _local(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def describe(e: Event, *, with_date: bool = True) -> str:
    """One line; process-supplied text escaped. ``with_date=False`` gives HH:MM:SS only."""
    when = _local(e.ts) if with_date else _local(e.ts)[11:]
    states = f" ({', '.join(e.states)})" if e.states else ""
    who = e.owner.detail if e.owner else ""
    if e.kind is EventKind.APPEARED:
        what = f"held{states}" + (" (already when top started)" if e.initial else "")
        if e.binder is not None:
            what += f", bound by {e.binder.label} at {_local(e.binder.at)}"
    elif e.kind is EventKind.GONE:
        what = "no longer held: bindable unless leftovers remain"
    elif e.kind is EventKind.OWNER_ADDED:
        what = f"{'held by' if e.initial else 'now also held by'} {who}"
    else:
        what = f"released by {who}"
    if e.suppressed:
        what += f" ({e.suppressed} earlier owner event(s) of this port not recorded: rate limit)"
    return visible(f"{when}  {e.key!s:<11} {what}")


def history(events: Iterable[Event], port: int | None = None) -> Iterator[str]:
    for e in events:
        if port is None or e.key.port == port:
            yield describe(e)
