"""Throwaway surroundings for real daemons and the fixes `rebind why` prints (issue 20).

A `Sandbox` is a mount namespace (anchored by a sleeping process) in which /etc, /run and /var
are copy-on-write overlays over the host's: a daemon started there reads the real packaged
configuration, and a printed fix (``rm /etc/nginx/sites-enabled/default``, a drop-in under
/etc/dnsmasq.d) changes only the overlay. The network namespace is the test's (`netns`
fixture): subprocesses inherit the calling thread's.

systemd is not PID 1 here, so the fix's ``systemctl``/``virsh`` lines run against stand-ins put
first on PATH (`SHIM`): they stop, start, restart or reload (SIGHUP) the daemon the test started
for that unit, exactly as systemd would for its service. Every other line of a fix runs as
printed, with ``sh -c``, inside the sandbox.

Nothing here imports rebind: the stand-ins run as separate processes.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# The systemctl / virsh stand-in: unit -> {"start": argv, "pidfile": path}. Only units the test
# registered are touched; others are named on stderr and ignored (e.g. avahi-daemon.socket:
# socket activation does not exist without systemd).
SHIM = r"""#!/usr/bin/python3
import json, os, signal, subprocess, sys, time
cfg = json.load(open(os.environ["REBIND_TEST_UNITS"]))
prog = os.path.basename(sys.argv[0])
args = sys.argv[1:]
if prog == "kubectl":  # a Service whose NodePort is an iptables rule, as kube-proxy writes it
    rules = cfg.get("_kube", {})
    ns = args[args.index("-n") + 1] if "-n" in args else "default"
    if "get" in args:
        svc = args[args.index("service") + 1]
        print(f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {svc}\n  namespace: {ns}\n"
              f"  resourceVersion: \"1\"\n  uid: 0\nspec:\n  type: NodePort")
    elif "delete" in args:
        svc = args[args.index("service") + 1]
        subprocess.run(["iptables", "-t", "nat", "-D", "KUBE-NODEPORTS", *rules[f"{ns}/{svc}"]], check=True)
    elif "create" in args:
        meta = dict(l.strip().split(": ", 1) for l in sys.stdin if l.startswith("  ") and ": " in l)
        key = f"{meta['namespace']}/{meta['name']}"
        subprocess.run(["iptables", "-t", "nat", "-A", "KUBE-NODEPORTS", *rules[key]], check=True)
    else:
        sys.exit(f"kubectl stand-in: unsupported: {' '.join(args)}")
    sys.exit(0)
if prog == "virsh":  # virsh net-destroy NAME / net-start NAME: the network's dnsmasq
    verb = {"net-destroy": "stop", "net-start": "start"}.get(args[0], "?")
    units = ["libvirt-network-" + a for a in args[1:]]
    now = True
else:
    now = "--now" in args
    words = [a for a in args if not a.startswith("-")]
    verb, units = words[0], words[1:]

def pid_of(u):
    try:
        return int(open(cfg[u]["pidfile"]).read())
    except (OSError, ValueError):
        return None

def stop(u):
    pid = pid_of(u)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
    os.unlink(cfg[u]["pidfile"])

