"""`rebind trace`'s renderer: an event's line and its JSON (``rebind.trace/1``, docs/json.md).

JSON is one object per event, the same on ``--json`` and in ``--record`` files, which `rebind
history` reads beside `rebind top`'s records: :func:`from_json` reads a line back into a
:class:`TraceRecord`, so the schema is written and read in this one module. The events and the
snapshots they carry are the model's (:mod:`rebind.model.trace`).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

from rebind.model.records import process_label
from rebind.model.trace import AF_INET, AF_INET6, Kind, Snapshot, TraceEvent
from rebind.textsafe import visible

SCHEMA = "rebind.trace/1"
#: A record's text is capped: the line a hostile process can make us print or store is bounded.
MAX_TEXT = 512


def _clock(ts: float, *, date: bool = False) -> str:
    t = _dt.datetime.fromtimestamp(ts).astimezone()
    return t.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")


def describe(ev: TraceEvent, snap: Snapshot | None, *, unit: str | None = None, date: bool = False) -> str:
    """``03:12:07 myapp[4121] (myapp.service) bind 0.0.0.0:8080 SO_REUSEADDR → EADDRINUSE: ...``
    (process-supplied text escaped)."""
    who = process_label(ev.comm, ev.pid) + (f" ({unit})" if unit else "")
    what = ev.kind.name.lower()
    proto = f"/{ev.proto.value}" if ev.proto else ""
    target = ev.where + proto
    if ev.kind is Kind.CONNECT and ev.local_port:
        target = f"{target} from :{ev.local_port}"
    flags = "".join(f" {f}" for f in ev.flags)
    head = f"{_clock(ev.ts, date=date)} {who} {what} {target}{flags} → {ev.errno_name}"
    if snap is None:
        return visible(head)
    return visible(f"{head}: {snap.reason}")


# ---------------------------------------------------------------------------------------------
# JSON (rebind.trace/1)


def _cap(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def to_json(
    ev: TraceEvent, snap: Snapshot | None, *, unit: str | None = None, container: str | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "ts": round(ev.ts, 6),
        "time": _dt.datetime.fromtimestamp(ev.ts, _dt.UTC).isoformat(timespec="milliseconds"),
        "call": ev.kind.name.lower(),
        "errno": ev.errno_name,
        "errno_value": ev.errno,
        "proto": ev.proto.value if ev.proto else None,
        "family": "ipv4" if ev.family == AF_INET else "ipv6",
        "addr": str(ev.addr) if ev.addr is not None else None,
        "port": ev.port,
        "scope_id": ev.scope_id,
        "local_addr": str(ev.local_addr) if ev.local_addr is not None else None,
        "local_port": ev.local_port,
        "options": {
            "reuseaddr": ev.reuseaddr,
            "reuseport": ev.reuseport,
            "v6only": ev.v6only if ev.family == AF_INET6 else None,
            "bound_dev_if": ev.bound_dev_if,
        },
        "process": {
            "pid": ev.pid,
            "tid": ev.tid,
            "comm": _cap(ev.comm),
            "uid": ev.uid,
            "cgroup_id": ev.cgroup_id,
            "unit": _cap(unit) if unit else None,
            "container": _cap(container) if container else None,
        },
        "netns": ev.netns,
        "fd": ev.fd,
        "socket_inode": ev.inode,
        "snapshot": None,
    }
    if snap is not None:
        doc["snapshot"] = {
            "verdict": snap.verdict,
            "reason": _cap(snap.reason),
            "headline": _cap(snap.headline),
            "after_ms": None if snap.after_ms is None else round(snap.after_ms, 3),
            "error": snap.error,
            "blockers": [
                {
                    "kind": b.kind,
                    "text": _cap(b.text),
                    "state": b.state,
                    "local": b.local,
                    "remote": b.remote,
                    "left_ms": b.left_ms,
                    "pids": list(b.pids),
                    "group": b.group,
                }
                for b in snap.blockers[:16]
            ],
        }
    return doc


def to_line(
    ev: TraceEvent, snap: Snapshot | None, *, unit: str | None = None, container: str | None = None
) -> str:
    # ensure_ascii: a hostile comm cannot put raw control bytes or a newline into the file.
    return (
        json.dumps(
            to_json(ev, snap, unit=unit, container=container), ensure_ascii=True, separators=(",", ":")
        )
        + "\n"
    )


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """A ``rebind.trace/1`` line read back (`rebind history`): what a line needs, validated."""

    ts: float
    call: str
    errno: str
    proto: str | None
    where: str
    comm: str
    pid: int
    unit: str | None
    flags: tuple[str, ...]
    reason: str | None
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        who = process_label(self.comm, self.pid) + (f" ({self.unit})" if self.unit else "")
        proto = f"/{self.proto}" if self.proto else ""
        flags = "".join(f" {f}" for f in self.flags)
        tail = f": {self.reason}" if self.reason else ""
        return visible(
            f"{_clock(self.ts, date=True)}  {who} {self.call} {self.where}{proto}{flags} → {self.errno}{tail}"
        )


class BadTraceRecord(ValueError):
    pass


def _str(v: Any, what: str, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > 4 * MAX_TEXT:
        raise BadTraceRecord(f"{what} is not a string")
    return v


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadTraceRecord(f"{what} is not an integer in {lo}-{hi}")
    return v


def from_json(doc: Any) -> TraceRecord:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise BadTraceRecord(f"schema is not {SCHEMA}")
    ts = doc.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 <= ts < 1e11:
        raise BadTraceRecord("ts is not a time")
    call = _str(doc.get("call"), "call")
    if call not in ("bind", "listen", "connect"):
        raise BadTraceRecord("call is not bind, listen or connect")
    proc = doc.get("process")
    opts = doc.get("options")
    if not isinstance(proc, dict) or not isinstance(opts, dict):
        raise BadTraceRecord("process or options is not an object")
    addr = _str(doc.get("addr"), "addr", optional=True)
    port = _int(doc.get("port"), "port", 0, 65535)
    host = "?" if addr is None else (f"[{addr}]" if ":" in addr else addr)
    flags = [
        n
        for k, n in (("reuseaddr", "SO_REUSEADDR"), ("reuseport", "SO_REUSEPORT"), ("v6only", "IPV6_V6ONLY"))
        if opts.get(k) is True
    ]
    snap = doc.get("snapshot")
    reason = None
    if snap is not None:
        if not isinstance(snap, dict):
            raise BadTraceRecord("snapshot is not an object")
        reason = _str(snap.get("reason"), "snapshot.reason")
    proto = _str(doc.get("proto"), "proto", optional=True)
    return TraceRecord(
        ts=float(ts),
        call=call,
        errno=_str(doc.get("errno"), "errno") or "?",
        proto=proto,
        where=f"{host}:{port}",
        comm=_str(proc.get("comm"), "process.comm") or "?",
        pid=_int(proc.get("pid"), "process.pid", 0, 2**32),
        unit=_str(proc.get("unit"), "process.unit", optional=True),
        flags=tuple(flags),
        reason=reason,
        port=port,
    )


def is_trace_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("schema") == SCHEMA
