"""`rebind run` under systemd, checked against the protocol: a NOTIFY_SOCKET receiver that checks
every datagram (sender pid, keys, order), an fd store, and a restart of rebind itself under load."""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import Procs
from tests.kernel.test_supervisor import HTTP_APP, Load, get

_UCRED = struct.Struct("iII")
KNOWN = {"READY", "RELOADING", "MONOTONIC_USEC", "STATUS", "STOPPING", "MAINPID", "FDSTORE", "FDNAME"}


@dataclass
class Datagram:
    pid: int
    fields: dict[str, str]
    fds: list[int]


class FakeSystemd:
    """The service manager's end: NOTIFY_SOCKET receiver (SO_PASSCRED) and an fd store by name."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.got: list[Datagram] = []
        self.store: dict[str, int] = {}

    def pump(self) -> None:
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(4096, 4096)
            except (TimeoutError, BlockingIOError):
                return
            pid, fds = 0, []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack_from(payload)[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds += list(arr)
            lines = data.decode().split("\n")
            fields = dict(line.split("=", 1) for line in lines)  # every line is KEY=VALUE
            assert set(fields) <= KNOWN, fields
            dg = Datagram(pid, fields, fds)
            if fields.get("FDSTORE") == "1":
                assert len(fds) == 1 and fields["FDNAME"], dg
                name = fields["FDNAME"]
                if name in self.store:
                    os.close(fds[0])  # systemd ignores an fd it already stores
                else:
                    self.store[name] = fds[0]
            else:
                assert not fds, dg
            self.got.append(dg)

    def wait(self, pred: object, what: str, timeout: float = 60) -> Datagram:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            self.pump()
            for dg in self.got[seen:]:
                if pred(dg.fields):  # type: ignore[operator]
                    self.got = self.got[self.got.index(dg) + 1 :]
                    return dg
            seen = len(self.got)
        raise AssertionError(f"no datagram {what}; got {self.got}")

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()


# Plays systemd's exec: the stored fds at 3.., LISTEN_PID = our own pid (exec keeps it).
SHIM = r"""
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [os.dup(fd) for fd in fds]
high = [os.dup2(h, 100 + i) or 100 + i for i, h in enumerate(high)]
for i, h in enumerate(high):
    os.dup2(h, 3 + i)
for h in high:
    os.close(h)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def _start(
    procs: Procs, tmp: Path, sd: FakeSystemd, port: int, log: Path, shim: bool
) -> subprocess.Popen[str]:
    env = dict(os.environ, PORT=str(port), MODE_FILE=str(tmp / "mode"), NOTIFY_SOCKET=sd.path)
    args = ["-m", "rebind", "run", "--listen", f"127.0.0.1:{port}/web", "--grace", "5"]
    args += ["--ready-timeout", "10", "--", sys.executable, str(tmp / "app.py")]
    if shim:
        names = list(sd.store)
        fds = [sd.store[n] for n in names]
        cmd = [sys.executable, "-c", SHIM, ",".join(map(str, fds)), ":".join(names), *args]
        return procs.start(cmd, env=env, pass_fds=fds, stdout=subprocess.DEVNULL, stderr=log.open("a"))
    return procs.start([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))


def test_notify_reload_protocol_every_datagram(netns: int, procs: Procs, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(HTTP_APP)
    (tmp_path / "mode").write_text("ok")
    sd = FakeSystemd(tmp_path)
    try:
        log = tmp_path / "log"
        p = _start(procs, tmp_path, sd, 8120, log, shim=False)
        stored = sd.wait(lambda f: f.get("FDSTORE") == "1", "FDSTORE=1")
        assert stored.fields["FDNAME"] == "web" and stored.pid == p.pid
        ready = sd.wait(lambda f: "READY" in f, "READY=1")
        assert ready.fields == {"READY": "1", "STATUS": "serving: generation 1", "MAINPID": str(p.pid)}
        assert ready.pid == p.pid  # the kernel-attested sender: rebind, the stable main pid
        first = get(8120)
        assert int(first) != p.pid  # the app answers, rebind only holds the socket

        before = time.monotonic_ns() // 1000
        os.kill(p.pid, signal.SIGHUP)  # what systemctl reload does with Type=notify-reload
        reloading = sd.wait(lambda f: "RELOADING" in f, "RELOADING=1")
        after = time.monotonic_ns() // 1000
        assert set(reloading.fields) == {"RELOADING", "MONOTONIC_USEC"}
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after  # CLOCK_MONOTONIC, µs
        ready = sd.wait(lambda f: "READY" in f, "READY=1 after the reload")
        assert ready.fields["STATUS"] == "serving: generation 2" and ready.pid == p.pid
        assert get(8120) != first

        (tmp_path / "mode").write_text("fail-start")
        os.kill(p.pid, signal.SIGHUP)
        sd.wait(lambda f: "RELOADING" in f, "RELOADING=1 (failing reload)")
        failed = sd.wait(lambda f: "READY" in f, "READY=1 after the failed reload")
        status = failed.fields["STATUS"]
        assert status.startswith("reload failed: generation 3 exited with status 3"), status
        assert "still serving: generation 2" in status
        assert get(8120)  # the old generation still serves

        os.kill(p.pid, signal.SIGTERM)
        sd.wait(lambda f: f.get("STOPPING") == "1", "STOPPING=1")
        assert p.wait(30) == 0
        sd.pump()
        assert all(dg.pid == p.pid for dg in sd.got), sd.got  # nothing from the app reached us
        assert "READY" not in {k for dg in sd.got for k in dg.fields}
    finally:
        sd.close()


def test_restart_of_rebind_itself_from_the_fd_store_refuses_nothing(
    netns: int, procs: Procs, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(HTTP_APP)
    (tmp_path / "mode").write_text("ok")
    sd = FakeSystemd(tmp_path)
    log = tmp_path / "log"
    try:
        p = _start(procs, tmp_path, sd, 8121, log, shim=False)
        sd.wait(lambda f: "READY" in f, "READY=1")
        assert set(sd.store) == {"web"}
        load = Load(8121)
        for _ in range(3):
            # systemctl restart: SIGTERM to rebind (it forwards, the app finishes what it has),
            # then a new rebind with the stored socket. In between nobody accepts: the
            # connections queue on the socket the store keeps open.
            os.kill(p.pid, signal.SIGTERM)
            assert p.wait(30) == 0, log.read_text()
            p = _start(procs, tmp_path, sd, 8121, log, shim=True)
            ready = sd.wait(lambda f: "READY" in f, "READY=1 after the restart")
            assert ready.pid == p.pid
            os.kill(p.pid, signal.SIGHUP)  # and a reload, under the same load
            sd.wait(lambda f: f.get("STATUS") == "serving: generation 2", "reloaded")
        before = sum(load.counts.values())
        while sum(load.counts.values()) < before + 20:
            time.sleep(0.01)
        counts = load.stop()
        assert counts["ok"] > 0 and set(counts) == {"ok"}, (counts, log.read_text())
        assert "using the socket passed as fd 3 (web) instead of binding" in log.read_text()
        assert len(sd.store) == 1  # the same socket every time, never a second one
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        sd.close()
