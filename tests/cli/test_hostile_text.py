"""Process-supplied text is hostile (issue 8 item 7): a process that names itself rich markup or
terminal escapes must neither crash root's `rebind ls` nor reach root's terminal raw.

The holders are real processes in the test's network namespace, renamed with
prctl(PR_SET_NAME) and running as uid 65534 (a hostile local user), on a terminal (pty, rich
output) and piped (plain output).
"""

from __future__ import annotations

import json

import pytest

from rebind.cli.render import escape_markup, owners_cell, strip_markup
from rebind.model.records import Owner, owner_label
from tests.cli.test_cli_basics import _run_on_terminal

# Fits comm's 15 bytes: clear the screen, then retitle the window.
SCREEN = "\x1b[2J\x1b]0;PWN\x07"
NAMES = {"markup": "[/x]", "escapes": SCREEN, "style": "[bold red]x", "emoji": ":fire:"}

HOSTILE = """
import ctypes, os, socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
os.setgroups([]); os.setgid(65534); os.setuid(65534)
ctypes.CDLL(None, use_errno=True).prctl(15, {name!r}.encode(), 0, 0, 0)  # PR_SET_NAME
print('ready', flush=True)
time.sleep(600)
"""


@pytest.fixture
def hostile(netns, procs, request) -> tuple[int, int, str]:  # type: ignore[no-untyped-def]
    """(port, pid, name) of a uid-65534 listener whose comm is the hostile name."""
    name = NAMES[request.param]
    port = 18700 + list(NAMES).index(request.param)
    p = procs.python(HOSTILE.format(port=port, name=name))
    procs.wait_line(p)
    with open(f"/proc/{p.pid}/comm", "rb") as f:
        assert f.read().rstrip(b"\n") == name.encode()  # the rename really happened
    return port, p.pid, name


@pytest.mark.parametrize("hostile", list(NAMES), indirect=True)
def test_ls_on_a_terminal_prints_hostile_names_as_text(hostile):
    port, pid, name = hostile
    rc, out = _run_on_terminal(["ls", str(port)], {"FORCE_COLOR": "1"})
    assert rc == 0, out
    assert b"Traceback" not in out and b"MarkupError" not in out
    assert b"\x1b[2J" not in out and b"\x1b]0;" not in out and b"\x07" not in out
    assert b"\x1b[" in out  # the control: rich did colour the table
    assert f"[{pid}]".encode() in out
    if name == SCREEN:
        assert b"\\x1b[2J\\x1b]0;PWN\\x07" in out
    elif name == ":fire:":
        assert b":fire:" in out and "🔥".encode() not in out
    else:
        assert name.encode() in out  # markup printed as itself, not interpreted


@pytest.mark.parametrize("hostile", list(NAMES), indirect=True)
def test_ls_piped_prints_hostile_names_as_text(hostile, rebind_cli):
    port, pid, name = hostile
    res = rebind_cli("ls", str(port))
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    expected = "\\x1b[2J\\x1b]0;PWN\\x07" if name == SCREEN else name
    assert f"{expected}[{pid}]" in res.stdout
    # JSON carries the name as data, with control characters escaped by JSON itself.
    doc = json.loads(rebind_cli("ls", str(port), "--json").stdout)
    assert [o["name"] for s in doc["sockets"] for o in s["owners"]] == [name]


@pytest.mark.parametrize("hostile", ["escapes", "markup"], indirect=True)
def test_wait_blocker_list_escapes_owner_names(hostile, rebind_cli):
    port, pid, _ = hostile
    res = rebind_cli("wait", f"127.0.0.1:{port}", "--timeout", "0.3")
    assert res.returncode == 1, res.stderr
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr
    assert f"[{pid}]" in res.stderr and "held by" in res.stderr
    rc, out = _run_on_terminal(["wait", f"127.0.0.1:{port}", "--timeout", "1.2"], {"FORCE_COLOR": "1"})
    assert rc == 1 and b"Traceback" not in out
    assert b"\x1b[2J" not in out and b"\x1b]0;" not in out and b"\x07" not in out
    assert f"[{pid}]".encode() in out


def test_owner_label_is_the_one_escaping_place():
    o = Owner(pid=7, fd=3, name=SCREEN)
    assert owner_label(o) == "\\x1b[2J\\x1b]0;PWN\\x07[7]"
    from rebind.model import free_result

    assert free_result.owner_label is owner_label  # free's result uses the same label
    assert owners_cell((Owner(pid=1, fd=3, name="a\nb"),)) == "a\\x0ab[1]"


@pytest.mark.parametrize("text", ["[/x]", "[bold]x[/bold]", "\\[x]", "a\\", "[::]:80", "py[12]", "\\\\[b]"])
def test_plain_and_rich_read_escaped_markup_alike(text):
    from rich.markup import escape, render

    assert escape_markup(text) == escape(text)
    embedded = f"[bold]{escape_markup(text)}[/]"  # as renderers use it: inside style tags
    assert strip_markup(embedded) == render(embedded).plain == text
    assert strip_markup("[bold]on[/] [dim]x[/]") == render("[bold]on[/] [dim]x[/]").plain
