"""Reload benchmark, in a private network namespace (needs root): `python bench/reload.py`.

Measures (bounded: --reloads reloads, --seconds per phase):
  * reload-to-ready latency of `rebind run` (control socket round trip: spawn, readiness, handover);
  * requests/s served by one client loop (new connection each) without reloads vs during reloads;
  * the naive way (stop the server, start it again) and the refused connections it causes.
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
    opts = ap.parse_args()
    with private_netns(), tempfile.TemporaryDirectory() as tmp:
        supervised(Path(tmp), opts.reloads, opts.seconds)
        naive(Path(tmp), opts.reloads)


if __name__ == "__main__":
    main()
