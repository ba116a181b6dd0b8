"""The demo's stage: how each step is narrated (titles, lines, the output of each `rebind` command
it runs) and the plumbing under it (the servers it starts, its leftovers, the TIME_WAITs it clears).
The stories themselves live in demo/server.py and demo/client.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

Out = Callable[[str], None]


class Stage:
    """What every story stands on: its narration (``step``, ``say``, ``show``, ``rebind``) and
    the processes it starts, killed and removed by ``cleanup``."""

    def __init__(self, out: Out, *, in_netns: bool) -> None:
        self.out = out
        self.in_netns = in_netns
        self.procs: list[subprocess.Popen[str]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="rebind-demo-"))
        self.can_destroy = in_netns and _can_destroy()
        self.step_no = 0

    # -- plumbing ------------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.step_no += 1
        self.out(f"\n[bold cyan]Step {self.step_no}. {title}[/]")

    def say(self, text: str) -> None:
        self.out(f"  {text}")

    def show(self, text: str, style: str = "") -> None:
        from rich.markup import escape

        for line in text.rstrip().splitlines():
            self.out(f"    [{style}]{escape(line)}[/]" if style else f"    {escape(line)}")

    def rebind(self, *args: str) -> str:
        env = dict(os.environ, NO_COLOR="1", COLUMNS="110")
        self.out(f"  [bold]$ rebind {' '.join(args)}[/]")
        res = subprocess.run(
            [sys.executable, "-m", "rebind", *args], capture_output=True, text=True, env=env, timeout=30
        )
        text = (res.stdout + res.stderr).rstrip()
        self.show(text)
        return text

    def start_server(self, code: str, name: str) -> subprocess.Popen[str]:
        path = self.tmp / name
        path.write_text(code)
        return self.start([sys.executable, "-u", str(path)])

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def wait_ready(self, p: subprocess.Popen[str]) -> bool:
        assert p.stdout is not None
        line = p.stdout.readline()
        return line.strip().startswith("listening")

    def connect_and_finish(self, port: int, server: subprocess.Popen[str]) -> str:
        """The `nc 127.0.0.1 PORT` step: connect, let the server print and exit, then close."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            out, err = server.communicate(timeout=10)
            c.settimeout(5)
            # The server exited first, so *its* side goes to TIME_WAIT (the active closer).
            while c.recv(4096):
                pass
        return out + err

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # by pid, through the Popen handle of a process we started
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def clear_port(self, port: int) -> int:
        """Remove TIME_WAIT leftovers with SOCK_DESTROY, or move on to a fresh port."""
        if self.can_destroy:
            from rebind.kernel import diag
            from rebind.kernel.walk import walk
            from rebind.model.query import SocketQuery
            from rebind.model.records import Proto, State

            w = walk(SocketQuery.create(protos=[Proto.TCP], ports=[port], states=[State.TIME_WAIT]))
            # SOCK_DESTROY names a socket by its cookie, which only the netlink reader gives.
            if w.source == "netlink":
                leftovers = list(w.records)  # the dump ends before the first destroy
                for r in leftovers:
                    diag.destroy(r)
                self.say(
                    f"(SOCK_DESTROY removed {len(leftovers)} TIME_WAIT socket(s) on {port}, "
                    "instead of waiting 60 s)"
                )
                return port
        new = free_port()
        self.say(f"(no SOCK_DESTROY here: continuing on port {new} instead of waiting 60 s)")
        return new


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_destroy() -> bool:
    from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

    return has_cap(CAP_NET_ADMIN) and kernel_version() >= (6, 0)
