"""CLI conventions: help with examples, version, bad input as one line with exit 2."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from rebind.cli.main import COMMANDS


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "0"],
        ["ls", "70000"],
        ["ls", "abc"],
        ["ls", "--state", "nonsense"],
        ["ls", "1.2.3:80"],
        ["ls", "65536"],
        ["ls", "-1"],
        ["ls", "80", "0"],
        ["ls", "127.0.0.1:"],
        ["ls", ":80"],
        ["ls", "[::1]:abc"],
        ["ls", "300.1.1.1:80"],
        ["ls", "localhost:80"],
        ["ls", "--state", "time-waiting", "80"],
        ["ls", "--json", "abc"],
        ["why", "0"],
        ["why", "99999"],
        ["why", "80", "--addr", "not-an-ip"],
        ["why"],
        ["nosuchcommand"],
        ["ls", "--bogus-flag"],
    ],
)
def test_bad_input_is_one_line_exit_2(rebind_cli, args):
    res = rebind_cli(*args)
    assert res.returncode == 2, res
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rebind: error:"), res.stderr
    assert "Traceback" not in res.stderr


def test_version(rebind_cli):
    from rebind import __version__

    for flag in ("--version", "-V"):
        res = rebind_cli(flag)
        assert res.returncode == 0 and res.stdout == f"rebind {__version__}\n" and res.stderr == ""
    # The installed console script says the same.
    script = Path(sys.executable).with_name("rebind")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == f"rebind {__version__}\n"


def test_top_level_help_has_examples_and_lists_commands(rebind_cli):
    for flag in ("--help", "-h"):
        res = rebind_cli(flag)
        assert res.returncode == 0 and "Examples:" in res.stdout and "rebind ls" in res.stdout
        assert all(name in res.stdout for name in COMMANDS)


def test_every_command_has_help_with_examples(rebind_cli):
    import importlib

    for name, (mod, func, _) in COMMANDS.items():
        # every listed command is importable and is what the table names (no skipping: a
        # command listed but missing is a broken `rebind NAME`)
        assert callable(getattr(importlib.import_module(mod), func)), name
        res = rebind_cli(name, "--help")
        assert res.returncode == 0, (name, res.stderr)
        assert "Examples:" in res.stdout, name


def test_completion_script(rebind_cli):
    res = rebind_cli("completion", "bash")
    assert res.returncode == 0 and "_REBIND_COMPLETE" in res.stdout


def _run_on_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run `python -m rebind ARGS` with stdout and stderr on a pseudo-terminal; return (rc, output)."""
    leader, follower = pty.openpty()
    e = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    e.update(env, COLUMNS="200", TERM="xterm-256color")
    p = subprocess.Popen(
        [sys.executable, "-m", "rebind", *args],
        stdout=follower,
        stderr=follower,
        stdin=subprocess.DEVNULL,
        env=e,
    )
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    return p.wait(30), out


@pytest.fixture
def bound_port(netns, procs) -> int:
    from tests.kernel.helpers import BOUND_ONLY

    p = procs.python(BOUND_ONLY.format(port=18120))
    procs.wait_line(p)
    return 18120


def test_terminal_gets_colour_unless_no_color(bound_port):
    """The control for the NO_COLOR tests: on a terminal, colour really is produced."""
    rc, coloured = _run_on_terminal(["ls", str(bound_port)], {"FORCE_COLOR": "1"})
    assert rc == 0 and b"BOUND_INACTIVE" in coloured and b"\x1b[" in coloured
    for env in ({"NO_COLOR": "1"}, {"NO_COLOR": "1", "FORCE_COLOR": "1"}):
        rc, helptext = _run_on_terminal(["ls", "--help"], env)
        assert rc == 0 and b"Examples:" in helptext and b"\x1b[" not in helptext
        rc, err = _run_on_terminal(["ls", "abc"], env)
        assert rc == 2 and b"\x1b[" not in err and b"Traceback" not in err


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"NO_COLOR": "1", "FORCE_COLOR": "1"}])
def test_no_color_table_on_a_terminal_has_no_escapes(bound_port, env):
    rc, plain = _run_on_terminal(["ls", str(bound_port)], env)
    assert rc == 0 and b"BOUND_INACTIVE" in plain
    assert b"\x1b[" not in plain, plain


def test_errors_go_to_stderr_and_data_to_stdout(rebind_cli):
    bad = rebind_cli("ls", "abc", "--json")
    assert bad.stdout == "" and bad.stderr.count("\n") == 1
    res = rebind_cli("ls", "1", "--json", "--no-owners")  # nothing listens on port 1 here
    assert res.returncode == 1 and res.stderr == ""
    assert res.stdout.startswith("{") and '"schema": "rebind.ls/1"' in res.stdout
