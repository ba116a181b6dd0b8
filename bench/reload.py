"""Reload benchmark, in a private network namespace (needs root): `python bench/reload.py`.

Measures (bounded: --reloads reloads, --seconds per phase):
  * reload-to-ready latency of `rebind run` (control socket round trip: spawn, readiness, handover);
  * requests/s served by one client loop (new connection each) without reloads vs during reloads;
  * the naive way (stop the server, start it again) and the refused connections it causes.

`--tools`: the cross-tool table of docs/benchmarks.md (issue 13): the same load (--clients
threads, a new connection per request) and --reloads reloads against each way of reloading,
one after the other on one machine: refused, reset, the longest wait of a request, and
reload-to-ready (from the trigger until a new generation answered).
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from rebind.kernel.netns import private_netns
from rebind.supervisor import control

APP = r"""
import os, signal, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
import rebind

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass

srv = HTTPServer(("", 0), H, bind_and_activate=False)
srv.socket.close()
srv.socket = rebind.listen("127.0.0.1", int(os.environ["PORT"]))
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
srv.serve_forever(poll_interval=0.05)
"""
PORT = 8700


class Client:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                self.counts["ok"] += 1
            except ConnectionRefusedError:
                self.counts["refused"] += 1
                time.sleep(0.001)
            except (ConnectionResetError, http.client.RemoteDisconnected):
                self.counts["reset"] += 1
            except OSError as exc:
                self.counts[type(exc).__name__] += 1
            finally:
                conn.close()

    def run_for(self, seconds: float, during: object = None) -> tuple[Counter[str], float]:
        self.counts.clear()
        self.stop.clear()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        t0 = time.monotonic()
        self.thread.start()
        if callable(during):
            during()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.01)
        self.stop.set()
        self.thread.join()
        return Counter(self.counts), time.monotonic() - t0


def wait_ready(log: Path, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while log.read_text().count("ready after") < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"supervisor not ready:\n{log.read_text()}")
        time.sleep(0.01)


def supervised(tmp: Path, reloads: int, seconds: float) -> None:
    (tmp / "app.py").write_text(APP)
    ctl, log = str(tmp / "ctl"), tmp / "log"
    env = dict(os.environ, PORT=str(PORT))
    args = [sys.executable, "-m", "rebind", "run", "--listen", f"127.0.0.1:{PORT}", "--control", ctl]
    sup = subprocess.Popen([*args, "--", sys.executable, str(tmp / "app.py")], env=env, stderr=log.open("w"))
    try:
        wait_ready(log)
        client = Client()
        steady, t_steady = client.run_for(seconds)
        latencies: list[float] = []

        def reload_loop() -> None:
            for _ in range(reloads):
                t = time.monotonic()
                answer = control.send(ctl, "reload", 60)
                latencies.append(time.monotonic() - t)
                assert answer.startswith("ok"), answer

        during, t_during = client.run_for(0, reload_loop)
        print(f"rebind run, {reloads} reloads")
        lat = sorted(latencies)
        print(
            f"  reload-to-ready: median {statistics.median(lat) * 1000:.1f} ms, "
            f"p90 {lat[int(len(lat) * 0.9) - 1] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms"
        )
        print(
            f"  steady:  {steady['ok'] / t_steady:8.0f} req/s  failures {dict(steady - Counter(ok=steady['ok']))}"
        )
        print(
            f"  reloads: {during['ok'] / t_during:8.0f} req/s  failures {dict(during - Counter(ok=during['ok']))}"
        )
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(30)


def naive(tmp: Path, reloads: int) -> None:
    """Stop and start the app binding the port itself: the window in which nothing listens."""
    env = dict(os.environ, PORT=str(PORT))
    app = [sys.executable, str(tmp / "app.py")]
    client = Client()

    def restart_loop() -> None:
        proc = subprocess.Popen(app, env=env)
        for _ in range(reloads):
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            proc = subprocess.Popen(app, env=env)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait()

    counts, took = client.run_for(0, restart_loop)
    print(f"naive stop/start, {reloads} restarts")
    print(f"  {counts['ok'] / took:8.0f} req/s  refused {counts['refused']}  other {dict(counts)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tools", action="store_true", help="the cross-tool table instead")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated scenario names (with --tools)")
    opts = ap.parse_args()
    with private_netns(), tempfile.TemporaryDirectory() as tmp:
        if opts.tools:
            run_all(Path(tmp), opts.reloads, opts.clients, [x for x in opts.only.split(",") if x])
            return
        supervised(Path(tmp), opts.reloads, opts.seconds)
        naive(Path(tmp), opts.reloads)


# -- the cross-tool table (--tools) ------------------------------------------------------------------

IMPORT_SECONDS = 0.5  # the "late binder" imports its app this long before it binds

# The stdlib app, binding itself (SO_REUSEPORT when asked), graceful on SIGTERM; "ready" once listening.
SELF_BINDING = r"""
import os, signal, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer
time.sleep(float(os.environ.get("IMPORT_SECONDS", "0")))  # importing the app

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class S(HTTPServer):
    allow_reuse_address = True
    def server_bind(self):
        if os.environ.get("REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

srv = S(("127.0.0.1", int(os.environ["PORT"])), H)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
print("ready", flush=True)
srv.serve_forever(poll_interval=0.05)
srv.server_close()
"""

WSGI_ASGI = """
import os

def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getppid()).encode()]  # the master: one per generation

