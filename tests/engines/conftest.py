"""Real container engines for the namespace/container tests.

Each engine runs inside a throwaway network namespace made with `ip netns add` and entered with
`nsenter --net` (not `ip netns exec`, which remounts /sys and hides the cgroup mounts dockerd
needs), so its bridge, NAT rules and published ports never touch the host's network. State lives
in a private temp directory; everything is removed by pid and path at teardown. Under CI
(`CI=true`) a missing engine fails the run instead of skipping: `.ci/run` installs them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def need(tool: str) -> str:
    from tests.toolcheck import need_tool

    return need_tool(tool)


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout}s")


def free_port() -> int:
    """A loopback port free in this (the test's) view; engines bind it in their own namespace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Netns:
    name: str
    path: str

    def run(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net={self.path}", *args], text=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture
def engine_netns(netns: int) -> Iterator[Netns]:
    need("ip")
    name = f"rebind-eng-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield Netns(name, f"/run/netns/{name}")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def busybox_rootfs(root: Path) -> Path:
    busybox = shutil.which("busybox") or "/bin/busybox"
    for d in ("bin", "www", "proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "httpd", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "index.html").write_text("hello-from-bb\n")
    return root


@dataclass
class Docker:
    ns: Netns
    state: Path
    host: str
    pid: int

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DOCKER_HOST=self.host)
        return subprocess.run(
            ["docker", *args], text=True, capture_output=True, env=env, check=check, timeout=60
        )


@contextlib.contextmanager
def docker_engine(ns: Netns, *extra: str) -> Iterator[Docker]:
    need("dockerd")
    need("docker")
    need("busybox")
    state = Path(tempfile.mkdtemp(prefix="rebind-dockerd-"))
    host = f"unix://{state}/docker.sock"
    log = open(state / "dockerd.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net={ns.path}",
            "dockerd",
            "--data-root",
            f"{state}/data",
            "--exec-root",
            f"{state}/exec",
            "--pidfile",
            f"{state}/dockerd.pid",
            "-H",
            host,
            "--iptables=true",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    d = Docker(ns, state, host, proc.pid)
    try:
        wait_for(
            lambda: d.cli("version", check=False).returncode == 0 or proc.poll() is not None, 30, "dockerd"
        )
        if proc.poll() is not None:
            raise RuntimeError((state / "dockerd.log").read_text()[-2000:])
        rootfs = busybox_rootfs(state / "rootfs")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        subprocess.run(
            ["docker", "import", "-", "localhost/bb:latest"],
            input=tar.stdout,
            capture_output=True,
            env=dict(os.environ, DOCKER_HOST=host),
            check=True,
            timeout=60,
        )
        yield d
    finally:
        with contextlib.suppress(Exception):
            ids = d.cli("ps", "-aq", check=False).stdout.split()
            if ids:
                d.cli("rm", "-f", *ids, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        for mnt in (state / "exec" / "netns").glob("*") if (state / "exec" / "netns").exists() else ():
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


@dataclass
class Podman:
    ns: Netns
    state: Path

    def cli(self, *args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        # --runtime runc: crun refuses this host's hybrid cgroup layout; explicit ulimits: podman's
        # default nofile (1048576) is above the hard limit and root lacks CAP_SYS_RESOURCE here.
        base = [
            "nsenter",
            f"--net={self.ns.path}",
            "podman",
            "--root",
            f"{self.state}/storage",
            "--runroot",
            f"{self.state}/run",
            "--runtime",
            "runc",
        ]
        return subprocess.run([*base, *args], text=True, capture_output=True, check=check, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]

    def run(self, *args: str) -> str:
        ulimits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
        return str(self.cli("run", "-d", *ulimits, *args).stdout.strip())


@contextlib.contextmanager
def podman_engine(ns: Netns) -> Iterator[Podman]:
    need("podman")
    need("runc")
    need("busybox")
    state = Path(tempfile.mkdtemp(prefix="rebind-podman-"))
    p = Podman(ns, state)
    try:
        rootfs = busybox_rootfs(state / "rootfs")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        base = [
            "nsenter",
            f"--net={ns.path}",
            "podman",
            "--root",
            f"{state}/storage",
            "--runroot",
            f"{state}/run",
            "--runtime",
            "runc",
        ]
        subprocess.run(
            [*base, "import", "-q", "-", "localhost/bb:latest"],
            input=tar.stdout,
            capture_output=True,
            check=True,
            timeout=60,
        )
        yield p
    finally:
        p.cli("rm", "-af", "-t", "0", check=False)
        p.cli("rmi", "-af", check=False)
        shutil.rmtree(state, ignore_errors=True)


@dataclass
class RootlessUser:
    name: str
    uid: int
    home: Path

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell script as the user (su - inherits this thread's network namespace)."""
        script = f"export XDG_RUNTIME_DIR=/run/user/{self.uid}; cd; P='podman --runtime runc'; {script}"
        return subprocess.run(
            ["su", "-", self.name, "-c", script],
            text=True,
            capture_output=True,
            check=check,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )


#: The throwaway user's uid is at least this (useradd's UID_MIN): never root's or a system user's.
_FIRST_USER_UID = 1000


def _pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is the throwaway user's (from /proc/PID/status, not the owner
    of /proc/PID, which is the effective uid). Refuses a uid that could be root's or a system
    user's: a wrong uid here would end every process of that user on the machine."""
    if uid < _FIRST_USER_UID or uid == 65534:
        raise AssertionError(f"refusing to end the processes of uid {uid}: not a throwaway user")
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{entry.path}/status", "rb") as fh:
                    uids = next(line for line in fh if line.startswith(b"Uid:")).split()[1:]
                if int(uids[0]) == uid:
                    pids.append(int(entry.name))
    return pids


@pytest.fixture
def rootless_user() -> Iterator[RootlessUser]:
    """A throwaway user for rootless Podman. Needs /dev/net/tun usable by that user
    (slirp4netns; the device is 0600 on this machine): its mode is restored afterwards.
    All of the user's processes (podman's pause process survives the containers) are ended
    by pid, then the user and its home are removed."""
    need("podman")
    need("runc")
    need("useradd")
    need("busybox")
    name = f"rbrl{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-m", name], check=True, capture_output=True)
    # From the user database itself, not `id` (a stubbed /usr/bin/id printing 0 once made this
    # fixture's cleanup end every root process on the machine).
    uid = pwd.getpwnam(name).pw_uid
    if uid < _FIRST_USER_UID:
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)
        pytest.fail(f"useradd gave {name} uid {uid}, not a regular user's")
    home = Path(f"/home/{name}")
    run_dir = Path(f"/run/user/{uid}")
    tun = "/dev/net/tun"
    tun_mode = os.stat(tun).st_mode & 0o7777
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chown(run_dir, uid, uid)
        os.chmod(run_dir, 0o700)
        os.chmod(tun, 0o666)
        rootfs = busybox_rootfs(home / "rootfs")
        subprocess.run(["chown", "-R", f"{name}:{name}", str(rootfs)], check=True)
        yield RootlessUser(name, uid, home)
    finally:
        os.chmod(tun, tun_mode)
        for _ in range(3):
            pids = _pids_of_uid(uid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not _pids_of_uid(uid), 5, "the test user's processes to end")
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)
