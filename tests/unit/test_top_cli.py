"""`rebind top` and `rebind history` on bad input: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rebind.model.records import Proto, State
from rebind.top.events import diff, to_line
from rebind.top.model import OwnerView, PortKey, PortView, SocketRow

Run = Callable[..., subprocess.CompletedProcess[str]]


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_top_needs_a_terminal(rebind_cli: Run) -> None:
    line = one_line_error(rebind_cli("top", "8080"))
    assert "needs a terminal" in line and "rebind ls" in line and "--json" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["top", "²"], "not a port number"),
        (["top", "70000"], "out of range"),
        (["top", "--interval", "inf"], "finite"),
        (["top", "--interval", "0"], "out of range"),
        (["top", "--interval", "nan"], "finite"),
        (["top", "--record-max", "lots"], "not a size"),
        (["top", "--record-max", "1K"], "out of range"),
    ],
)
def test_top_bad_input(rebind_cli: Run, args: list[str], needle: str) -> None:
    assert needle in one_line_error(rebind_cli(*args))


def test_top_help_lists_the_keys(rebind_cli: Run) -> None:
    res = rebind_cli("top", "--help")
    assert res.returncode == 0 and "w why" in res.stdout and "--record" in res.stdout


def test_history_prints_who_held_what(rebind_cli: Run, tmp_path: Path) -> None:
    k = PortKey(8080, Proto.TCP)
    o = OwnerView(pid=4242, name="web\x1b[31m", user="root", start_ticks=1)
    held = {k: PortView(key=k, rows=(SocketRow(state=State.LISTEN, addr="0.0.0.0", owners=(o,)),))}
    events = diff(None, held, 1_700_000_000.0) + diff(held, {}, 1_700_000_060.0)
    f = tmp_path / "ev.jsonl"
    f.write_text("".join(to_line(e) for e in events))
    res = rebind_cli("history", str(f))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 4
    assert "8080/tcp" in lines[1] and "web\\x1b[31m[4242] root" in lines[1]
    assert "\x1b" not in res.stdout
    assert "no longer held" in lines[3]
    assert rebind_cli("history", str(f), "9999").returncode == 1


@pytest.mark.parametrize("content", ["garbage\n", '{"schema": "rebind.ls/1"}\n', "\udcff"])
def test_history_bad_file(rebind_cli: Run, tmp_path: Path, content: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert "not a rebind top record" in one_line_error(rebind_cli("history", str(f)))


def test_history_missing_file_and_bad_port(rebind_cli: Run, tmp_path: Path) -> None:
    assert "No such file" in one_line_error(rebind_cli("history", str(tmp_path / "nope")))
    assert "is a directory" in one_line_error(rebind_cli("history", str(tmp_path))).lower()
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    assert "not a port number" in one_line_error(rebind_cli("history", str(f), "x"))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        ("deep", "line 1: JSON nested too deeply"),
        ("long", "line 2: longer than"),
        ("fifo", "is a FIFO"),
        ("zero", "is a device"),
        ("dir", "is a directory"),
        ("link", "symbolic link"),
    ],
)
def test_history_hostile_files_are_one_line_exit_2(
    rebind_cli: Run, tmp_path: Path, make: str, needle: str
) -> None:
    """audit 2026-12-05 L1: these crashed with RecursionError (exit 70), ate memory (/dev/zero)
    or hung (a FIFO)."""
    import os

    f = tmp_path / "f"
    if make == "deep":
        f.write_text("[" * 200000 + "\n")
    elif make == "long":
        good = diff(None, {}, 1.0)  # no events: a blank first line is fine too
        f.write_bytes(b"".join(to_line(e).encode() for e in good) + b"\n" + b"\0" * (3 << 20))
    elif make == "fifo":
        os.mkfifo(f)
    elif make == "zero":
        f = Path("/dev/zero")
    elif make == "dir":
        f = tmp_path
    else:
        (tmp_path / "real").write_text("")
        f.symlink_to(tmp_path / "real")
    res = rebind_cli("history", str(f), timeout=20)
    assert needle in one_line_error(res)


def test_history_prints_the_suppressed_gap(rebind_cli: Run, tmp_path: Path) -> None:
    from dataclasses import replace

    k = PortKey(8080, Proto.TCP)
    o = OwnerView(pid=4242, name="web", user="root", start_ticks=1)
    held = {k: PortView(key=k, rows=(SocketRow(state=State.LISTEN, addr="0.0.0.0", owners=(o,)),))}
    events = [replace(e, suppressed=7) if e.owner else e for e in diff(None, held, 1_700_000_000.0)]
    f = tmp_path / "ev.jsonl"
    f.write_text("".join(to_line(e) for e in events))
    res = rebind_cli("history", str(f))
    assert res.returncode == 0 and "7 earlier owner event(s) of this port not recorded" in res.stdout
