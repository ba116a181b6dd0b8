"""The recipes of docs/supervisor.md, each run under `rebind run` in a throwaway network namespace,
with a client loop and reloads, counting refused and reset connections. They are what a user
copies: if one stops working (a new server release), this fails, not the user's deploy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rebind.supervisor import control
from tests.conftest import Procs
from tests.kernel.test_supervisor import Load, get

ASGI = """
import os

async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

AIOHTTP = """
import os
from aiohttp import web
import rebind

async def hello(request):
    return web.Response(text=str(os.getpid()))

app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, sock=rebind.listen("127.0.0.1", int(os.environ["PORT"])), print=None, shutdown_timeout=5)
"""

# granian binds its own address: until it reads LISTEN_FDS, hand it the socket rebind passes.
GRANIAN = """
import os, sys
import rebind
from granian._granian import SocketHolder
from granian.cli import entrypoint
from granian.server.common import AbstractServer

fd = rebind.inherited_sockets()[0].fd
os.set_inheritable(fd, True)  # granian's workers are spawned processes


def _init_shared_socket(self):  # where granian would bind: take the passed socket instead
    self._ssp = None
    self._shd = SocketHolder(fd, False, 1024)
    self._sfd = fd


AbstractServer._init_shared_socket = _init_shared_socket
sys.exit(entrypoint())
"""

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "$pid"; }}
    }}
}}
"""


@dataclass
class Recipe:
    needs: str  # a module to import, or a program on PATH
    cmd: Callable[[Path, int], list[str]]
    rebind: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    resets: bool = False  # the server's own shutdown may reset a connection (measured, documented)


def _nginx(tmp: Path, port: int) -> list[str]:
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
    return [shutil.which("nginx") or "nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", "stderr"]


PY = sys.executable
RECIPES = {
    "gunicorn": Recipe("gunicorn", lambda t, p: [PY, "-m", "gunicorn", "app:wsgi", "--workers", "2"]),
    "uvicorn": Recipe("uvicorn", lambda t, p: [PY, "-m", "uvicorn", "app:asgi", "--fd", "3"], resets=True),
    "hypercorn": Recipe(
        "hypercorn", lambda t, p: [PY, "-m", "hypercorn", "--bind", "fd://3", "app:asgi"], resets=True
    ),
    "aiohttp": Recipe(
        "aiohttp", lambda t, p: [PY, "aiohttp_app.py"], files={"aiohttp_app.py": AIOHTTP}, resets=True
    ),
    "granian": Recipe(
        "granian",
        lambda t, p: [PY, "granian_fd.py", "--interface", "asgi", "app:asgi", "--workers", "1"],
        files={"granian_fd.py": GRANIAN},
        resets=True,
    ),
    "nginx": Recipe("nginx", _nginx, rebind=("--stop-signal", "QUIT"), env={"NGINX": "3;"}),
}


def _available(needs: str) -> bool:
    if shutil.which(needs) and needs == "nginx":
        return True
    try:
        __import__(needs)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_under_load_and_reloads(netns: int, procs: Procs, tmp_path: Path, name: str) -> None:
    recipe = RECIPES[name]
    if recipe.needs == "nginx":
        from tests.toolcheck import need_tool

        need_tool("nginx")
    if not _available(recipe.needs):
        pytest.skip(f"{recipe.needs} is not installed (.ci/run installs it)")
    port = 8300 + sorted(RECIPES).index(name)
    (tmp_path / "app.py").write_text(ASGI)
    for fname, text in recipe.files.items():
        (tmp_path / fname).write_text(text)
    ctl, log = str(tmp_path / "ctl"), tmp_path / "log"
    args = [PY, "-m", "rebind", "run", "--listen", f"127.0.0.1:{port}", "--control", ctl, *recipe.rebind]
    args += os.environ.get("REBIND_RECIPE_ARGS", "").split()  # e.g. "--drain 2" for the measurements
    env = dict(os.environ, PORT=str(port), **recipe.env)
    cmd = [*args, "--", *recipe.cmd(tmp_path, port)]
    p = procs.start(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 60
    while "ready after" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    first = get(port)
    load = Load(port)
    for _ in range(RELOADS):
        answer = control.send(ctl, "reload", 60)
        assert answer.startswith("ok"), (answer, log.read_text())
    counts = load.stop()
    print(f"{name}: {dict(counts)} in {RELOADS} reloads")
    assert counts["ok"] > 0 and counts["refused"] == 0, (counts, log.read_text())
    if recipe.resets:
        counts.pop("reset", None)  # the server's own shutdown; measured in docs/benchmarks.md
    assert set(counts) == {"ok"}, (counts, log.read_text())
    assert get(port) != first  # a new generation answers
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(30) == 0, log.read_text()


RELOADS = int(os.environ.get("REBIND_RECIPE_RELOADS", "3"))
