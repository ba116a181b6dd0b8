"""The supervisor's rooms (issue 21 item 4): one job each, none over ~500 lines, no import running
back up a layer; and `why --reload`'s advice pure in model/, its renderer in render/. Read from the
source; nothing runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "rebind"
ROOMS = sorted(p.relative_to(SRC).as_posix() for p in (SRC / "supervisor").glob("*.py"))
# machine.py re-exports its vocabulary (vocab.py) one name a line so that callers keep one name
# for the machine's interface (`m.Ready`, `m.step`): those lines are not logic.
REEXPORTS = {"supervisor/machine.py": "from rebind.supervisor.vocab import "}


def _imports(rel: str) -> set[str]:
    """Every rebind module imported anywhere in the file (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse((SRC / rel).read_text(), rel)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rebind"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("rebind"))
    return out


@pytest.mark.parametrize("rel", ROOMS)
def test_no_room_over_500_lines(rel: str) -> None:
    lines = (SRC / rel).read_text().splitlines()
    prefix = REEXPORTS.get(rel)
    logic = [line for line in lines if prefix is None or not line.startswith(prefix)]
    assert len(logic) <= 500, len(logic)


@pytest.mark.parametrize(
    ("rel", "never"),
    [
        *((r, ("rebind.cli", "rebind.top", "rebind.exporter", "rebind.render")) for r in ROOMS),
        ("supervisor/machine.py", ("rebind.kernel", "rebind.supervisor.run", "rebind.supervisor.generations")),
        ("supervisor/vocab.py", ("rebind.kernel", "rebind.supervisor.machine", "rebind.supervisor.run")),
        ("model/reload.py", ("rebind.kernel", "rebind.cli", "rebind.render", "rebind.supervisor", "rebind.sockets")),
        ("render/reload.py", ("rebind.cli", "rebind.top", "rebind.kernel", "rebind.supervisor")),
        ("kernel/reload_facts.py", ("rebind.cli", "rebind.render", "rebind.supervisor")),
    ],
)  # fmt: skip
def test_no_import_runs_back_up(rel: str, never: tuple[str, ...]) -> None:
    bad = sorted(m for m in _imports(rel) if m.startswith(never))
    assert bad == [], f"{rel} imports {bad}"


def test_the_machine_and_its_vocabulary_do_no_io() -> None:
    """The state machine is pure (h11's style): no os, socket, selectors, time or subprocess."""
    for rel in ("supervisor/machine.py", "supervisor/vocab.py", "model/reload.py"):
        tree = ast.parse((SRC / rel).read_text(), rel)
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"os", "socket", "selectors", "time", "subprocess", "fcntl"}, (rel, names)
