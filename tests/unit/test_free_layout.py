"""The free path's rooms (issue 21 items 3, 4): one job each, no import running back up a
layer, none over ~500 lines, and each read top-down in one pass (a reader following the calls
from the entry points never climbs back up the file). Read from the source; nothing runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "rebind"
FREE_PATH = [
    "actions/free.py",
    "actions/free_signal.py",
    "model/free.py",
    "model/free_collateral.py",
    "model/free_escalation.py",
    "model/free_result.py",
    "render/free.py",
    "cli/free.py",
]


def _tree(rel: str) -> ast.Module:
    return ast.parse((SRC / rel).read_text(), rel)


def _imports(rel: str) -> set[str]:
    """Every rebind module imported anywhere in the file (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rebind"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("rebind"))
    return out


@pytest.mark.parametrize("rel", FREE_PATH)
def test_no_room_over_500_lines(rel: str) -> None:
    assert len((SRC / rel).read_text().splitlines()) <= 500


@pytest.mark.parametrize(
    ("rel", "never"),
    [
        *((m, ("rebind.kernel", "rebind.actions", "rebind.cli", "rebind.top", "rebind.render", "rebind.diagnosis"))
          for m in FREE_PATH if m.startswith("model/")),
        ("render/free.py", ("rebind.cli", "rebind.top", "rebind.actions", "rebind.kernel")),
        ("diagnosis.py", ("rebind.actions", "rebind.cli", "rebind.top")),
        ("actions/free.py", ("rebind.cli", "rebind.top", "rebind.render")),
        ("actions/free_signal.py", ("rebind.cli", "rebind.top", "rebind.render")),
        ("top/keys.py", ("rebind.cli.free",)),
    ],
)  # fmt: skip
def test_no_import_runs_back_up(rel: str, never: tuple[str, ...]) -> None:
    bad = sorted(m for m in _imports(rel) if m.startswith(never))
    assert bad == [], f"{rel} imports {bad}"


def _climbs_back(rel: str) -> list[str]:
    """Walk the module's calls depth-first from its public functions (in file order): each step to
    a function not read yet should go down the file, never back up."""
    tree = _tree(rel)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}

    def callees(fn: ast.AST) -> list[str]:
        calls = [
            (c.lineno, c.col_offset, c.func.id)
            for c in ast.walk(fn)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in funcs
        ]
        seen: list[str] = []
        for *_, name in sorted(calls):
            if name not in seen:
                seen.append(name)
        return seen

    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        order.append(name)
        for callee in callees(funcs[name]):
            visit(callee)

    # The entry points first (public functions no other function here calls), then the rest.
    called = {c for fn in funcs.values() for c in callees(fn)}
    public = [n for n in funcs if not n.startswith("_")]
    for name in [n for n in public if n not in called] + public:
        visit(name)
    lines = [funcs[n].lineno for n in order]
    return [f"{a} -> {b}" for a, b, x, y in zip(order, order[1:], lines, lines[1:], strict=False) if y < x]


@pytest.mark.parametrize("rel", FREE_PATH)
def test_each_room_reads_top_down_in_one_pass(rel: str) -> None:
    assert _climbs_back(rel) == []
