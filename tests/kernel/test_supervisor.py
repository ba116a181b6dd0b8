"""`rebind run` end to end, in a private network namespace with real processes and real load."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from rebind.supervisor import control
from tests.conftest import Procs

# An http.server app on rebind.listen(). MODE_FILE decides how the *next* generation behaves:
# ok | fail-start (exit 3 at start-up) | hang (never serves). SIGUSR1: crash between requests.
# APP_NOTIFY=1: send READY=1 once serving. SIGUSR2: send READY=1 (used to show READY=1 from the old generation does not count).
HTTP_APP = r"""
import os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
import rebind

mode = open(os.environ["MODE_FILE"]).read().strip()
if mode == "fail-start":
    sys.exit(3)
if mode == "hang":
    signal.pause()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(HTTPServer):
    crash = False

    def service_actions(self):
        if self.crash:
            os._exit(3)  # a crash, but between requests: nothing in flight is lost

srv = Server(("", 0), Handler, bind_and_activate=False)
srv.socket.close()
srv.socket = rebind.listen("127.0.0.1", int(os.environ["PORT"]))
# Graceful stop: finish the request in hand, leave queued connections to the next generation.
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
signal.signal(signal.SIGUSR1, lambda *a: setattr(srv, "crash", True))
signal.signal(signal.SIGUSR2, lambda *a: rebind.notify_ready())
if os.environ.get("APP_NOTIFY"):
    rebind.notify_ready()
srv.serve_forever(poll_interval=0.05)
"""

# The smallest serving app: blocking accept() on the inherited socket; dies on SIGTERM.
PLAIN_APP = r"""
import rebind
s = rebind.listen("127.0.0.1", 0)
while True:
    c, _ = s.accept()
    c.sendall(b"hi\n")
    c.close()
"""

# Serves with asyncio (epoll); spawns a grandchild that reports what it inherited.
ASYNC_APP = r"""
import asyncio, os, subprocess, sys
import rebind

async def handle(reader, writer):
    writer.write(b"async\n")
    await writer.drain()
    writer.close()

async def main():
    server = await rebind.start_server(handle, "127.0.0.1", int(os.environ["PORT"]))
    # close_fds=False: only close-on-exec protects the grandchild from our listening socket.
    subprocess.Popen([sys.executable, "-c", GRANDCHILD, os.environ["REPORT"]], close_fds=False)
    async with server:
        await server.serve_forever()

