"""rebind top's events: diffing samples, the JSON-lines record, history parsing and lines."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rebind.errors import UsageError
from rebind.model.records import Proto, State
from rebind.top.events import (
    SCHEMA,
    BadRecord,
    Event,
    EventKind,
    describe,
    diff,
    from_json,
    history,
    parse_lines,
    to_json,
    to_line,
)
from rebind.top.model import OwnerView, PortKey, PortView, SocketRow
from rebind.top.record import Recorder

K = PortKey(8080, Proto.TCP)


def view(*owners: OwnerView, state: State = State.LISTEN, key: PortKey = K) -> PortView:
    return PortView(key=key, rows=(SocketRow(state=state, addr="0.0.0.0", owners=owners),))


A = OwnerView(pid=100, name="srv", user="root", start_ticks=5, cmdline=("srv", "--port", "8080"))
B = OwnerView(pid=200, name="srv2", user="www", start_ticks=9)


def kinds(events: list[Event]) -> list[tuple[str, int | None]]:
    return [(e.kind.value, e.owner.pid if e.owner else None) for e in events]


def test_first_sample_reports_what_is_there_as_initial() -> None:
    ev = diff(None, {K: view(A)}, 1.0)
    assert kinds(ev) == [("appeared", None), ("owner-added", 100)]
    assert all(e.initial for e in ev)


def test_appear_change_owner_disappear() -> None:
    s0: dict[PortKey, PortView] = {K: PortView(key=K)}  # watched, empty
    s1 = {K: view(A)}
    s2 = {K: view(A, B)}
    s3 = {K: view(B)}
    s4: dict[PortKey, PortView] = {}
    assert kinds(diff(s0, s1, 1)) == [("appeared", None), ("owner-added", 100)]
    assert kinds(diff(s1, s2, 2)) == [("owner-added", 200)]
    assert kinds(diff(s2, s3, 3)) == [("owner-removed", 100)]
    assert kinds(diff(s3, s4, 4)) == [("owner-removed", 200), ("gone", None)]
    assert not any(e.initial for e in diff(s0, s1, 1))


def test_recycled_pid_is_another_owner() -> None:
    again = OwnerView(pid=100, name="other", start_ticks=77)
    assert kinds(diff({K: view(A)}, {K: view(again)}, 1)) == [("owner-added", 100), ("owner-removed", 100)]


def test_connections_and_leftovers_do_not_make_a_port_appear() -> None:
    tw = view(state=State.TIME_WAIT)
    assert diff({}, {K: tw}, 1) == []
    assert kinds(diff({K: view(A)}, {K: tw}, 1)) == [("owner-removed", 100), ("gone", None)]


def test_json_round_trip_and_schema() -> None:
    (e,) = [x for x in diff({}, {K: view(A)}, 1_700_000_000.25) if x.owner]
    doc = to_json(e)
    assert doc["schema"] == SCHEMA and doc["event"] == "owner-added" and doc["port"] == 8080
    assert doc["owner"]["cmdline"] == ["srv", "--port", "8080"] and doc["states"] == ["LISTEN"]
    assert doc["time"].startswith("2023-11-14T22:13:20.250")
    assert from_json(json.loads(to_line(e))) == e


def test_hostile_name_cannot_break_the_line_or_the_terminal() -> None:
    evil = OwnerView(pid=1, name='x\n{"schema":1}\x1b[2J', user="\u202eroot")
    (e,) = [x for x in diff({}, {K: view(evil)}, 1.0) if x.owner]
    line = to_line(e)
    assert line.count("\n") == 1 and line.isascii()
    back = from_json(json.loads(line))
    assert back.owner is not None and back.owner.name == evil.name
    text = describe(back)
    assert "\x1b" not in text and "\n" not in text and "\u202e" not in text


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"schema": "other"}', "schema"),
        (
            json.dumps({"schema": SCHEMA, "event": "boom", "proto": "tcp", "ts": 1, "port": 1}),
            "unknown event",
        ),
        (json.dumps({"schema": SCHEMA, "event": "gone", "proto": "tcp", "ts": 1, "port": 70000}), "port"),
        (json.dumps({"schema": SCHEMA, "event": "gone", "proto": "tcp", "ts": "x", "port": 1}), "ts"),
        (json.dumps({"schema": SCHEMA, "event": "gone", "proto": "tcp", "ts": 1, "port": True}), "port"),
        (
            json.dumps(
                {"schema": SCHEMA, "event": "gone", "proto": "tcp", "ts": 1, "port": 1, "owner": {"pid": "1"}}
            ),
            "owner.pid",
        ),
    ],
)
def test_bad_lines_name_their_line_number(line: str, why: str) -> None:
    good = to_line(diff({}, {K: view(A)}, 1.0)[0])
    with pytest.raises(BadRecord, match=f"line 2: .*{why}"):
        list(parse_lines([good, line]))


def test_history_filters_by_port_and_skips_blank_lines() -> None:
    other = PortKey(9090, Proto.TCP)
    lines = [to_line(e) for e in diff({}, {K: view(A), other: view(B, key=other)}, 1.0)] + ["\n"]
    events = list(parse_lines(lines))
    out = list(history(events, 9090))
    assert len(out) == 2 and all("9090/tcp" in x for x in out)
    assert "held by srv2[200] www" in out[1]
    assert len(list(history(events))) == 4


def test_recorder_appends_0600_and_refuses_symlinks(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    rec = Recorder(str(path))
    rec.write(diff({}, {K: view(A)}, 1.0))
    rec.close()
    rec = Recorder(str(path))
    rec.write(diff({K: view(A)}, {}, 2.0))
    rec.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [e.kind for e in parse_lines(path.read_text().splitlines())] == [
        EventKind.APPEARED,
        EventKind.OWNER_ADDED,
        EventKind.OWNER_REMOVED,
        EventKind.GONE,
    ]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(UsageError, match="--record"):
        Recorder(str(link))
    assert not (tmp_path / "target").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="--record"):
        Recorder(str(fifo))  # O_NONBLOCK: refused at once (ENXIO) instead of waiting for a reader
    hard = tmp_path / "hard"
    os.link(path, hard)
    with pytest.raises(UsageError, match="hard links"):
        Recorder(str(hard))
