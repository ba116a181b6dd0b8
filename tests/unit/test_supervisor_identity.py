"""Is a process a `rebind run`? One answer (supervisor/client.py) for top and reload --pid-file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rebind.errors import UsageError
from rebind.supervisor.client import looks_like_run, supervisor_pid


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (("rebind", "run", "--", "app"), True),
        (("/usr/bin/python3", "-m", "rebind", "run", "-p", "80", "--", "srv"), True),
        (("/opt/venv/bin/rebind", "run", "x"), True),
        (("rebind", "top"), False),
        (("run", "app"), False),  # not rebind's
        (("nginx", "-g", "daemon off;"), False),
    ],
)
def test_looks_like_run(argv: tuple[str, ...], want: bool) -> None:
    assert looks_like_run(argv) is want


def _fake_proc(tmp_path: Path, pid: int, argv: list[bytes]) -> str:
    (tmp_path / "proc" / str(pid)).mkdir(parents=True)
    (tmp_path / "proc" / str(pid) / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    return str(tmp_path / "proc")


def test_a_pid_file_naming_a_rebind_run_gives_its_pid(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, 4321, [b"/usr/bin/python3", b"-m", b"rebind", b"run", b"--", b"app"])
    (tmp_path / "app.pid").write_text("4321\n")
    assert supervisor_pid(str(tmp_path / "app.pid"), proc) == 4321


def test_a_stale_pid_file_is_refused(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, 4321, [b"sshd:", b"\xff-not-utf8"])  # the pid was reused
    (tmp_path / "app.pid").write_text("4321\n")
    with pytest.raises(UsageError, match="pid 4321 is not a `rebind run` process"):
        supervisor_pid(str(tmp_path / "app.pid"), proc)
    (tmp_path / "gone.pid").write_text("999999\n")
    with pytest.raises(UsageError, match="no running supervisor"):
        supervisor_pid(str(tmp_path / "gone.pid"), proc)
    with pytest.raises(UsageError, match="no running supervisor"):
        supervisor_pid(os.fspath(tmp_path / "missing.pid"), proc)