GRANDCHILD = '''
import os, sys
links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
         if os.path.exists(f"/proc/self/fd/{fd}")]
env = [k for k in os.environ if k.startswith("LISTEN_")]
open(sys.argv[1], "w").write(repr((links, env)))
'''
asyncio.run(main())
"""


class Supervised:
    def __init__(
        self, procs: Procs, tmp: Path, port: int, app: str, *extra: str, ready: str = "auto", **env: str
    ) -> None:
        self.tmp = tmp
        self.port = port
        self.ctl = str(tmp / "ctl")
        self.log = tmp / "supervisor.log"
        self.mode = tmp / "mode"
        self.mode.write_text("ok")
        (tmp / "app.py").write_text(app)
        env = dict(os.environ, PORT=str(port), MODE_FILE=str(self.mode), REPORT=str(tmp / "report"), **env)
        args = [sys.executable, "-m", "rebind", "run", "--listen", f"127.0.0.1:{port}/web"]
        args += ["--control", self.ctl, "--ready", ready, "--grace", "5", *extra]
        args += ["--", sys.executable, str(tmp / "app.py")]
        self.proc = procs.start(args, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        self.wait_log("generation 1 (pid")
        self.wait_log("ready after")

    def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log.read_text()
            if log.count(text) >= count:
                return log
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} x{count} not in supervisor log:\n{self.log.read_text()}")

    def reload(self) -> str:
        return control.send(self.ctl, "reload", 60)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        return conn.getresponse().read().decode().strip()
    finally:
        conn.close()


class Load:
    """A client loop: one new connection per request, counting every failure by kind."""

    def __init__(self, port: int, max_requests: int = 50_000, max_seconds: float = 60) -> None:
        self.port = port
        self.counts: Counter[str] = Counter()
        self.pids: set[str] = set()
        self._stop = threading.Event()
        self._limits = (max_requests, max_seconds)
        self._thread = threading.Thread(target=self._run, daemon=True)  # inherits the netns
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self._limits[1]
        while not self._stop.is_set() and sum(self.counts.values()) < self._limits[0]:
            if time.monotonic() > deadline:
                self.counts["gave up (time bound)"] += 1
                return
            try:
                self.pids.add(get(self.port))
                self.counts["ok"] += 1
            except ConnectionRefusedError:
                self.counts["refused"] += 1
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.counts["reset"] += 1
            except OSError as exc:
                self.counts[type(exc).__name__] += 1

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(30)
        return self.counts


def test_reloads_crash_and_failed_reload_under_load(netns: int, procs: Procs, tmp_path: Path) -> None:
    sup = Supervised(procs, tmp_path, 8080, HTTP_APP)
    load = Load(8080)
    for i in range(22):
        assert sup.reload().startswith("ok: generation"), sup.log.read_text()
        if i == 10:
            # A crash: the socket stays open, connections queue, the restart serves them.
            os.kill(sup.proc.pid, signal.SIGUSR1)  # forwarded to the current generation
            sup.wait_log("while serving")
            sup.wait_log("restart after crash")
            sup.wait_log("ready after", count=13)
    sup.mode.write_text("fail-start")
    answer = sup.reload()
    assert answer.startswith("failed:") and "exited with status 3 before it was ready" in answer
    assert "still serving" in answer
    sup.mode.write_text("ok")
    before = sum(load.counts.values())
    while sum(load.counts.values()) < before + 50:  # the old generation keeps serving
        # the client loop has its own time bound: once it gave up, waiting here would spin forever
        assert load.running(), f"the load ended before 50 more requests: {load.counts}"
        time.sleep(0.01)
    counts = load.stop()
    assert counts["ok"] > 0
    assert set(counts) == {"ok"}, counts  # 0 refused, 0 reset, nothing else
    assert len(load.pids) >= 20  # requests really went through many generations
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(30) == 0  # the app's own status after a graceful stop


def test_no_fd_leak_across_100_reloads(netns: int, procs: Procs, tmp_path: Path) -> None:
    sup = Supervised(procs, tmp_path, 8081, PLAIN_APP, "--grace", "1")
    assert sup.reload().startswith("ok")
    sup.wait_log("exited with status", count=1)
    after_one = sup.fd_count()
    for _ in range(99):
        assert sup.reload().startswith("ok")
    # PLAIN_APP dies at SIGTERM without finishing what it accepted: wait until only one runs.
    sup.wait_log("exited with status", count=100)
    with socket.create_connection(("127.0.0.1", 8081), timeout=10) as c:
        assert c.recv(16) == b"hi\n"
    # A /proc scan may hold a directory fd for a moment, and a generation's stderr pipe lives
    # until its reader sees EOF: poll, and allow that one or two transient fds (a leak of one fd
    # per reload would show as ~99 more, not flicker).
    deadline = time.monotonic() + 10
    while sup.fd_count() > after_one and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sup.fd_count() <= after_one + 2, os.listdir(f"/proc/{sup.proc.pid}/fd")
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(30) == 0  # PLAIN_APP dies of the SIGTERM we forwarded: a clean stop


def test_epoll_readiness_and_no_listening_fd_in_grandchild(netns: int, procs: Procs, tmp_path: Path) -> None:
    sup = Supervised(procs, tmp_path, 8082, ASYNC_APP)
    assert "waits for connections (epoll)" in sup.wait_log("ready after")
    with socket.create_connection(("127.0.0.1", 8082), timeout=10) as c:
        assert c.recv(16) == b"async\n"
    report = tmp_path / "report"
    deadline = time.monotonic() + 20
    while not report.exists() or not report.read_text():
        assert time.monotonic() < deadline, "grandchild never reported"
        time.sleep(0.02)
    links, env = eval(report.read_text())  # our own repr() from the grandchild
    held = {f"socket:[{ino}]" for ino in _listener_inodes(sup.proc.pid)}
    assert held and not held & set(links), (held, links)
    assert env == []  # LISTEN_* cleared by inherited_sockets(), not passed down


def _listener_inodes(supervisor_pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{supervisor_pid}/fd"):
        try:
            link = os.readlink(f"/proc/{supervisor_pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ino = int(link[8:-1])
            if _is_tcp_listener(ino):
                out.add(ino)
    return out


def _is_tcp_listener(ino: int) -> bool:
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[3] == "0A" and int(r[9]) == ino for r in rows)


def test_ready_from_old_generation_or_outsiders_does_not_count(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    sup = Supervised(procs, tmp_path, 8083, HTTP_APP, "--ready-timeout", "3", ready="notify", APP_NOTIFY="1")
    old = get(8083)
    sup.mode.write_text("hang")
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(sup.reload()))
    t.start()
    sup.wait_log("generation 2 (pid")
    os.kill(sup.proc.pid, signal.SIGUSR2)  # forwarded to generation 1, which sends READY=1
    environ = Path(f"/proc/{old}/environ").read_bytes().split(b"\0")
    addr = next(e for e in environ if e.startswith(b"NOTIFY_SOCKET=")).split(b"=", 1)[1].decode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", "\0" + addr[1:])  # the test process: not in the tree either
    t.join(60)
    assert result and result[0].startswith("failed:") and "did not become ready" in result[0], result
    log = sup.log.read_text()
    assert f"ignoring READY=1 from pid {os.getpid()}" in log
    assert get(8083) == old  # generation 1 kept serving


def test_notify_ready_from_the_new_tree_counts(netns: int, procs: Procs, tmp_path: Path) -> None:
    app = "import rebind, signal\ns = rebind.listen('127.0.0.1', 0)\nrebind.notify_ready('up')\nsignal.pause()\n"
    sup = Supervised(procs, tmp_path, 8084, app, ready="notify")
    assert "READY=1 from pid" in sup.log.read_text()
    assert sup.reload().startswith("ok: generation 2")


def test_sigint_forwarded_and_status_returned(netns: int, procs: Procs, tmp_path: Path) -> None:
    app = (
        "import rebind, signal, sys\ns = rebind.listen('127.0.0.1', 0)\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
        "while True: s.accept()[0].close()\n"
    )
    sup = Supervised(procs, tmp_path, 8085, app)
    os.kill(sup.proc.pid, signal.SIGINT)
    assert sup.proc.wait(30) == 7


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_recipes_uvicorn_and_gunicorn(netns: int, procs: Procs, tmp_path: Path, server: str) -> None:
    pytest.importorskip(server)
    (tmp_path / "webapp.py").write_text(WEBAPP)
    if server == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "webapp:asgi", "--fd", "3", "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "gunicorn", "webapp:wsgi", "--workers", "2", "--log-level", "warning"]
    ctl = str(tmp_path / "ctl")
    log = tmp_path / "log"
    args = [sys.executable, "-m", "rebind", "run", "--listen", "127.0.0.1:8086", "--control", ctl]
    p = procs.start([*args, "--", *cmd], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 60
    while "ready after" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    first = get(8086)
    load = Load(8086)
    for _ in range(3):
        assert control.send(ctl, "reload", 60).startswith("ok"), log.read_text()
    counts = load.stop()
    assert counts["ok"] > 0 and counts["refused"] == 0, (counts, log.read_text())
    if server == "uvicorn":
        # uvicorn's own graceful shutdown closes connections it accepted but has not read a
        # request from yet (H11Protocol.shutdown with cycle None): that is a reset the app
        # causes, not the handover. Everything else must be clean.
        counts.pop("reset", None)
    assert set(counts) == {"ok"}, (counts, log.read_text())
    assert get(8086) != first  # a new generation answers
    if server == "gunicorn":
        assert "READY=1 from pid" in log.read_text()  # gunicorn's arbiter speaks sd_notify
    os.kill(p.pid, signal.SIGTERM)
    # Recent uvicorn re-raises the signal after its graceful shutdown: dying of the SIGTERM we
    # forwarded counts as a clean stop.
    assert p.wait(30) == 0


WEBAPP = """
import os

