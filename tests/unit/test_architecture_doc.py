"""docs/architecture.md's tables stay true: every module they name exists, no question twice.

The tables are where a reader looks up "where does X live"; a room that moved or was split
must take its row along (issue 21: "say where in docs/architecture.md, which then is true").
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "rebind"
DOC = ROOT / "docs" / "architecture.md"

#: First path segments that name a room of the package (src/rebind/...) or of the repository.
ROOMS = {"cli", "render", "actions", "supervisor", "exporter", "top", "kernel", "model", "data"}
REPO_DIRS = {"bench", "docs", "tests", "tools"}

# `kernel/facts.py: gather(request)`, `actions/free.host_facts`, `kernel/bpf/sockiter.py`
PATH = re.compile(r"(?<![\w./*])((?:[a-z_0-9]+/)+[a-z_0-9]+)(\.(?:py|toml|md))?")
# `families.py` alone: a file beside another module the same row names.
BARE = re.compile(r"(?<![\w./])([a-z_0-9]+\.py)\b")
# `rebind.diagnosis.default_request`, `rebind.sockets` (not a schema name like `rebind.ls/1`).
DOTTED = re.compile(r"(?<![\w./])rebind((?:\.[a-z_0-9]+)+)(?![\w/])")


def table_rows(text: str) -> list[str]:
    """The body rows of every table (header and |---| lines left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [
        r for r in rows if not set(r) <= set("|-: ") and not r.startswith(("| concept |", "| question |"))
    ]


def names_in(row: str) -> tuple[list[Path], list[str]]:
    """The files a row names (resolved), and the names that resolve to nothing."""
    found: list[Path] = []
    missing: list[str] = []
    chunks = re.findall(r"`([^`]+)`", row)
    for chunk in chunks:
        for m in PATH.finditer(chunk):
            path, ext = m.group(1), m.group(2) or ".py"
            first = path.split("/", 1)[0]
            if first in ROOMS:
                candidate = PACKAGE / (path + ext)
            elif first in REPO_DIRS:
                candidate = ROOT / (path + ext)
            else:
                continue  # /proc paths, schema names (rebind.ls/1), [ADDR:]PORT[/udp]
            if candidate.is_file():
                found.append(candidate)
            else:
                missing.append(path + ext)
        for m in DOTTED.finditer(chunk):
            parts = m.group(1).lstrip(".").split(".")
            if not any(
                (PACKAGE.joinpath(*parts[:n]).with_suffix(".py")).is_file()
                or (PACKAGE.joinpath(*parts[:n]) / "__init__.py").is_file()
                for n in range(len(parts), 0, -1)
            ):
                missing.append(m.group(0))
    dirs = {p.parent for p in found}
    for chunk in chunks:
        for m in BARE.finditer(chunk):
            if not any((d / m.group(1)).is_file() for d in dirs):
                missing.append(m.group(1))
    return found, missing


def test_every_module_the_tables_name_exists() -> None:
    rows = table_rows(DOC.read_text())
    assert len(rows) >= 10  # both tables parsed
    named: list[Path] = []
    missing: list[str] = []
    for row in rows:
        found, gone = names_in(row)
        named += found
        missing += gone
    assert len(named) >= 30  # the parser sees the paths (not vacuously green)
    assert missing == []


def test_no_question_or_concept_listed_twice() -> None:
    firsts = [row.split("|")[1].strip() for row in table_rows(DOC.read_text())]
    assert len(firsts) == len(set(firsts)), sorted(f for f in firsts if firsts.count(f) > 1)


def test_the_parser_catches_a_missing_module() -> None:
    row = "| q | `model/nosuch.py` | `kernel/walk.py: walk(query)`, `gone.py`, `rebind.nosuch.f` | `rebind.ls/1` |"
    found, missing = names_in(row)
    assert found == [PACKAGE / "kernel" / "walk.py"]
    assert missing == ["model/nosuch.py", "rebind.nosuch.f", "gone.py"]
