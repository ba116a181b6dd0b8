"""Every public name resolves, and `import rebind` loads none of them eagerly."""

from __future__ import annotations

import subprocess
import sys

import rebind


def test_every_lazy_name_resolves():
    for name in rebind._LAZY:
        assert callable(getattr(rebind, name)), name
    assert set(rebind._LAZY) <= set(dir(rebind))


def test_import_is_lazy():
    code = "import sys, rebind; print(sorted(m for m in sys.modules if m.startswith('rebind.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['rebind._version']"
