"""The public API: every name in `rebind.__all__` resolves, `import rebind` stays cheap, and the
documentation's Python examples use only public names."""

from __future__ import annotations

import ast
import enum
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rebind

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_public_name_resolves_to_its_home() -> None:
    """Each name is the object its ``_LAZY`` module defines (not None, not a stale copy), and
    that object is rebind's own."""
    assert rebind.__all__[0] == "__version__" and re.fullmatch(r"\d+\.\d+\.\d+\S*", rebind.__version__)
    for name in rebind.__all__[1:]:
        value = getattr(rebind, name)
        assert value is getattr(importlib.import_module(rebind._LAZY[name]), name), name
        assert value.__module__.startswith("rebind."), (name, value.__module__)
    with pytest.raises(AttributeError):
        rebind.no_such_name  # noqa: B018


def test_type_checkers_see_the_names_the_runtime_gives() -> None:
    """The ``if TYPE_CHECKING:`` imports (what mypy and IDEs see) name the same module for every
    public name as ``_LAZY`` (what ``rebind.NAME`` resolves at run time)."""
    tree = ast.parse(Path(rebind.__file__).read_text())
    static: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                static.update((a.asname or a.name, imp.module) for a in imp.names)
    assert static == rebind._LAZY


def test_errors_enums_and_result_types_are_exported() -> None:
    for name in ("RebindError", "UsageError", "EnvironmentProblem", "KernelError"):
        assert issubclass(getattr(rebind, name), rebind.RebindError), name
    for name in ("Fault", "ExitCode", "Proto", "State", "Verdict", "Fate", "Refusal"):
        assert issubclass(getattr(rebind, name), enum.Enum), name
    for name in ("SocketTable", "SocketEntry", "Owner", "Diagnosis", "BindRequest", "FreePlan", "FreeResult"):
        assert isinstance(getattr(rebind, name), type), name
    for name in ("WaitResult", "PickedPort", "InheritedSocket"):
        assert isinstance(getattr(rebind, name), type), name
    assert callable(rebind.execute_plan)
    # the exit code the CLI would use travels with the error
    assert rebind.UsageError("x").exit_code == rebind.ExitCode.USAGE


def test_import_is_lazy_and_loads_no_heavy_library() -> None:
    code = (
        "import sys, rebind\n"
        "print(sorted(m for m in sys.modules if m.startswith('rebind.')))\n"
        "print(sorted(m for m in ('click', 'rich', 'psutil') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['rebind._version']", "[]"]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_documentation_examples_use_only_public_names() -> None:
    public = set(rebind.__all__)
    found = 0
    for doc in DOCS:
        for block in _python_blocks(doc.read_text()):
            for name in re.findall(r"\brebind\.(\w+)", block):
                found += 1
                assert name in public, f"{doc.name}: rebind.{name} is not a public name"
            for stmt in re.findall(r"^\s*from rebind(\.[\w.]+)? import", block, flags=re.M):
                assert not stmt, f"{doc.name}: imports from the internal module rebind{stmt}"
    assert found > 10  # the check saw the examples


def test_the_doc_check_would_catch_an_internal_module() -> None:
    block = _python_blocks("```python\nimport rebind\nrebind.actions.free.execute_plan(p)\n```\n")[0]
    assert [n for n in re.findall(r"\brebind\.(\w+)", block) if n not in rebind.__all__] == ["actions"]


def test_the_pytest_plugin_is_opt_in() -> None:
    """Installing rebind registers nothing in other projects' test runs (no pytest11 entry point)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "pytest11" not in project.get("entry-points", {})
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert 'pytest_plugins = ["rebind.pytest_plugin"]' in conftest  # our own suite opts in
