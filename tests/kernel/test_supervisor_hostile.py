"""`rebind run` against a hostile local user and a full fd table (issue 18): each test fails on the
code before its fix. The hostile user is uid 65534 via setpriv; its scripts do not import rebind."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Procs
from tests.kernel.test_supervisor_safety import SERVER, _start, _wait

NOBODY = ["--reuid", "65534", "--regid", "65534", "--clear-groups"]

# The audit's lingerfd.py (appendix): a TCP socket with SO_LINGER {1, 3600} and a send queue its
# peer never drains, passed with SCM_RIGHTS to NAME. "nested" passes instead a unix socket whose
# receive queue holds that TCP socket: releasing the unix socket releases the TCP one.
LINGERFD = r"""
import socket, struct, sys, time
target, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket(); srv.bind(("127.0.0.1", port)); srv.listen(1)
c = socket.create_connection(("127.0.0.1", port)); peer, _ = srv.accept()
peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
c.setblocking(False)
try:
    while True: c.send(b"x" * 65536)
except BlockingIOError: pass
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
fd = c.fileno()
if mode == "nested":
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    fd = b.fileno()
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
u.sendmsg([b"X=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, "\0" + target.lstrip("@"))
print("sent", flush=True)
c.close()  # (nested: if the receiver has let go of b already, this close is the one that waits)
if mode == "nested":
    a.close(); b.close()
time.sleep(120)  # keep the peer (never reading) alive
"""


def _setpriv() -> str:
    found = shutil.which("setpriv")
    if found is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return found


def _notify_name(pid: int) -> str:
    text = Path("/proc/net/unix").read_text()
    names = re.findall(rf"@rebind/notify/{pid}/[0-9a-f]+", text)
    assert names, f"no notify socket of pid {pid} in /proc/net/unix"
    return names[0]


def _reload(rebind_cli: Callable[..., subprocess.CompletedProcess[str]], ctl: str) -> str:
    res = rebind_cli("reload", "--control", ctl, "--timeout", "10", timeout=30)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout


@pytest.mark.parametrize("mode", ["direct", "nested"])
def test_lingering_socket_passed_to_notify_does_not_freeze_the_supervisor(
    netns: int,
    procs: Procs,
    tmp_path: Path,
    rebind_cli: Callable[..., subprocess.CompletedProcess[str]],
    mode: str,
) -> None:
    """Issue 18 item 7 (audit M2): the supervisor's close() of a passed lingering socket slept for
    up to an hour in the kernel; `rebind reload --control` then gave `no answer ... within 10s`."""
    setpriv = _setpriv()
    (tmp_path / "app.py").write_text(SERVER)
    env = dict(os.environ, REPORT=str(tmp_path / "report"))
    sup, log, ctl = _start(procs, tmp_path, 8400, [sys.executable, str(tmp_path / "app.py")], env=env)
    name = _notify_name(sup.pid)
    attacker = procs.start([setpriv, *NOBODY, "/usr/bin/python3", "-c", LINGERFD, name, "8401", mode])
    assert procs.wait_line(attacker) == "sent"
    _wait(lambda: "to the notify socket" in log.read_text(), "the passed fd handled")
    assert "ok: generation 2 ready after" in _reload(rebind_cli, ctl), log.read_text()
    text = log.read_text()
    assert "closed 1 fd(s) passed by pid" in text and "(uid 65534)" in text, text
    assert sup.poll() is None


@pytest.mark.parametrize("count", ["2", "2147483647"])
def test_non_socket_fds_in_listen_fds_are_skipped_with_their_number(
    netns: int, procs: Procs, tmp_path: Path, count: str
) -> None:
    """Issue 18, audit L3: fd 3 a regular file (and fd 4 a stray pipe end, or LISTEN_FDS absurdly
    large) stopped `rebind run` with `[Errno 88] Socket operation on non-socket`, exit 3."""
    (tmp_path / "app.py").write_text(SERVER)
    (tmp_path / "plain").write_text("not a socket\n")
    log, ctl = tmp_path / "supervisor.log", str(tmp_path / "ctl")
    script = (
        'exec 3<"$PLAIN" 4</dev/null; LISTEN_PID=$$ LISTEN_FDS=$COUNT exec "$PY" -m rebind run'
        ' --listen 127.0.0.1:8410 --control "$CTL" -- "$PY" "$APP"'
    )
    env = dict(
        os.environ,
        PLAIN=str(tmp_path / "plain"),
        COUNT=count,
        PY=sys.executable,
        CTL=ctl,
        APP=str(tmp_path / "app.py"),
        REPORT=str(tmp_path / "report"),
    )
    sup = procs.start(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    _wait(lambda: "ready after" in log.read_text() or sup.poll() is not None, "generation 1 ready")
    text = log.read_text()
    assert sup.poll() is None, text
    assert "passed fd 3 (unnamed) is not a socket" in text, text
    assert "passed fd 4 (unnamed) is not a socket" in text, text
    with socket.create_connection(("127.0.0.1", 8410), timeout=10) as c:
        assert c.recv(8) == b"hi\n"


def test_busy_udp_port_under_run_is_explained_as_udp(
    netns: int, procs: Procs, rebind_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """Issue 18 item 14: `--listen udp:...` on a busy port was explained by TCP's rules
    ("8420/tcp is free: bind() works now and so will listen()")."""
    holder = procs.python(
        "import socket, time\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "u.bind(('127.0.0.1', 8420))\nprint('ready', flush=True)\ntime.sleep(600)\n"
    )
    assert procs.wait_line(holder) == "ready"
    res = rebind_cli("run", "--listen", "udp:127.0.0.1:8420", "--", "true", timeout=60)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one line, no traceback
    assert "Address already in use" in res.stderr and "8420/udp is busy" in res.stderr, res.stderr
    assert "/tcp" not in res.stderr and "listen()" not in res.stderr, res.stderr
    assert f"pid {holder.pid}" in res.stderr, res.stderr
