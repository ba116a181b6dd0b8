"""CLI conventions: help with examples, version, bad input as one line with exit 2."""

from __future__ import annotations

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
    res = rebind_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("rebind ")


def test_every_available_command_has_help_with_examples(rebind_cli):
    import importlib

    for name, (mod, _, _) in COMMANDS.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            continue  # a command still being built is listed but not importable yet
        res = rebind_cli(name, "--help")
        assert res.returncode == 0, (name, res.stderr)
        assert "Examples:" in res.stdout, name


def test_completion_script(rebind_cli):
    res = rebind_cli("completion", "bash")
    assert res.returncode == 0 and "_REBIND_COMPLETE" in res.stdout
