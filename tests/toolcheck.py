"""The system tools tests drive (tools/system-tools.txt), found one way for every test.

``need_tool("promtool")`` returns the tool's path. When it is missing the test skips -- or, under
``CI=true``, fails: CI installs every tool (tools/systest.sh), so a missing one is a broken set-up.
All such skips are left out of pytest's per-test skip list and reported as **one** line instead:
what did not run, and how to get it (`make test` as root with apt-get installs the tools and
removes them afterwards).

A pytest plugin (tests/conftest.py loads it; ``-p tests.toolcheck`` elsewhere).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Generator
from pathlib import Path

import pytest

LIST = Path(__file__).resolve().parent.parent / "tools" / "system-tools.txt"
PREFIX = "tool missing: "


def packages() -> dict[str, str]:
    """tool -> Debian package, from tools/system-tools.txt."""
    out: dict[str, str] = {}
    for line in LIST.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            out[parts[0]] = parts[1]
    return out


def strict() -> bool:
    return os.environ.get("CI") == "true"


def need_tool(tool: str) -> str:
    """The path of ``tool``; skip the test when it is missing (fail under CI=true)."""
    path = shutil.which(tool)
    if path is not None:
        return path
    pkg = packages().get(tool, tool)
    if strict():
        pytest.fail(f"{tool} is missing (CI=true: tools/systest.sh installs Debian's {pkg})")
    pytest.skip(f"{PREFIX}{tool} ({pkg})")


def _tool_of(report: pytest.TestReport) -> str | None:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        reason = str(lr[2]).removeprefix("Skipped: ")
        if reason.startswith(PREFIX):
            return reason[len(PREFIX) :]
    return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None]:
    """One line for every test a missing tool kept from running (not one per test)."""
    skipped = terminalreporter.stats.get("skipped", [])
    mine = [r for r in skipped if _tool_of(r) is not None]
    if mine:
        terminalreporter.stats["skipped"] = [r for r in skipped if _tool_of(r) is None]
    try:
        return (yield)
    finally:
        if mine:
            terminalreporter.stats["skipped"].extend(mine)
            counts = Counter(str(_tool_of(r)).split()[0] for r in mine)
            pkgs = packages()
            what = ", ".join(f"{t} ({n})" for t, n in sorted(counts.items()))
            debs = " ".join(sorted({pkgs.get(t, t) for t in counts}))
            terminalreporter.write_line(
                f"not run, {len(mine)} test(s) need missing tools: {what} -- `make test` as root with "
                f"apt-get installs them and removes them afterwards (Debian: {debs})",
                yellow=True,
            )
