"""`rebind run` under hostile conditions (issue 8): each test fails on the code before the fix."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rebind.supervisor import control
from tests.conftest import Procs

NOBODY = 65534


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start(
    procs: Procs, tmp: Path, port: int, cmd: list[str], *extra: str, **popen: object
) -> tuple[subprocess.Popen[str], Path, str]:
    log, ctl = tmp / "supervisor.log", str(tmp / "ctl")
    args = [sys.executable, "-m", "rebind", "run", "--listen", f"127.0.0.1:{port}", "--control", ctl, *extra]
    popen.setdefault("stderr", log.open("w"))
    p = procs.start([*args, "--", *cmd], stdout=subprocess.DEVNULL, **popen)
    if popen["stderr"] is not subprocess.PIPE:
        _wait(lambda: "ready after" in log.read_text() or p.poll() is not None, "generation 1 ready")
        assert p.poll() is None, log.read_text()
    return p, log, ctl


def _pids(report: Path, generation: int) -> set[int]:
    lines = report.read_text().split() if report.exists() else []
    return {int(pid) for gen, _, pid in (x.partition(":") for x in lines) if gen == str(generation)}


# Every process records "generation:pid" in REPORT, then serves with blocking accept().
REPORT_PRELUDE = (
    "import os, signal, socket, sys, time\n"
    "def report():\n"
    "    with open(os.environ['REPORT'], 'a') as f:\n"
    "        f.write(f\"{os.environ['REBIND_GENERATION']}:{os.getpid()}\\n\")\n"
)
# fd 3 directly: under `sh -c '... & wait'` LISTEN_PID is sh's pid, so sd_listen_fds would refuse.
SERVER = (
    REPORT_PRELUDE + "s = socket.socket(fileno=3)\nreport()\n"
    "while True:\n    c, _ = s.accept(); c.sendall(b'hi\\n'); c.close()\n"
)
# A pre-fork parent that exits at once on SIGTERM; its workers ignore SIGTERM, one of them
# leaves the process group and the session (setsid) as daemons do.
PREFORK = (
    REPORT_PRELUDE + "s = socket.socket(fileno=3)\nos.environ.pop('LISTEN_PID')\n"
    "for i in range(2):\n"
    "    if os.fork() == 0:\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        if i: os.setsid()\n"
    "        report()\n"
    "        while True:\n            c, _ = s.accept(); c.sendall(b'hi\\n'); c.close()\n"
    "report()\n"
    "signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
    "while True: time.sleep(1)\n"
)


@pytest.mark.parametrize("kind", ["sh-wrapper", "prefork"])
def test_reload_leaves_no_process_of_the_old_generation(
    netns: int, procs: Procs, tmp_path: Path, kind: str
) -> None:
    """Issue 8 item 4: the leader exits at once on SIGTERM; what it started must go too."""
    report = tmp_path / "report"
    (tmp_path / "app.py").write_text(SERVER if kind == "sh-wrapper" else PREFORK)
    app = f"{sys.executable} {tmp_path / 'app.py'}"
    cmd = (
        ["sh", "-c", f"{app} & wait"] if kind == "sh-wrapper" else [sys.executable, str(tmp_path / "app.py")]
    )
    env = dict(os.environ, REPORT=str(report))
    sup, log, ctl = _start(procs, tmp_path, 8101, cmd, "--grace", "1", env=env)
    _wait(lambda: len(_pids(report, 1)) == (1 if kind == "sh-wrapper" else 3), "generation 1 reported")
    old = _pids(report, 1)
    for pid in old:
        procs.adopt(pid)
    assert control.send(ctl, "reload", 60).startswith("ok: generation 2"), log.read_text()
    _wait(lambda: not any(_alive(p) for p in old), f"old generation {old} gone\n{log.read_text()}")
    with socket.create_connection(("127.0.0.1", 8101), timeout=10) as c:
        assert c.recv(8) == b"hi\n"
    assert _alive(sup.pid)


def test_pid_file_never_follows_a_planted_symlink(netns: int, procs: Procs, tmp_path: Path) -> None:
    """Issue 8 item 1: nobody plants symlinks for the next pids' temporary names (and the pid
    file itself) pointing at a root-only file; rebind run must leave that file untouched."""
    shared = Path(tempfile.mkdtemp(prefix="rebind-pidfile-", dir="/tmp"))
    try:
        shared.chmod(0o777)  # writable by everyone, like /run/user dirs or a shared /var/run
        secret = tmp_path / "secret"
        secret.write_text("precious\n")
        secret.chmod(0o600)
        pid_file = shared / "app.pid"
        # One planting process (a loop of `ln` would use up the very pids it plants for).
        plant = "import os, sys\nfor n in sys.argv[2:]:\n    os.symlink(sys.argv[1], n)\n"
        last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
        pids = range(last, last + 1500)
        names = [f"{pid_file}.{pid}.tmp" for pid in pids] + [str(pid_file)]
        subprocess.run(
            ["/usr/bin/python3", "-c", plant, str(secret), *names], user=NOBODY, group=NOBODY, check=True
        )
        assert os.lstat(names[0]).st_uid == NOBODY
        app = "import os, sys\nprint(open(sys.argv[1]).read().strip(), flush=True)\n"
        r = subprocess.run(
            [
                *(sys.executable, "-m", "rebind", "run", "--listen", "127.0.0.1:8102"),
                *("--pid-file", str(pid_file), "--ready", "none", "--restart", "no"),
                *("--", sys.executable, "-c", app, str(pid_file)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert secret.read_text() == "precious\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) in pids  # the app read the supervisor's pid: a name we planted
        assert not pid_file.exists() and not pid_file.is_symlink()  # removed at exit
    finally:
        for entry in shared.iterdir():
            entry.unlink()
        shared.rmdir()


def test_closed_stderr_reader_does_not_stop_the_supervisor(netns: int, procs: Procs, tmp_path: Path) -> None:
    """Issue 8 item 5: `rebind run ... 2>&1 | head`: the reader goes away, the service stays."""
    (tmp_path / "app.py").write_text(SERVER)
    env = dict(os.environ, REPORT=str(tmp_path / "report"))
    cmd = [sys.executable, str(tmp_path / "app.py")]
    sup, _, ctl = _start(procs, tmp_path, 8103, cmd, "--grace", "1", stderr=subprocess.PIPE, env=env)
    assert sup.stderr is not None
    seen = ""
    while "ready after" not in seen:
        line = sup.stderr.readline()
        assert line, "supervisor exited"
        seen += line
    sup.stderr.close()  # the log reader is gone: every later write gets EPIPE
    for n in (2, 3):
        assert control.send(ctl, "reload", 60).startswith(f"ok: generation {n}")
    assert sup.poll() is None
    # SERVER dies at SIGTERM with what it accepted: let the replaced ones go before connecting.
    old = _pids(tmp_path / "report", 1) | _pids(tmp_path / "report", 2)
    _wait(lambda: not any(_alive(p) for p in old), "generations 1 and 2 gone")
    with socket.create_connection(("127.0.0.1", 8103), timeout=10) as c:
        assert c.recv(8) == b"hi\n"


def test_non_utf8_environment_and_argv_pass_through(netns: int, procs: Procs, tmp_path: Path) -> None:
    """Issue 8 item 8: bytes that are not UTF-8 reach the app unchanged."""
    out = tmp_path / "out"
    app = "import os, sys\nopen(sys.argv[1], 'wb').write(repr((os.environb[b'ODD'], os.fsencode(sys.argv[2]))).encode())\n"
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    env[b"ODD"] = b"a\xffb"
    args = [
        sys.executable.encode(),
        b"-m",
        b"rebind",
        b"run",
        b"--listen",
        b"127.0.0.1:8104",
        b"--ready",
        b"none",
    ]
    args += [b"--restart", b"no", b"--", sys.executable.encode(), b"-c", app.encode(), bytes(out), b"x\xffy"]
    r = subprocess.run(args, env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == repr((b"a\xffb", b"x\xffy")).encode()


DAEMON = (
    REPORT_PRELUDE + "s = socket.socket(fileno=3)\nos.environ.pop('LISTEN_PID')\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:  # a daemonized grandchild that keeps the listening socket\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        report()\n"
    "        while True:\n            c, _ = s.accept(); c.close()\n"
    "    os._exit(0)\n"
    "report()\n"
    "while True:\n    c, _ = s.accept(); c.sendall(b'hi\\n'); c.close()\n"
)


def test_sigkill_of_rebind_run_frees_the_port(netns: int, procs: Procs, tmp_path: Path) -> None:
    """Issue 8 item 10: nothing of the generations keeps the port once rebind run is killed."""
    report = tmp_path / "report"
    (tmp_path / "app.py").write_text(DAEMON)
    env = dict(os.environ, REPORT=str(report))
    sup, log, _ = _start(procs, tmp_path, 8105, [sys.executable, str(tmp_path / "app.py")], env=env)
    _wait(lambda: len(_pids(report, 1)) == 2, "leader and daemon reported")
    for pid in _pids(report, 1):
        procs.adopt(pid)
    assert not _bindable(8105)
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(10)
    _wait(lambda: _bindable(8105), f"port 8105 bindable again\n{log.read_text()}")
    _wait(lambda: not any(_alive(p) for p in _pids(report, 1)), "generation processes gone")


def test_idle_control_clients_time_out_and_emfile_does_not_crash(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    """Issue 8 item 11: idle clients fill the fd table (EMFILE in accept); the supervisor logs it
    once, keeps serving, drops the idle clients and answers a reload afterwards."""
    import resource

    (tmp_path / "app.py").write_text(SERVER)
    env = dict(os.environ, REPORT=str(tmp_path / "report"))

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    cmd = [sys.executable, str(tmp_path / "app.py")]
    sup, log, ctl = _start(procs, tmp_path, 8106, cmd, "--grace", "1", env=env, preexec_fn=few_fds)
    idle = []
    for _ in range(24):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(ctl)  # unix stream: connected at once, or EAGAIN when the backlog is full
        except OSError:
            c.close()
            continue
        idle.append(c)
    try:
        _wait(lambda: "pausing it" in log.read_text(), "EMFILE logged", timeout=10)
        assert sup.poll() is None, log.read_text()
        for c in idle:  # the supervisor closes them once idle for too long
            c.setblocking(True)
            c.settimeout(30)
            try:
                assert c.recv(16) in (b"", b"failed: busy\n")
            except ConnectionResetError:
                pass  # closed by the supervisor too
    finally:
        for c in idle:
            c.close()
    assert control.send(ctl, "reload", 60).startswith("ok: generation 2"), log.read_text()
    assert log.read_text().count("pausing it") <= 3  # once per shortage, not once per attempt
    assert sup.poll() is None


def test_ready_flood_is_logged_once_and_does_not_slow_reloads(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    """Issue 8 item 21: thousands of READY=1 from an outsider: one log line, reloads still work."""
    (tmp_path / "app.py").write_text(SERVER)
    env = dict(os.environ, REPORT=str(tmp_path / "report"))
    sup, log, ctl = _start(procs, tmp_path, 8107, [sys.executable, str(tmp_path / "app.py")], env=env)
    _wait(lambda: bool(_pids(tmp_path / "report", 1)), "generation 1 reported")
    leader = min(_pids(tmp_path / "report", 1))
    environ = Path(f"/proc/{leader}/environ").read_bytes().split(b"\0")
    addr = next(e for e in environ if e.startswith(b"NOTIFY_SOCKET=")).split(b"=", 1)[1].decode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        sent = 0
        for _ in range(5000):
            try:
                s.sendto(b"READY=1", "\0" + addr[1:])
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
    assert sent > 1000
    assert control.send(ctl, "reload", 60).startswith("ok: generation 2")
    text = log.read_text()
    assert text.count(f"ignoring READY=1 from pid {os.getpid()}") == 1, text[-2000:]
    assert len(text) < 20_000 and sup.poll() is None