async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getppid()).encode()]  # the arbiter's pid: one per generation
"""


BROKEN_APP = "import no_such_module_rebind_test  # the deploy that fails to import\n"


def test_gunicorn_default_settings_broken_deploy_is_rolled_back(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    """Issue 13: gunicorn's arbiter sends READY=1 before its workers import the app. That must not
    count: a deploy whose app fails to import is rolled back, the old generation never stops."""
    pytest.importorskip("gunicorn")
    (tmp_path / "webapp.py").write_text(WEBAPP)
    cmd = [sys.executable, "-m", "gunicorn", "webapp:wsgi"]  # gunicorn's defaults: 1 sync worker
    ctl, log = str(tmp_path / "ctl"), tmp_path / "log"
    args = [sys.executable, "-m", "rebind", "run", "--listen", "127.0.0.1:8087", "--control", ctl]
    p = procs.start([*args, "--", *cmd], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 60
    while "ready after" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    first = get(8087)
    load = Load(8087)
    (tmp_path / "webapp.py").write_text(BROKEN_APP)
    answer = control.send(ctl, "reload", 60)
    assert answer.startswith("failed: generation 2 exited with status 3 before it was ready"), answer
    assert "still serving: generation 1" in answer
    before = sum(load.counts.values())
    while sum(load.counts.values()) < before + 50:
        time.sleep(0.01)
    counts = load.stop()
    assert counts["ok"] > 0 and set(counts) == {"ok"}, (counts, log.read_text())
    assert get(8087) == first  # the old arbiter's worker still answers
    text = log.read_text()
    assert "READY=1 from pid" in text and "waiting until it serves" in text
    assert "restart" not in text.split("generation 2 exited", 1)[1]  # no restart loop
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(30) == 0


# The documented stdlib recipe, blocking, one request at a time, saturated by client threads:
# almost never *in* accept() when sampled, but always holding the connection it answers.
BLOCKING_APP = r"""
import os, signal, socket, sys
import rebind
s = rebind.listen("127.0.0.1", 0)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
while True:
    c, _ = s.accept()
    c.recv(1024)
    x = 0
    for i in range(20000):  # some work per request
        x += i
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(os.getpid())), os.getpid()))
    c.close()