async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""


class Load:
    """N client threads, a new connection per request; failures by kind, the longest wait."""

    def __init__(self, clients: int) -> None:
        self.counts: Counter[str] = Counter()
        self.answers: set[str] = set()
        self.longest = 0.0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def loop(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                self.answers.add(conn.getresponse().read().decode())
                self.counts["ok"] += 1
            except ConnectionRefusedError:
                self.counts["refused"] += 1
                time.sleep(0.001)
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.counts["reset"] += 1
            except OSError as exc:
                self.counts[type(exc).__name__] += 1
            finally:
                conn.close()
            self.longest = max(self.longest, time.monotonic() - t0)

    def finish(self) -> Counter[str]:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self.counts


def answer() -> str | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
        conn.request("GET", "/", headers={"Connection": "close"})
        return conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        conn.close()


def until_new(old: set[str], limit: float = 30) -> None:
    """Poll until an answer comes from none of OLD (a new generation serves)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = answer()
        if a is not None and a not in old:
            return
        time.sleep(0.005)
    raise SystemExit("no new generation answered")


def until_serving(limit: float = 30) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = answer()
        if a is not None:
            return a
        time.sleep(0.01)
    raise SystemExit("nothing answered")


def read_line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


class Scenario:
    name = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "app.py").write_text(SELF_BINDING)
        (tmp / "webapp.py").write_text(WSGI_ASGI)
        self.env = dict(os.environ, PORT=str(PORT))

    def start(self) -> None: ...
    def reload(self) -> None: ...
    def stop(self) -> None: ...


class RebindRun(Scenario):
    name = "rebind run (stdlib app, --ready auto)"

    def start(self) -> None:
        ctl, log = str(self.tmp / "ctl"), self.tmp / "log"
        self.ctl = ctl
        args = [sys.executable, "-m", "rebind", "run", "--listen", f"127.0.0.1:{PORT}", "--control", ctl]
        self.p = subprocess.Popen(
            [*args, "--", sys.executable, str(self.tmp / "app_r.py")], env=self.env, stderr=log.open("w")
        )
        until_serving()

    def reload(self) -> None:
        a = control.send(self.ctl, "reload", 60)
        assert a.startswith("ok"), a

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)


class SelfBinding(Scenario):
    """Start the new process, wait for it, then SIGTERM the old one (or: stop first, naive)."""

    overlap = True
    reuseport = False
    migrate = 0
    import_seconds = 0.0

    def spawn(self) -> subprocess.Popen[str]:
        env = dict(self.env, IMPORT_SECONDS=str(self.import_seconds))
        if self.reuseport:
            env["REUSEPORT"] = "1"
        p = subprocess.Popen(
            [sys.executable, str(self.tmp / "app.py")], env=env, stdout=subprocess.PIPE, text=True
        )
        return p

    def start(self) -> None:
        with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
            f.write(str(self.migrate))
        self.p = self.spawn()
        read_line(self.p)

    def reload(self) -> None:
        old = self.p
        if self.overlap:
            self.p = self.spawn()
            read_line(self.p)
            old.send_signal(signal.SIGTERM)
            old.wait(30)
        else:
            old.send_signal(signal.SIGTERM)
            old.wait(30)
            self.p = self.spawn()
            read_line(self.p)

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)


class Reuseport0(SelfBinding):
    name = "SO_REUSEPORT hand-off, tcp_migrate_req=0"
    reuseport = True


class Reuseport1(SelfBinding):
    name = "SO_REUSEPORT hand-off, tcp_migrate_req=1"
    reuseport = True
    migrate = 1


class LateBind(SelfBinding):
    name = f"restart, binds after a {IMPORT_SECONDS:g} s import"
    overlap = False
    import_seconds = IMPORT_SECONDS


class Naive(SelfBinding):
    name = "naive stop/start"
    overlap = False


class GunicornUsr2(Scenario):
    name = "gunicorn USR2, then TERM to the old master (2 sync workers)"

    def start(self) -> None:
        self.pidfile = self.tmp / "gunicorn.pid"
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "webapp:wsgi",
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{PORT}",
        ]
        args += ["--pid", str(self.pidfile), "--log-level", "warning"]
        self.p = subprocess.Popen(args, cwd=self.tmp, env=self.env)
        until_serving()

    def master(self) -> int:
        deadline = time.monotonic() + 30
        while True:  # gunicorn renames and rewrites it during USR2: retry a torn read
            try:
                return int(self.pidfile.read_text().strip())
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def reload(self) -> None:
        old = self.master()
        os.kill(old, signal.SIGUSR2)  # a new master re-execs on the inherited sockets
        until_new({str(old)})  # the app answers its master's pid
        # The old master must go gracefully: TERM. (QUIT is gunicorn's *quick* shutdown, workers
        # exit mid-request; WINCH, the documented graceful worker stop, only works daemonized.)
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(old) and time.monotonic() < deadline:
            time.sleep(0.005)

    def stop(self) -> None:
        master = self.master()
        os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(master) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.p.poll() is None:
            self.p.wait(30)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class UvicornHup(Scenario):
    name = "uvicorn's own reload (SIGHUP, --workers 2)"

    def start(self) -> None:
        args = [sys.executable, "-m", "uvicorn", "webapp:asgi", "--workers", "2", "--port", str(PORT)]
        args += ["--host", "127.0.0.1", "--log-level", "warning"]
        self.p = subprocess.Popen(args, cwd=self.tmp, env=self.env)
        until_serving()
        self.seen: set[str] = set()

    def reload(self) -> None:
        old = set(_children(self.p.pid))  # the 2 workers (and multiprocessing's helpers)
        self.p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both workers replaced, one after the other
            if len(old - set(_children(self.p.pid))) >= 2:
                break
            time.sleep(0.005)
        until_new({str(c) for c in old})

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


SCENARIOS: dict[str, type[Scenario]] = {
    "rebind": RebindRun,
    "reuseport0": Reuseport0,
    "reuseport1": Reuseport1,
    "latebind": LateBind,
    "gunicorn": GunicornUsr2,
    "uvicorn": UvicornHup,
    "naive": Naive,
}


def run_all(tmp: Path, reloads: int, clients: int, only: list[str]) -> None:
    (tmp / "app_r.py").write_text(APP)
    print("| way of reloading | requests | refused | reset | longest wait | reload-to-ready (median, max) |")
    print("|---|---|---|---|---|---|")
    for key, cls in SCENARIOS.items():
        if only and key not in only:
            continue
        sc = cls(tmp)
        sc.start()
        load = Load(clients)
        took: list[float] = []
        try:
            time.sleep(0.5)  # steady load before the first reload
            for _ in range(reloads):
                t0 = time.monotonic()
                sc.reload()
                took.append(time.monotonic() - t0)
                time.sleep(0.2)
        finally:
            counts = load.finish()
            sc.stop()
        other = {k: v for k, v in counts.items() if k not in ("ok", "refused", "reset")}
        extra = f" (+ {other})" if other else ""
        print(
            f"| {cls.name} | {sum(counts.values())} | {counts['refused']} | {counts['reset']}{extra} | "
            f"{load.longest * 1000:.0f} ms | {statistics.median(took) * 1000:.0f} ms, {max(took) * 1000:.0f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main()
