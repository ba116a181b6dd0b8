"""The public API: every name in `rebind.__all__` resolves, `import rebind` stays cheap, and the
documentation's Python examples use only public names."""

from __future__ import annotations

import enum
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rebind

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_public_name_resolves() -> None:
    for name in rebind.__all__:
        assert getattr(rebind, name) is not None, name
    assert set(rebind.__all__) <= set(dir(rebind))
    with pytest.raises(AttributeError):
        rebind.no_such_name  # noqa: B018


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
