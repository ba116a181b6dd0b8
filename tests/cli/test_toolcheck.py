"""`make test` on a machine without the system tools (issue 18 #17): their tests skip with ONE
summary line, the run passes; under CI=true a missing tool fails. No root, nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TESTS = """
from tests.toolcheck import need_tool

def test_rules():
    need_tool("promtool")

def test_rules_again():
    need_tool("promtool")

def test_nginx():
    need_tool("nginx")

def test_plain():
    assert True
"""


def _bare_path(tmp: Path) -> str:
    """A PATH with only what the shell script itself uses: none of the tools."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    for tool in ("bash", "sort", "dirname", "id", "env", "cat", "awk", "comm"):
        for d in ("/usr/bin", "/bin"):
            if os.path.exists(f"{d}/{tool}"):
                (bin_ / tool).symlink_to(f"{d}/{tool}")
                break
    return str(bin_)


def _pytest(tmp: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp / "test_tools.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=_bare_path(tmp), PYTHONPATH=str(ROOT), NO_COLOR="1")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.toolcheck", "-p", "no:cacheprovider", "-ra",
         "--rootdir", str(tmp), str(tmp / "test_tools.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip


def test_missing_tools_skip_with_one_summary_line(tmp_path):
    res = _pytest(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = [ln for ln in res.stdout.splitlines() if "need missing tools" in ln]
    assert len(summary) == 1, res.stdout
    assert "3 test(s)" in summary[0] and "promtool (2)" in summary[0] and "nginx (1)" in summary[0]
    assert "SKIPPED" not in res.stdout  # no per-test skip lines for them
    assert "1 passed, 3 skipped" in res.stdout


def test_missing_tools_fail_under_ci(tmp_path):
    res = _pytest(tmp_path, "true")
    assert res.returncode == 1, res.stdout
    assert "promtool is missing" in res.stdout and "3 failed, 1 passed" in res.stdout


def test_systest_without_root_or_apt_runs_the_command_and_says_what_it_skips(tmp_path):
    env = dict(os.environ, PATH=_bare_path(tmp_path), REBIND_SYSTEST_INSTALL="0")
    res = subprocess.run(
        [str(ROOT / "tools" / "systest.sh"), "bash", "-c", "echo ran"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "ran"
    line = res.stdout.splitlines()[0]
    assert line.startswith("systest: not installing") and "prometheus" in line and "nginx-light" in line