"""


def test_ready_under_saturating_load_is_seen(netns: int, procs: Procs, tmp_path: Path) -> None:
    sup = Supervised(procs, tmp_path, 8088, BLOCKING_APP, "--ready-timeout", "20", ready="accept")
    loads = [Load(8088, max_seconds=120) for _ in range(8)]
    try:
        for _ in range(5):
            answer = sup.reload()
            assert answer.startswith("ok: generation"), (answer, sup.log.read_text())
    finally:
        counts = sum((ld.stop() for ld in loads), Counter())
    assert counts["ok"] > 0 and counts["refused"] == 0, counts


def test_app_that_binds_the_port_itself_is_named_for_sure(netns: int, procs: Procs, tmp_path: Path) -> None:
    app = "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 8089))\n"  # ignores LISTEN_FDS
    (tmp_path / "app.py").write_text(app)
    args = [sys.executable, "-m", "rebind", "run", "--listen", "127.0.0.1:8089", "--"]
    r = subprocess.run(
        [*args, sys.executable, str(tmp_path / "app.py")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1, r.stderr
    assert "Address already in use" in r.stderr  # the app's own traceback, passed through
    assert "its stderr says 'Address already in use': the server ignores LISTEN_FDS" in r.stderr
    assert "if it failed with" not in r.stderr  # no more guessing


# UDP and TCP sockets by name (LISTEN_FDNAMES), both served from one selector loop.
NAMED_APP = r"""
import os, selectors, signal, sys
import rebind
socks = {s.name: s.sock for s in rebind.inherited_sockets()}
sel = selectors.DefaultSelector()
sel.register(socks["dns"], selectors.EVENT_READ, "dns")
sel.register(socks["web"], selectors.EVENT_READ, "web")
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
while True:
    for key, _ in sel.select():
        if key.data == "dns":
            data, peer = socks["dns"].recvfrom(512)
            socks["dns"].sendto(b"%d %s" % (os.getpid(), data), peer)
        else:
            c, _ = socks["web"].accept()
            c.sendall(b"%d %s" % (os.getpid(), ",".join(sorted(socks)).encode()))
            c.close()
