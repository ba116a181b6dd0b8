"""`rebind run` / `rebind reload` from the command line: bad input is one line, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Procs
from tests.kernel.helpers import LISTEN

Cli = Callable[..., subprocess.CompletedProcess[str]]

ORIGIN_REWRITTEN = """
import rebind

s = rebind.listen("0.0.0.0", 12345)
print("ready", flush=True)
(client, addr) = s.accept()
print(client)
print(addr)
"""


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(name))
    return out


def test_listen_without_port(netns: int, rebind_cli: Cli) -> None:
    r = rebind_cli("run", "--listen", "127.0.0.1", "--", "true")
    assert r.returncode == 2 and "no port" in _one_line(r)


def test_command_not_found(netns: int, rebind_cli: Cli) -> None:
    r = rebind_cli("run", "--listen", "127.0.0.1:8090", "--", "no-such-command-rebind")
    assert r.returncode == 2 and "command not found: no-such-command-rebind" in _one_line(r)


def test_port_in_use_by_someone_else(netns: int, procs: Procs, rebind_cli: Cli) -> None:
    holder = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=8091))
    assert procs.wait_line(holder) == "ready"
    r = rebind_cli("run", "--listen", "127.0.0.1:8091", "--", sys.executable, "-c", "pass")
    line = _one_line(r)
    assert r.returncode == 1 and "cannot listen on 127.0.0.1:8091" in line and "in use" in line
    assert holder.poll() is None  # the holder is untouched, and we started nothing


def test_reload_needs_a_target(netns: int, rebind_cli: Cli, tmp_path: Path) -> None:
    r = rebind_cli("reload")
    assert r.returncode == 2 and "--control" in _one_line(r)
    r = rebind_cli("reload", "--control", str(tmp_path / "none"))
    assert r.returncode == 2 and "no `rebind run` listens" in _one_line(r)


def test_run_reload_status_and_pid_file(netns: int, procs: Procs, rebind_cli: Cli, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("import rebind, signal\ns = rebind.listen('', 0)\nrebind.notify_ready()\nsignal.pause()\n")
    ctl, pid_file, log = tmp_path / "ctl", tmp_path / "pid", tmp_path / "log"
    args = ["-m", "rebind", "run", "--listen", "8092", "--control", str(ctl), "--pid-file", str(pid_file)]
    args += ["--ready", "notify"]  # the app never accepts: only READY=1 can make it ready
    sup = procs.start([sys.executable, *args, "--", sys.executable, str(app)], stderr=log.open("w"))
    while "ready after" not in log.read_text():
        assert sup.poll() is None, log.read_text()
        time.sleep(0.02)
    r = rebind_cli("reload", "--control", str(ctl))
    assert r.returncode == 0 and r.stdout.startswith("ok: generation 2"), r
    r = rebind_cli("reload", "--control", str(ctl), "--status")
    assert r.returncode == 0 and "serving: generation 2" in r.stdout
    r = rebind_cli("reload", "--pid-file", str(pid_file))
    assert r.returncode == 0, r.stderr
    while log.read_text().count("ready after") < 3:
        assert sup.poll() is None, log.read_text()
        time.sleep(0.02)
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.wait(30) == 0  # the app dies of the SIGTERM we forwarded: a clean stop
    assert not ctl.exists() and not pid_file.exists()
    assert _children_of(sup.pid) == []


def test_origin_post_server_rewritten(netns: int, procs: Procs, rebind_cli: Cli, tmp_path: Path) -> None:
    """The blog's server, with rebind.listen(): restarts at once despite TIME_WAIT, alone or supervised."""
    import socket

    (tmp_path / "server.py").write_text(ORIGIN_REWRITTEN)
    for _ in range(2):  # the second start is the one that failed with Errno 98 in the post
        p = procs.start([sys.executable, str(tmp_path / "server.py")])
        assert procs.wait_line(p) == "ready"
        with socket.create_connection(("127.0.0.1", 12345), timeout=10):
            pass
        assert p.wait(10) == 0  # server side closes first: its connection sits in TIME_WAIT
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "rebind", "run", "--listen", "12345", "--restart", "no"]
    sup = procs.start([*cmd, "--", sys.executable, str(tmp_path / "server.py")], stderr=log.open("w"))
    while "ready after" not in log.read_text():
        assert sup.poll() is None, log.read_text()
        time.sleep(0.02)
    with socket.create_connection(("127.0.0.1", 12345), timeout=10):
        pass
    assert sup.wait(30) == 0  # --restart no: the app's exit status is ours


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--listen", "²"), "no port"),
        (("--listen", "127.0.0.1:²"), "not a port"),
        (("--listen", "127.0.0.1:{port}", "--backlog", "99999999999"), "--backlog"),
        (("--listen", "127.0.0.1:{port}", "--backlog", "²"), "--backlog"),
        (("--listen", "127.0.0.1:{port}", "--grace", "inf"), "--grace"),
        (("--listen", "127.0.0.1:{port}", "--grace", "nan"), "--grace"),
        (("--listen", "127.0.0.1:{port}", "--ready-timeout", "1e10"), "--ready-timeout"),
        (("--listen", "127.0.0.1:{port}", "--backoff-max", "inf"), "--backoff-max"),
        (("--listen", "127.0.0.1:{port}", "--pid-file", "/nonexistent/dir/x.pid"), "--pid-file"),
        (("--listen", "127.0.0.1:{port}", "--drain", "nan"), "--drain"),
        (("--listen", "udp:127.0.0.1:²"), "not a port"),
        (("--listen", "udp:127.0.0.1:{port}", "--listen", "udp:127.0.0.1:{port}/b"), "twice"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_bound(
    netns: int, rebind_cli: Cli, tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    marker = tmp_path / "started"
    argv = [a.format(port=8093) for a in args]
    r = rebind_cli("run", *argv, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert r.returncode == 2 and needle in _one_line(r), r.stderr
    assert "listening on" not in r.stderr and not marker.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e12"])
def test_reload_timeout_is_validated(rebind_cli: Cli, tmp_path: Path, value: str) -> None:
    r = rebind_cli("reload", "--control", str(tmp_path / "ctl"), "--timeout", value)
    assert r.returncode == 2 and "--timeout" in _one_line(r)


def test_run_config_validates_durations_at_the_api() -> None:
    from rebind.errors import UsageError
    from rebind.supervisor.config import RunConfig
    from rebind.supervisor.spec import ListenSpec

    spec = (ListenSpec("127.0.0.1", 8080, "web"),)
    for bad in (
        {"grace": float("inf")},
        {"ready_timeout": float("nan")},
        {"backoff_max": 1e12},
        {"backlog": 2**40},
    ):
        with pytest.raises(UsageError):
            RunConfig(argv=("true",), listen=spec, **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "number"), [("TERM", 15), ("sigquit", 3), ("3", 3), (" WINCH ", 28)])
def test_stop_signal_parses(text: str, number: int) -> None:
    from rebind.supervisor.config import parse_signal

    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["NOPE", "0", "999", "²", "SIG", "__class__"])
def test_stop_signal_rejects(rebind_cli: Cli, text: str) -> None:
    r = rebind_cli("run", "--listen", "127.0.0.1:8094", "--stop-signal", text, "--", "true")
    assert r.returncode == 2 and "--stop-signal" in _one_line(r)


def test_app_that_binds_the_port_itself_gets_a_hint(netns: int, rebind_cli: Cli) -> None:
    app = "import socket\nsocket.socket().bind(('127.0.0.1', 8095))\n"  # Errno 98: rebind holds it
    r = rebind_cli("run", "--listen", "127.0.0.1:8095", "--", sys.executable, "-c", app)
    assert r.returncode == 1 and "Address already in use" in r.stderr
    assert "binds the port itself" in r.stderr and "never became ready" in r.stderr
