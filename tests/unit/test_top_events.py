"""rebind top's events: diffing samples, the JSON-lines record, history parsing and lines."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rebind.errors import UsageError
from rebind.model.birth import Birth
from rebind.model.records import Proto, State
from rebind.top.events import (
    SCHEMA,
    BadRecord,
    Binder,
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


# ---------------------------------------------------------------------------------------------
# What one user can make root write (audit 2026-12-05 M3)


def test_owner_text_is_capped_per_owner_and_flagged() -> None:
    from rebind.top.events import MAX_CMDLINE_ARGS, MAX_CMDLINE_BYTES, MAX_FIELD_BYTES

    huge = OwnerView(
        pid=7, name="é" * 5000, user="u", start_ticks=1, cmdline=("python3", *["é" * 60000] * 13)
    )
    (e,) = [x for x in diff({}, {K: view(huge)}, 1.0) if x.owner]
    line = to_line(e)
    doc = json.loads(line)["owner"]
    assert doc["truncated"] is True
    assert len(json.dumps(doc["cmdline"], ensure_ascii=True)) <= MAX_CMDLINE_BYTES + 4 * MAX_CMDLINE_ARGS
    assert len(json.dumps(doc["name"], ensure_ascii=True)) <= MAX_FIELD_BYTES + 2
    assert doc["cmdline"][0] == "python3" and doc["cmdline"][1].startswith("é")
    assert len(line) < 8 * 1024  # was 1.56 MB for this owner
    many = OwnerView(pid=8, name="x", start_ticks=1, cmdline=tuple(str(i) for i in range(1000)))
    (e,) = [x for x in diff({}, {K: view(many)}, 1.0) if x.owner]
    doc = to_json(e)["owner"]
    assert doc["cmdline"] == [str(i) for i in range(MAX_CMDLINE_ARGS)] and doc["truncated"] is True
    (e,) = [x for x in diff({}, {K: view(A)}, 1.0) if x.owner]
    assert to_json(e)["owner"]["truncated"] is False and to_json(e)["owner"]["cmdline"] == list(A.cmdline)


@pytest.mark.parametrize("text", ["a" * 10, "é" * 100, "\x00" * 50, '"\\' * 40, "\U0001f600" * 30, "ab"])
def test_cap_text_counts_bytes_as_stored(text: str) -> None:
    from rebind.top.events import cap_text

    for budget in (0, 1, 5, 6, 7, 12, 64):
        kept, cut = cap_text(text, budget)
        assert text.startswith(kept) and cut == (kept != text)
        assert len(json.dumps(kept, ensure_ascii=True)) - 2 <= budget
        if cut:  # the longest such prefix
            assert len(json.dumps(text[: len(kept) + 1], ensure_ascii=True)) - 2 > budget


def _churn(rate: object, n: int, start: float = 0.0, step: float = 0.5) -> list[Event]:
    from rebind.top.events import OwnerEventRate

    assert isinstance(rate, OwnerEventRate)
    out: list[Event] = []
    prev: dict[PortKey, PortView] = {}
    for i in range(n):
        cur = {K: view(OwnerView(pid=1000 + i, name="churn", start_ticks=i))}
        out += rate.admit(diff(prev, cur, start + i * step))
        prev = cur
    return out


def test_owner_events_are_rate_limited_per_port_and_the_gap_is_counted() -> None:
    from rebind.top.events import OwnerEventRate

    rate = OwnerEventRate(burst=10, refill_s=2.0)
    got = _churn(rate, 100)  # 2 owner events per step, a step every 0.5 s: 4/s against 0.5/s
    owner_events = [e for e in got if e.owner is not None]
    # the burst, then one per refill_s over the 49.5 s
    assert 10 <= len(owner_events) <= 10 + 49.5 / 2.0 + 1
    gaps = [e.suppressed for e in owner_events if e.suppressed]
    assert gaps and sum(gaps) + rate.dropped == 199 - len(owner_events)
    assert "not recorded: rate limit" in describe(next(e for e in owner_events if e.suppressed))
    # a suppressed count survives the JSON round trip
    e = next(e for e in owner_events if e.suppressed)
    assert from_json(json.loads(to_line(e))).suppressed == e.suppressed
    # another port has its own budget
    other = PortKey(9090, Proto.TCP)
    assert len(rate.admit(diff({}, {other: view(A, key=other)}, 50.0))) == 2


def test_quiet_ports_are_never_limited() -> None:
    from rebind.top.events import OwnerEventRate

    rate = OwnerEventRate(burst=4, refill_s=2.0)
    got = _churn(rate, 20, step=10.0)  # a restart every 10 s
    assert sum(1 for e in got if e.owner) == 39 and not any(e.suppressed for e in got)


def _lines(n: int, start: float = 0.0) -> list[Event]:
    out: list[Event] = []
    for i in range(n):
        k = PortKey(10000 + i, Proto.TCP)
        out += diff({}, {k: view(A, key=k)}, start + i)
    return out


def test_record_file_rotates_once_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    rec = Recorder(str(path), max_bytes=64 << 10)
    for _ in range(20):
        rec.write(_lines(100))
    rec.close()
    old = tmp_path / "ev.jsonl.1"
    assert path.stat().st_size <= 64 << 10 and old.stat().st_size <= 64 << 10
    assert rec.rotations >= 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.jsonl", "ev.jsonl.1"]
    # every line whole: rotation happens between lines
    for f in (path, old):
        list(parse_lines(f.read_text().splitlines()))


def test_rotation_replaces_a_planted_file_1_and_never_writes_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "ev.jsonl.1").symlink_to(victim)
    rec = Recorder(str(tmp_path / "ev.jsonl"), max_bytes=64 << 10)
    for _ in range(3):
        rec.write(_lines(100))
    rec.close()
    assert victim.read_text() == "keep"
    assert not (tmp_path / "ev.jsonl.1").is_symlink()


def test_rotation_stops_when_the_file_was_replaced(tmp_path: Path) -> None:
    from rebind.top.record import RecordStopped

    path = tmp_path / "ev.jsonl"
    rec = Recorder(str(path), max_bytes=64 << 10)
    rec.write(_lines(10))
    path.rename(tmp_path / "moved")
    path.symlink_to(tmp_path / "elsewhere")  # what an attacker would plant
    with pytest.raises(RecordStopped, match="replaced"):
        for _ in range(10):
            rec.write(_lines(100))
    rec.close()
    assert not (tmp_path / "elsewhere").exists()


def test_new_file_after_rotation_is_created_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the rename and the new open, a planted symlink at FILE makes O_EXCL fail: stop."""
    from rebind.top import record
    from rebind.top.record import RecordStopped

    path = tmp_path / "ev.jsonl"
    rec = Recorder(str(path), max_bytes=64 << 10)
    real_rename = os.rename

    def rename_then_plant(src: str, dst: str) -> None:
        real_rename(src, dst)
        os.symlink(tmp_path / "target", src)

    monkeypatch.setattr(record.os, "rename", rename_then_plant)
    with pytest.raises(RecordStopped, match="something else was created there"):
        for _ in range(10):
            rec.write(_lines(100))
    rec.close()
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize(
    ("text", "size"),
    [("64K", 65536), ("32M", 32 << 20), ("1g", 1 << 30), ("70000", 70000), ("2MiB", 2 << 20)],
)
def test_parse_size(text: str, size: int) -> None:
    from rebind.top.record import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "1K", "-5M", "2T", "1.5M", "²M"])
