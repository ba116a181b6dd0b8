"""No import runs back up (issue 21): only the CLI (and the `python -m rebind` entry) imports
rebind.cli, and the renderers the CLI and the TUI share import neither of them nor Textual.

Every import counts, the lazy ones inside functions too (they are how a module reaches up)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent.parent / "src" / "rebind"

#: Imports still running up (file, module), each to be removed; empty: none.
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules(under: str = "") -> list[tuple[str, set[str]]]:
    root = SRC / under if under else SRC
    return [(str(p.relative_to(SRC)), _imports(p)) for p in sorted(root.rglob("*.py"))]


def _hits(mods: set[str], prefix: str) -> set[str]:
    return {m for m in mods if m == prefix or m.startswith(prefix + ".")}


def test_only_the_cli_imports_the_cli() -> None:
    found = {
        (rel, m)
        for rel, mods in _modules()
        if not rel.startswith("cli/") and rel != "__main__.py"
        for m in _hits(mods, "rebind.cli")
    }
    assert found <= KNOWN, sorted(found - KNOWN)


def test_renderers_import_no_front_end() -> None:
    for rel, mods in _modules("render"):
        for front in ("rebind.cli", "rebind.top", "textual"):
            assert not _hits(mods, front), (rel, front)


def test_the_model_imports_no_layer_above() -> None:
    """model/ is pure: no I/O adapter, no renderer (rebind.connect/1 lives in render/connect.py),
    no front end."""
    above = ("rebind.kernel", "rebind.render", "rebind.cli", "rebind.top", "rebind.actions")
    for rel, mods in _modules("model"):
        for layer in above:
            assert not _hits(mods, layer), (rel, layer)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    """The walk finds an import inside a function, the way top/keys.py reached cli/why."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rebind.cli.why import print_diagnosis\n")
    assert _hits(_imports(f), "rebind.cli") == {"rebind.cli.why"}
