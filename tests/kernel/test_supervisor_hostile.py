"""`rebind run` against a hostile local user and a full fd table (issue 18): each test fails on the
code before its fix. The hostile user is uid 65534 via setpriv; its scripts do not import rebind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Procs
from tests.kernel.test_supervisor_safety import SERVER, _pids, _start, _wait

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


# A fake `rebind run` control server (as nobody): answers every client with a success line.
FAKE_CONTROL = r"""
import os, socket, sys
if sys.argv[1] == "fd":
    s = socket.socket(fileno=int(sys.argv[2]))  # bound by root, listen()ed by us (SO_PEERCRED: us)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.umask(0)
    s.bind(sys.argv[2])
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"ok: generation 9 ready after 0.001s (trust me)\n")
    except OSError:
        pass  # the client hung up first (refused us)
    c.close()
"""


@pytest.mark.parametrize("where", ["own-dir", "sticky-dir", "root-file"])
def test_reload_refuses_a_control_socket_served_by_another_user(
    netns: int,
    procs: Procs,
    tmp_path: Path,
    rebind_cli: Callable[..., subprocess.CompletedProcess[str]],
    where: str,
) -> None:
    """Issue 18 item 10: `rebind reload --control` believed any server at PATH. Now: the socket
    file, its directory and the server's SO_PEERCRED must be root's or the caller's."""
    setpriv = _setpriv()
    base = Path(tempfile.mkdtemp(prefix="rebind-ctl-", dir="/tmp"))
    try:
        extra: dict[str, object] = {}
        if where == "own-dir":  # a directory nobody owns (e.g. their home, or /tmp/x they made)
            os.chown(base, 65534, 65534)
            path = str(base / "ctl")
            args = ["path", path]
        elif where == "sticky-dir":  # a shared sticky directory like /tmp: nobody's socket file in it
            base.chmod(0o1777)
            path = str(base / "ctl")
            args = ["path", path]
        else:  # root's file in root's directory, but the listening end is nobody's: only
            # SO_PEERCRED tells (what a race between a path check and connect() would give)
            base.chmod(0o755)
            path = str(base / "ctl")
            bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bound.bind(path)
            extra = {"pass_fds": (bound.fileno(),)}
            args = ["fd", str(bound.fileno())]
        fake = procs.start([setpriv, *NOBODY, "/usr/bin/python3", "-c", FAKE_CONTROL, *args], **extra)
        assert procs.wait_line(fake) == "ready"
        if where == "root-file":
            bound.close()
            assert os.stat(path).st_uid == 0
        for extra_args in ((), ("--status",)):
            res = rebind_cli("reload", "--control", path, "--timeout", "5", *extra_args)
            assert res.returncode == 5, (res.returncode, res.stdout, res.stderr)
            assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
            assert res.stderr.startswith("rebind: error: refused: control socket "), res.stderr
            assert "trust me" not in res.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_both_control_clients_are_one_peer_checked_client(
    netns: int, procs: Procs, tmp_path: Path, rebind_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """top's `r` and `rebind reload` answer through supervisor/client.py: the real supervisor is
    trusted by both; top's expected pid is still checked."""
    from rebind.supervisor.client import NotTrusted
    from rebind.top.keys import Supervisor, control

    (tmp_path / "app.py").write_text(SERVER)
    env = dict(os.environ, REPORT=str(tmp_path / "report"))
    sup, _log, ctl = _start(procs, tmp_path, 8430, [sys.executable, str(tmp_path / "app.py")], env=env)
    assert control(Supervisor(sup.pid, ctl), "status", 10).startswith("ok: serving: generation 1")
    with pytest.raises(NotTrusted, match=f"served by pid {sup.pid}, not by the supervisor"):
        control(Supervisor(sup.pid + 100000, ctl), "status", 10)
    res = rebind_cli("reload", "--control", ctl, "--status")
    assert res.returncode == 0 and res.stdout.startswith("ok: serving: generation 1"), res


class _Filler:
    """Keeps the supervisor's fd table full with idle control clients (each accepted one holds an
    fd until the supervisor drops it after 5 s idle; a dropped one is replaced at once)."""

    def __init__(self, ctl: str) -> None:
        self.ctl = ctl
        self.clients: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for c in list(self.clients):
                try:
                    if c.recv(64, socket.MSG_DONTWAIT | socket.MSG_PEEK) is not None:
                        self.clients.remove(c)  # answered ("busy") or closed: replace it
                        c.close()
                except BlockingIOError:
                    pass  # still idle, still holding a slot
                except OSError:
                    self.clients.remove(c)
                    c.close()
            while len(self.clients) < 48:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                try:
                    c.connect(self.ctl)
                except OSError:
                    c.close()
                    break  # the backlog is full: the supervisor is not accepting
                self.clients.append(c)
            self.stop.wait(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for c in self.clients:
            c.close()


def _fds(pid: int) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]


def test_full_fd_table_does_not_stop_a_crash_restart(netns: int, procs: Procs, tmp_path: Path) -> None:
    """Issue 18 item 2 (audit H1, supervisor side): with its fd table full, `rebind run` could not
    restart a crashed app (`cannot start a process: Too many open files`, again and again) and the
    served port went dark. Its reserve fds now start the generation; the port answers."""
    import resource

    (tmp_path / "app.py").write_text(SERVER)
    report = tmp_path / "report"
    env = dict(os.environ, REPORT=str(report))
    cmd = [sys.executable, str(tmp_path / "app.py")]
    sup, log, ctl = _start(procs, tmp_path, 8440, cmd, "--grace", "1", env=env)
    _wait(lambda: bool(_pids(report, 1)), "generation 1 reported")
    open_now = _fds(sup.pid)
    limit = max(max(open_now) + 1, len(open_now) + 6)
    resource.prlimit(sup.pid, resource.RLIMIT_NOFILE, (limit, limit))
    filler = _Filler(ctl)
    try:
        _wait(lambda: "pausing it" in log.read_text(), "the supervisor's table full (accept paused)")
        assert len(_fds(sup.pid)) >= limit - 1
        os.kill(min(_pids(report, 1)), signal.SIGKILL)  # the app crashes
        _wait(lambda: "generation 2 (pid" in log.read_text(), f"generation 2 started\n{log.read_text()}", 30)
        _wait(lambda: bool(_pids(report, 2)), "generation 2 reported")
        _wait(lambda: "generation 2 ready after" in log.read_text(), f"generation 2 ready\n{log.read_text()}")
        with socket.create_connection(("127.0.0.1", 8440), timeout=10) as c:
            assert c.recv(8) == b"hi\n"
        assert len(_fds(sup.pid)) >= limit - 1  # still full: the reserve did it, not a lull
    finally:
        filler.close()
    text = log.read_text()
    assert "out of file descriptors (Too many open files) to start generation 2" in text, text
    assert sup.poll() is None


def _shape(line: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", line)


def test_documented_reload_sample_has_the_shape_of_real_output(
    netns: int, procs: Procs, tmp_path: Path, rebind_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """Issue 18 item 16 (supervisor part): docs/supervisor.md showed `ok: generation 5 (pid 4242)
    ready after ...`, a shape `rebind reload` never printed."""
    from rebind.supervisor.procscan import Serving

    doc = (Path(__file__).parents[2] / "docs" / "supervisor.md").read_text()
    block = doc.split("<!-- reload-sample", 1)[1].split("```", 2)[1].strip().splitlines()
    command, documented = block[0], block[1]
    assert command.startswith("$ rebind reload --control ")
    (tmp_path / "app.py").write_text(SERVER)
    env = dict(os.environ, REPORT=str(tmp_path / "report"))
    _sup, _log, ctl = _start(procs, tmp_path, 8450, [sys.executable, str(tmp_path / "app.py")], env=env)
    args = command.split()[2:]
    args[args.index("--control") + 1] = ctl  # the documented command, at this test's socket
    res = rebind_cli(*args)
    assert res.returncode == 0, res
    real = res.stdout.strip()
    hows = {_shape(str(Serving(1, how))) for how in ("accepted", "accept", "epoll", "poll", "select", "recv")}
    for line in (documented, real):
        head, sep, how = _shape(line).partition(" (")
        assert head == "ok: generation N ready after Ns" and sep, line
        assert how.removesuffix(")") in hows, line