def test_parse_size_rejects(text: str) -> None:
    from rebind.top.record import parse_size

    with pytest.raises(UsageError, match="--record-max"):
        parse_size(text)


# ---------------------------------------------------------------------------------------------
# Reading hostile record files (audit 2026-12-05 L1)


def test_deeply_nested_line_is_not_a_record() -> None:
    with pytest.raises(BadRecord, match="line 1: JSON nested too deeply"):
        list(parse_lines(["[" * 200000]))


def test_reader_caps_line_length_and_streams(tmp_path: Path) -> None:
    from rebind.top.record import read_lines

    f = tmp_path / "long"
    good = to_line(diff({}, {K: view(A)}, 1.0)[0])
    f.write_bytes(good.encode() * 3 + b"x" * (3 << 20))  # no newline: /dev/zero-like
    fd = os.open(f, os.O_RDONLY)
    got = read_lines(fd, max_line=1 << 20)
    assert [next(got) for _ in range(3)] == [good.rstrip("\n")] * 3
    with pytest.raises(BadRecord, match="line 4: longer than 1048576 bytes"):
        next(got)
    os.close(fd)
    f.write_bytes(good.encode() + b"\xff\n")
    fd = os.open(f, os.O_RDONLY)
    with pytest.raises(BadRecord, match="line 2: not UTF-8"):
        list(read_lines(fd))
    os.close(fd)


