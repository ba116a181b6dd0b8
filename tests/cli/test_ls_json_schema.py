"""docs/json.md and render.table_json describe the same document (schema rebind.ls/1)."""

from __future__ import annotations

import json
import re
from ipaddress import ip_address
from pathlib import Path

from rebind.cli import render
from rebind.model.records import (
    Endpoint,
    Family,
    Owner,
    OwnerScanReport,
    Proto,
    SocketEntry,
    SocketRecord,
    SocketTable,
    State,
    Timer,
)

DOC = (Path(__file__).resolve().parents[2] / "docs" / "json.md").read_text()


def documented_fields(section: str) -> list[str]:
    """Field names from the first table under the heading ``section``."""
    m = re.search(rf"^#+ {re.escape(section)}\n(.*?)(?=^#)", DOC, re.S | re.M)
    assert m, section
    return re.findall(r"^\| `(\w+)` \|", m.group(1), re.M)


def sample(owners_scanned: bool = True) -> dict:  # type: ignore[type-arg]
    rec = SocketRecord(
        proto=Proto.TCP,
        family=Family.INET6,
        state=State.LISTEN,
        local=Endpoint(ip_address("::"), 8080),
        remote=Endpoint(ip_address("::"), 0),
        uid=0,
        inode=5,
        cookie=9,
        v6only=False,
        cgroup_id=1,
    )
    tw = SocketRecord(
        proto=Proto.TCP,
        family=Family.INET,
        state=State.TIME_WAIT,
        local=Endpoint(ip_address("127.0.0.1"), 8080),
        remote=Endpoint(ip_address("127.0.0.1"), 40000),
        uid=None,
        inode=None,
        timer=Timer.TIME_WAIT,
        expires_ms=59_000,
    )
    owner = Owner(pid=10, fd=3, name="srv", cmdline=("srv",), uid=0, user="root", ppid=1, start_time=1.5)
    table = SocketTable(
        (SocketEntry(rec, (owner,)), SocketEntry(tw)),
        owners_scanned=owners_scanned,
        scan=OwnerScanReport(scanned=3),
    )
    doc: dict = json.loads(json.dumps(render.table_json(table)))  # type: ignore[type-arg]
    return doc


def test_top_level_fields_match():
    assert list(sample()) == documented_fields("Top level")


def test_socket_fields_match():
    doc = sample()
    for s in doc["sockets"]:
        assert list(s) == documented_fields("socket")
        assert list(s["local"]) == list(s["remote"]) == documented_fields("endpoint")
    assert list(doc["sockets"][0]["owners"][0]) == documented_fields("owner")
    assert list(doc["owner_scan"]) == documented_fields("owner_scan")


def test_documented_values():
    doc = sample()
    assert doc["schema"] == "rebind.ls/1" and '`"rebind.ls/1"`' in DOC
    listener, tw = doc["sockets"]
    assert listener["family"] == "ipv6" and listener["v6only"] is False and listener["local"]["addr"] == "::"
    assert tw["timer"] == "time_wait" and tw["uid"] is None and tw["inode"] is None and tw["owners"] == []
    for timer in Timer:
        assert f'`"{timer.name.lower()}"`' in DOC
    # Every state label rebind can print is listed in the doc.
    states_row = next(line for line in DOC.splitlines() if line.startswith("| `state` |"))
    for st in State:
        assert f"`{st.label}`" in states_row, st
    no_owners = sample(owners_scanned=False)
    assert no_owners["owner_scan"] is None and all(s["owners"] is None for s in no_owners["sockets"])


def test_birth_fields_match():
    from dataclasses import replace

    from rebind.model.birth import Birth

    rec = SocketRecord(
        Proto.TCP,
        Family.INET,
        State.LISTEN,
        Endpoint(ip_address("127.0.0.1"), 80),
        Endpoint(ip_address("0.0.0.0"), 0),
        0,
        5,
    )
    b = Birth(pid=7, tid=7, comm="srv", cgroup_id=1, uid=0, port=80, flags=1, boot_ns=10, at=1.5)
    d = render.socket_json(replace(rec, birth=b))
    assert list(d["birth"]) == documented_fields("birth")
    assert render.socket_json(rec)["birth"] is None
