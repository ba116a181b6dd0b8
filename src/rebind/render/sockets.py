"""The JSON of sockets, owners and tables (`rebind.ls/1`, docs/json.md): `ls --json`, and the
socket entries inside `why`'s, `free`'s and `trace`'s documents. Pure: records in, dicts out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rebind.model.birth import Birth, hook_name
from rebind.model.containers import ContainerRef
from rebind.model.records import (
    Endpoint,
    Owner,
    OwnerScanReport,
    SocketEntry,
    SocketRecord,
    SocketTable,
    fmt_addr,
)

if TYPE_CHECKING:
    from rebind.model.localhost import SplitBrain

LS_SCHEMA = "rebind.ls/1"


def birth_json(b: Birth | None) -> dict[str, Any] | None:
    """Who bound the socket, and when (`rebind trace --install`); None without a certificate."""
    if b is None:
        return None
    return {
        "pid": b.pid,
        "tid": b.tid,
        "comm": b.comm,
        "uid": b.uid,
        "cgroup_id": b.cgroup_id,
        "port": b.port,
        "at": round(b.at, 6),
        "hook": hook_name(b.flags),
        "accepted": b.accepted,
    }


def endpoint_json(ep: Endpoint) -> dict[str, Any]:
    return {"addr": fmt_addr(ep.addr), "port": ep.port}


def owner_json(o: Owner) -> dict[str, Any]:
    return {
        "pid": o.pid,
        "fd": o.fd,
        "name": o.name,
        "cmdline": list(o.cmdline),
        "user": o.user,
        "uid": o.uid,
        "ppid": o.ppid,
        "start_time": o.start_time,
        "container": container_json(o.container),
        "unit": o.unit,
        "proxy": o.proxy.value if o.proxy else None,
    }


def container_json(c: ContainerRef | None) -> dict[str, Any] | None:
    return None if c is None else {"engine": c.engine.value, "id": c.id, "name": c.name, "user": c.user}


def socket_json(r: SocketRecord) -> dict[str, Any]:
    return {
        "proto": r.proto.value,
        "family": r.family.label,
        "state": r.state.label,
        "local": endpoint_json(r.local),
        "remote": endpoint_json(r.remote),
        "expires_ms": r.expires_ms,
        "timer": r.timer.name.lower(),
        "uid": r.uid,
        "inode": r.inode,
        "cookie": r.cookie,
        "ifindex": r.ifindex,
        "v6only": r.v6only,
        "cgroup_id": r.cgroup_id,
        "netns": r.netns,
        # issue 19 (additive): who bound it, when (rebind trace --install; null otherwise)
        "birth": birth_json(r.birth),
    }


def entry_json(e: SocketEntry, *, with_owners: bool = True) -> dict[str, Any]:
    d = socket_json(e.socket)
    d["netns_name"] = e.netns_name
    d["owners"] = [owner_json(o) for o in e.owners] if with_owners else None
    return d


def scan_json(s: OwnerScanReport) -> dict[str, int]:
    return {
        "scanned": s.scanned,
        "inaccessible": s.inaccessible,
        "vanished": s.vanished,
        "other_netns": s.other_netns,
    }


def table_json(t: SocketTable, localhost: Mapping[int, SplitBrain] | None = None) -> dict[str, Any]:
    from rebind.render.findings import finding_json

    return {
        "schema": LS_SCHEMA,
        "source": t.source,
        "sockets": [entry_json(e, with_owners=t.owners_scanned) for e in t.entries],
        "owner_scan": scan_json(t.scan) if t.owners_scanned else None,
        "warnings": list(t.warnings),
        # issue 20 (additive): TCP ports whose localhost reaches different servers, or one family
        "localhost": [finding_json(f) for _, f in sorted((localhost or {}).items())],
    }