def test_open_record_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    from rebind.top.record import open_record

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is a FIFO"):
        open_record(str(fifo))  # O_NONBLOCK: at once, no writer needed
    with pytest.raises(UsageError, match="is a device"):
        open_record("/dev/zero")
    with pytest.raises(UsageError, match="is a directory"):
        open_record(str(tmp_path))
    (tmp_path / "link").symlink_to(fifo)
    with pytest.raises(UsageError, match="symbolic link"):
        open_record(str(tmp_path / "link"))


def _born(comm: str, pid: int = 4121, at: float = 1_700_000_000.5) -> Birth:
    return Birth(pid=pid, tid=pid, comm=comm, cgroup_id=1, uid=0, port=8080, flags=1, boot_ns=1, at=at)


def test_appeared_port_records_who_bound_it_and_history_says_so() -> None:
    """Issue 19: the record keeps the birth certificate of the port's holding socket, so
    `rebind history` names the binder after it is gone (or was never seen by an owner scan)."""
    row = SocketRow(state=State.LISTEN, addr="0.0.0.0", birth=_born("short-lived"))
    (e,) = diff({}, {K: PortView(key=K, rows=(row,))}, 1_700_000_001.0)
    assert e.kind is EventKind.APPEARED and e.binder == Binder(4121, "short-lived", 1_700_000_000.5)
    doc = json.loads(to_line(e))
    assert doc["bound_by"] == {"pid": 4121, "comm": "short-lived", "at": 1_700_000_000.5}
    back = from_json(doc)
    assert back == e
    assert "held (LISTEN), bound by short-lived[4121] at " in describe(back)
    # a leftover's certificate does not make the port's binder
    tw = SocketRow(state=State.TIME_WAIT, addr="0.0.0.0", birth=_born("old"))
    (e2,) = diff({}, {K: PortView(key=K, rows=(tw, SocketRow(state=State.LISTEN, addr="0.0.0.0")))}, 2.0)
    assert e2.binder is None and json.loads(to_line(e2))["bound_by"] is None


def test_binder_text_is_hostile_and_bad_bound_by_is_refused() -> None:
    row = SocketRow(state=State.LISTEN, addr="0.0.0.0", birth=_born('x\n{"a":1}\x1b[2J\u202e'))
    (e,) = diff({}, {K: PortView(key=K, rows=(row,))}, 1.0)
    line = to_line(e)
    assert line.count("\n") == 1 and line.isascii()
    text = describe(from_json(json.loads(line)))
    assert "\x1b" not in text and "\n" not in text and "\u202e" not in text
    base = {"schema": SCHEMA, "event": "appeared", "proto": "tcp", "ts": 1, "port": 1}
    for bad, why in (
        ("x", "bound_by is not an object"),
        ({"pid": 1, "comm": "a", "at": "now"}, "bound_by.at"),
        ({"pid": -1, "comm": "a", "at": 1}, "bound_by.pid"),
        ({"pid": 1, "comm": 5, "at": 1}, "bound_by.comm"),
    ):
        with pytest.raises(BadRecord, match=why):
            from_json({**base, "bound_by": bad})
    assert from_json(base).binder is None  # records written before the field
