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
from dataclasses import dataclass
from typing import Any

from rebind.model.records import Proto
from rebind.textsafe import visible
from rebind.top.model import HOLDING_STATES, OwnerView, PortKey, PortView

SCHEMA = "rebind.top.event/1"


class EventKind(enum.StrEnum):
    APPEARED = "appeared"
    GONE = "gone"
    OWNER_ADDED = "owner-added"
    OWNER_REMOVED = "owner-removed"


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


def _states(v: PortView | None) -> tuple[str, ...]:
    if v is None:
        return ()
    return tuple(sorted({r.state.label for r in v.rows if r.state in HOLDING_STATES}))


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
            out.append(Event(ts, EventKind.APPEARED, k, states=_states(new), initial=initial))
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
        "owner": None,
    }
    if e.owner is not None:
        o = e.owner
        doc["owner"] = {
            "pid": o.pid,
            "start_ticks": o.start_ticks,
            "name": o.name,
            "user": o.user,
            "cmdline": list(o.cmdline),
            "unit": o.unit,
            "container": o.container,
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
    return Event(
        ts=float(ts),
        kind=kind,
        key=PortKey(port, proto),
        owner=owner,
        states=tuple(states),
        initial=doc.get("initial") is True,
    )


def parse_lines(lines: Iterable[str]) -> Iterator[Event]:
    """Events of a record file; raises BadRecord naming the line number of the first bad one."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise BadRecord(f"line {n}: not JSON") from None
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
    elif e.kind is EventKind.GONE:
        what = "no longer held: bindable unless leftovers remain"
    elif e.kind is EventKind.OWNER_ADDED:
        what = f"{'held by' if e.initial else 'now also held by'} {who}"
    else:
        what = f"released by {who}"
    return visible(f"{when}  {e.key!s:<11} {what}")


def history(events: Iterable[Event], port: int | None = None) -> Iterator[str]:
    for e in events:
        if port is None or e.key.port == port:
            yield describe(e)