"""


def _udp_ask(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(data, ("127.0.0.1", port))
        return u.recv(512)


def test_udp_and_named_sockets(netns: int, procs: Procs, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(NAMED_APP)
    ctl, log = str(tmp_path / "ctl"), tmp_path / "log"
    args = [sys.executable, "-m", "rebind", "run", "--listen", "udp:127.0.0.1:8110/dns"]
    args += [
        "--listen",
        "127.0.0.1:8110/web",
        "--control",
        ctl,
        "--",
        sys.executable,
        str(tmp_path / "app.py"),
    ]
    p = procs.start(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 30
    while "ready after" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    pid1, payload = _udp_ask(8110, b"q1").split()
    assert payload == b"q1"
    with socket.create_connection(("127.0.0.1", 8110), timeout=10) as c:
        assert c.recv(64).split()[1] == b"dns,web"
    assert control.send(ctl, "reload", 60).startswith("ok: generation 2")
    pid2, payload = _udp_ask(8110, b"q2").split()
    assert payload == b"q2" and pid2 != pid1
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(30) == 0


# Ignores the stop signal (QUIT) to show the order: QUIT, --drain seconds, then SIGTERM to all.
DRAIN_APP = r"""
import os, signal, sys, time
import rebind
s = rebind.listen("127.0.0.1", 0)
signal.signal(signal.SIGQUIT, lambda *a: open(os.environ["REPORT"] + f".{os.getpid()}", "a").write(f"QUIT {time.monotonic()}\n"))
def term(*a):
    open(os.environ["REPORT"] + f".{os.getpid()}", "a").write(f"TERM {time.monotonic()}\n")
    os._exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    c, _ = s.accept()
    c.sendall(b"%d" % os.getpid())
    c.close()
"""


def test_drain_order_stop_signal_then_sigterm_to_all(netns: int, procs: Procs, tmp_path: Path) -> None:
    sup = Supervised(procs, tmp_path, 8111, DRAIN_APP, "--stop-signal", "QUIT", "--drain", "1")
    with socket.create_connection(("127.0.0.1", 8111), timeout=10) as c:
        old = int(c.recv(16))
    assert sup.reload().startswith("ok: generation 2")
    sup.wait_log("generation 1 exited with status 0")
    log = sup.log.read_text()
    assert "generation 1 draining (replaced by generation 2): SIGQUIT, SIGTERM to all of it after 1s" in log
    assert "generation 1 still running after draining 1s: SIGTERM to all of it" in log
    quit_line, term_line = Path(f"{tmp_path / 'report'}.{old}").read_text().splitlines()
    assert quit_line.startswith("QUIT") and term_line.startswith("TERM")
    assert float(term_line.split()[1]) - float(quit_line.split()[1]) >= 0.9  # the drain time
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(30) == 0


def _scrape(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("rebind_run_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_count_reloads_by_result_and_the_serving_generation(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    """`rebind run --metrics`: the exporter's rebind_run_* series, fed by the supervisor."""
    sup = Supervised(procs, tmp_path, 8081, HTTP_APP, "--metrics", "127.0.0.1:9464")
    assert _scrape(9464)["rebind_run_generation"] == 1
    assert sup.reload().startswith("ok: generation 2")
    sup.mode.write_text("fail-start")
    assert sup.reload().startswith("failed:")
    m = _scrape(9464)
    assert m['rebind_run_reloads_total{result="ok"}'] == 1
    failed = {k: v for k, v in m.items() if k.startswith("rebind_run_reloads_total") and "ok" not in k and v}
    assert list(failed.values()) == [1], m
    assert m["rebind_run_generation"] == 2  # the failed generation 3 never served
    assert m["rebind_run_reload_seconds_count"] == 2
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(30) == 0


def test_metrics_address_in_use_is_one_line(netns: int, procs: Procs, tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 9465))
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "rebind",
                "run",
                "--listen",
                "127.0.0.1:8082",
                "--metrics",
                "127.0.0.1:9465",
                "--",
                sys.executable,
                "-c",
                "pass",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        busy.close()
    assert res.returncode == 3 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "127.0.0.1:9465" in res.stderr and "already in use" in res.stderr