def start(u):
    log = open(cfg[u]["pidfile"] + ".log", "ab")
    p = subprocess.Popen(cfg[u]["start"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    with open(cfg[u]["pidfile"], "w") as f:
        f.write(str(p.pid))
    time.sleep(0.0)

for u in units:
    if u not in cfg:
        print(f"{prog} stand-in: {u} is not a unit of this test; nothing to do", file=sys.stderr)
        continue
    if verb == "stop" or (verb == "disable" and now):
        stop(u)
    elif verb == "restart":
        stop(u)
        start(u)
    elif verb == "start" or (verb == "enable" and now):
        start(u)
    elif verb == "reload":
        os.kill(pid_of(u), signal.SIGHUP)
    elif verb in ("disable", "enable"):
        pass
    else:
        sys.exit(f"{prog} stand-in: unsupported: {' '.join(sys.argv[1:])}")
"""


def need(tool: str) -> str:
    """The tool's path; skip (fail under CI=true) when its package is not installed."""
    path = shutil.which(tool) or (tool if os.path.isabs(tool) and os.access(tool, os.X_OK) else None)
    if path is None:
        msg = f"{tool} is not installed (tools/system-tools.txt lists its Debian package)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready within {timeout}s")


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.units: dict[str, dict[str, object]] = {}
        self.anchor: subprocess.Popen[bytes] | None = None
        self.shims = root / "bin"
        self.units_file = root / "units.json"

    # -- set-up ----------------------------------------------------------------------------------

    def open(self, setup: Sequence[str] = ()) -> None:
        """The mount namespace, with ``setup`` shell lines run inside it first (mkdir /run/x)."""
        self.shims.mkdir(parents=True)
        for name in ("systemctl", "virsh", "kubectl"):
            shim = self.shims / name
            shim.write_text(SHIM)
            shim.chmod(0o755)
        mounts = []
        for d in ("etc", "run", "var"):
            up, work = self.root / f"upper-{d}", self.root / f"work-{d}"
            up.mkdir()
            work.mkdir()
            mounts.append(f"mount -t overlay overlay -o lowerdir=/{d},upperdir={up},workdir={work} /{d}")
        script = " && ".join([*mounts, *setup, "echo ready", "exec sleep 3600"])
        self.anchor = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.anchor.stdout is not None
        line = self.anchor.stdout.readline()
        if line.strip() != b"ready":
            err = self.anchor.stderr.read() if self.anchor.stderr else b""
            raise RuntimeError(f"sandbox set-up failed: {err.decode(errors='replace')}")

    def _inside(self, argv: Sequence[str]) -> list[str]:
        assert self.anchor is not None
        return ["nsenter", "-t", str(self.anchor.pid), "-m", "--", *argv]

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["PATH"] = f"{self.shims}:{VENV_BIN}:{e.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        e["REBIND_TEST_UNITS"] = str(self.units_file)
        e["NO_COLOR"] = "1"
        e.pop("FORCE_COLOR", None)
        return e

    def start(
        self,
        unit: str,
        argv: Sequence[str],
        ready: Callable[[], bool],
        what: str = "",
        restart_as: Sequence[str] | None = None,
    ) -> int:
        """Start the daemon for ``unit`` inside the sandbox (the stand-in's way); wait for ``ready``.
        ``restart_as``: what a later (re)start of the unit runs instead (dockerd, which does not
        re-create a stale proxy)."""
        pidfile = self.root / f"{unit}.pid"
        self.units[unit] = {"start": self._inside(argv), "pidfile": str(pidfile)}
        self.units_file.write_text(json.dumps(self.units))
        subprocess.run([str(self.shims / "systemctl"), "start", unit], env=self.env(), check=True)
        if restart_as is not None:
            self.units[unit]["start"] = self._inside(restart_as)
            self.units_file.write_text(json.dumps(self.units))
        try:
            wait_for(ready, 15, what or unit)
        except TimeoutError:
            log = Path(f"{pidfile}.log")
            raise TimeoutError(f"{unit}: {log.read_text(errors='replace') if log.exists() else ''}") from None
        return self.pid(unit) or 0

    def nodeport(self, namespace: str, service: str, port: int, proto: str = "tcp") -> None:
        """A NodePort Service as kube-proxy (iptables mode) programs it, in the test's namespace:
        KUBE-NODEPORTS with the ``namespace/service:port-name`` comment, DNAT to a pod."""
        rule = [
            "-p",
            proto,
            "-m",
            "comment",
            "--comment",
            f"{namespace}/{service}:http",
            "-m",
            proto,
            "--dport",
            str(port),
            "-j",
            "DNAT",
            "--to-destination",
            "10.42.0.7:8080",
        ]
        for cmd in (
            ["-N", "KUBE-NODEPORTS"],
            ["-A", "PREROUTING", "-j", "KUBE-NODEPORTS"],
            ["-A", "KUBE-NODEPORTS", *rule],
        ):
            subprocess.run(["iptables", "-t", "nat", *cmd], check=True, capture_output=True)
        kube = self.units.setdefault("_kube", {})
        assert isinstance(kube, dict)
        kube[f"{namespace}/{service}"] = rule
        self.units_file.write_text(json.dumps(self.units))

    def pid(self, unit: str) -> int | None:
        try:
            return int(Path(str(self.units[unit]["pidfile"])).read_text())
        except (OSError, ValueError, KeyError):
            return None

    # -- running what rebind printed ----------------------------------------------------------------

    def run(self, line: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """One printed line, exactly as printed, in the sandbox (sh -c)."""
        return subprocess.run(
            self._inside(["sh", "-c", line]),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )

    def rebind(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._inside([sys.executable, "-m", "rebind", *args]),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def close(self) -> None:
        for u in self.units:
            if u.startswith("_"):
                continue
            pid = self.pid(u)
            if pid is not None:
                _kill_tree(pid)
        if self.anchor is not None:
            self.anchor.kill()
            self.anchor.wait(5)
            for s in (self.anchor.stdout, self.anchor.stderr):
                if s:
                    s.close()


def _kill_tree(pid: int) -> None:
    """End a unit's daemon and every process it started (nginx's and apache's workers, which
    outlive a SIGKILLed master as orphans of init), the children gathered before the parent dies,
    then wait for all of them."""
    import psutil

    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


@contextmanager
def sandbox(root: Path, setup: Sequence[str] = ()) -> Iterator[Sandbox]:
    box = Sandbox(root)
    try:
        box.open(setup)
        yield box
    finally:
        box.close()


def run_on_terminal(
    line: str, env: dict[str, str], answer: bytes = b"y\n", timeout: float = 60
) -> tuple[int, str]:
    """``sh -c LINE`` on a pseudo-terminal (stdin too), answering ``answer`` to its question:
    `rebind free` asks before it acts when a person runs it, as the printed fix is meant to be."""
    leader, follower = pty.openpty()
    p = subprocess.Popen(
        ["sh", "-c", line], stdin=follower, stdout=follower, stderr=follower, env=env, start_new_session=True
    )
    os.close(follower)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not sent and b"?" in out:
                os.write(leader, answer)
                sent = True
        elif p.poll() is not None:
            break
    os.close(leader)
    return p.wait(30), out.decode(errors="replace")


def port_held(port: int, proto: str = "tcp") -> bool:
    """Something holds ``port`` for a server (ss, not rebind: an independent view)."""
    flag = "-t" if proto == "tcp" else "-u"
    res = subprocess.run(["ss", "-Hln", flag, f"sport = :{port}"], capture_output=True, text=True, check=True)
    return bool(res.stdout.strip())


def bind_works(port: int, proto: str = "tcp", addr: str = "0.0.0.0") -> bool:
    """A real server bind (and listen for TCP) on ``port`` succeeds now."""
    import socket

    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, kind) as s:
        try:
            s.bind((addr, port))
            if kind == socket.SOCK_STREAM:
                s.listen()
        except OSError:
            return False
    return True
