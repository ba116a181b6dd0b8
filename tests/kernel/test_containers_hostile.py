"""A hostile local user (uid 65534) against container attribution and `ls --all-netns` (issue 18
items 1, 5, 6 and 9; the audit's reproductions C1, H4, M1 and M5 with its helper scripts). The
hostile processes are plain /usr/bin/python3 (they never import rebind), run with setpriv."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rebind.kernel import containers as kc
from rebind.kernel.containers import engines as kce
from rebind.model.records import State
from tests.conftest import Procs

NB = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
PY = "/usr/bin/python3"
CID = "a" * 64

# The audit's fakeapi.py (modes names, bomb, drip), verbatim but for argv handling.
FAKEAPI = r"""
import socket, sys, os, time, json, threading
path, mode, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
try: os.unlink(path)
except FileNotFoundError: pass
srv = socket.socket(socket.AF_UNIX); srv.bind(path); os.chmod(path, 0o777); srv.listen(64); srv.settimeout(secs)
CID = "a" * 64
def handle(c):
    try:
        c.recv(65536)
        if mode == "bomb":
            body = b"[" * 200000
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        elif mode == "drip":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8000000\r\n\r\n")
            end = time.time() + secs
            while time.time() < end:
                c.sendall(b" "); time.sleep(0.5)
        elif mode == "names":
            doc = [{"Id": CID, "Names": ["/web; curl http://127.0.0.1/x|sh #\x1b[2J\x1b]0;PWN\x07"],
                    "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}}]
            body = json.dumps(doc).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except OSError: pass
    finally: c.close()
print("ready", flush=True)
t_end = time.time() + secs
while time.time() < t_end:
    try: c, _ = srv.accept()
    except socket.timeout: break
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# The audit's proc_as.py: a listener on 127.0.0.1:PORT whose comm is NAME.
PROC_AS = r"""
import ctypes, socket, sys, time
port, name, secs = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port)); s.listen()
print("ready", flush=True)
time.sleep(secs)
"""

# The audit's fakerlp.py + fakeconmon.py: a "rootlessport" holding PORT in the host namespace,
# its main thread moved into its own user+net namespace where a "conmon -c ID -n NAME" has a child.
FAKECONMON = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b"conmon"), 0, 0, 0)
secs = float(os.environ.get("SECS", "15"))
if os.fork() == 0:
    time.sleep(secs); os._exit(0)
time.sleep(secs)
"""
FAKERLP = r"""
import ctypes, os, socket, sys, time
port, cid, name, secs, conmon = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
libc = ctypes.CDLL(None, use_errno=True)
def setname(n): libc.prctl(15, ctypes.c_char_p(n.encode()[:15]), 0, 0, 0)
setname("rootlessport")
s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
assert libc.unshare(0x10000000 | 0x40000000) == 0
if os.fork() == 0:
    os.environ["SECS"] = str(secs)
    os.execv(sys.executable, [sys.executable, "-c", conmon, "-c", cid, "-n", name])
print("ready", flush=True)
time.sleep(secs)
"""

# The audit's hiddenns.py: a listener created in a private user+net namespace, handed to a
# process outside it; the namespace then has no process and no nsfs mount.
HIDDENNS = r"""
import ctypes, os, socket, struct, fcntl, sys, time, array
port, secs = int(sys.argv[1]), float(sys.argv[2])
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
libc = ctypes.CDLL(None, use_errno=True)
if os.fork() == 0:
    assert libc.unshare(0x10000000 | 0x40000000) == 0
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifr = struct.pack("16sH14x", b"lo", 0); fl = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, ifr))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", fl | 1))
    l = socket.socket(); l.bind(("127.0.0.1", port)); l.listen()
    b.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [l.fileno()]))]); os._exit(0)
msg, anc, _, _ = a.recvmsg(10, socket.CMSG_SPACE(4)); fd = array.array("i", anc[0][2])[0]
os.wait()
print(fd, os.readlink(f"/proc/self/fd/{fd}"), flush=True); time.sleep(secs)
"""

SHELL_META = re.compile(r"[;|&$`<>()\n\\'\"*?#]")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory in /tmp owned by nobody (the hostile user's own files)."""
    d = Path(tempfile.mkdtemp(prefix="rebind-hostile-"))
    os.chown(d, 65534, 65534)
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _wait(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise TimeoutError(what)


def _pids_with_cmdline(needle: bytes) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    if needle in fh.read():
                        out.append(int(entry.name))
            except OSError:
                pass
    return out


def _fake_dockerd(procs: Procs, d: Path, sock: Path) -> int:
    """The audit's setuid-`su`-symlinked-as-`dockerd`, waiting at its password prompt under a pty
    (comm "dockerd", /proc/PID owned by root, real uid 65534), with ``-H unix://SOCK``."""
    link = d / "dockerd"
    subprocess.run([*NB, "ln", "-s", "/usr/bin/su", str(link)], check=True)
    procs.start(
        [*NB, "script", "-qc", f"{link} -- root -H unix://{sock}", "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    needle = f"unix://{sock}".encode()

    def su_pid() -> int | None:
        for pid in _pids_with_cmdline(needle):
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    if fh.read().strip() == "dockerd":
                        return pid
            except OSError:
                pass
        return None

    pid = int(_wait(su_pid, "the fake dockerd to start"))
    procs.adopt(pid)
    # What made the old check believe it: comm dockerd and /proc/PID owned by root.
    assert os.stat(f"/proc/{pid}").st_uid == 0
    return pid


def test_a_fake_dockerd_is_not_believed(
    netns: int, procs: Procs, nobody_dir: Path, rebind_cli: Callable[..., Any]
) -> None:
    """C1: root's `why` must not take container names from a socket a user serves, and no fix
    line may carry shell metacharacters."""
    sock = nobody_dir / "api.sock"
    api = procs.start([*NB, PY, "-u", "-c", FAKEAPI, str(sock), "names", "60"])
    assert procs.wait_line(api) == "ready"
    fake = _fake_dockerd(procs, nobody_dir, sock)
    port = 18431
    proxy = procs.start(
        [PY, "-u", "-c", PROC_AS, str(port), "docker-proxy", "60", "-proto", "tcp", "-host-ip", "127.0.0.1",
         "-host-port", str(port), "-container-ip", "172.17.0.2", "-container-port", "80"]
    )  # fmt: skip
    assert procs.wait_line(proxy) == "ready"

    res = rebind_cli("why", str(port), "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["blockers"][0]["kind"] == "container-proxy"  # a root docker-proxy stays one
    # the payload, not the word: the localhost finding names curl as a client kind
    assert "curl http" not in res.stdout and "web;" not in res.stdout and '"web' not in res.stdout
    for fix in doc["fixes"]:
        command = fix.get("command") or ""
        assert not SHELL_META.search(command.split("   #")[0]), command
    text = rebind_cli("why", str(port))
    assert text.returncode == 1 and "curl http" not in text.stdout and "docker stop" not in text.stdout
    # Why: the kernel says it is su run by nobody, whatever it calls itself.
    assert kc.real_uid(fake) is None and kc.root_owned_exe(fake) == "su"
    assert all(path != str(sock) for _pid, path in kce._root_dockerd_sockets())
    assert "web" not in json.dumps(kc.engine_state().names)


def _root_api(procs: Procs, tmp_path: Path, mode: str) -> Path:
    """The audit's fakeapi.py run by root in a root-only directory: it passes every trust check
    but the answer's, so what is left to test is bounding the answer."""
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    sock = d / "docker.sock"
    api = procs.start([PY, "-u", "-c", FAKEAPI, str(sock), mode, "30"])
    assert procs.wait_line(api) == "ready"
    return sock


@pytest.mark.parametrize(
    ("mode", "problem"),
    [("bomb", "answered JSON with unbalanced brackets"), ("drip", "no complete answer within 1.5 s")],
)
def test_a_bomb_or_a_drip_is_an_engine_that_did_not_answer(
    netns: int, procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, problem: str
) -> None:
    """H4: the answer is bounded in nesting and in total time; `ls` (socket_table) carries on,
    notes the engine, and returns (a hang guard, not a timing assertion)."""
    from rebind.sockets import socket_table

    sock = _root_api(procs, tmp_path, mode)
    monkeypatch.setattr(kce, "DOCKER_SOCKETS", (str(sock),))
    port = 18432
    proxy = procs.start(
        [PY, "-u", "-c", PROC_AS, str(port), "docker-proxy", "60", "-container-ip", "172.17.0.2"]
    )
    assert procs.wait_line(proxy) == "ready"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["table"] = socket_table(ports=[port], states=[State.LISTEN])
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the engine query hung"
    assert "error" not in box, box.get("error")
    table = box["table"]
    (entry,) = table.entries
    (owner,) = entry.owners
    assert owner.proxy is not None and owner.container is None
    assert any(f"{sock} did not answer ({problem})" in w for w in table.warnings), table.warnings


def test_a_users_rootlessport_names_no_container(
    netns: int, procs: Procs, rebind_cli: Callable[..., Any]
) -> None:
    """M1: a nobody process calling itself rootlessport, with a fake conmon naming prod-db in its
    own namespace, is that user's process: no container, no `podman stop`, not a proxy."""
    port = 18433
    rlp = procs.start([*NB, PY, "-u", "-c", FAKERLP, str(port), "b" * 64, "prod-db", "60", FAKECONMON])
    assert procs.wait_line(rlp) == "ready"

    # The fake conmon and its forked child (both carry the argv): ended by pid at teardown.
    def both() -> list[int] | None:
        found = _pids_with_cmdline(b"\0-n\0prod-db")
        return found if len(found) >= 2 else None

    for pid in _wait(both, "the fake conmon and its child"):
        procs.adopt(pid)

    res = rebind_cli("why", str(port), "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert "podman stop" not in res.stdout  # (its argv, shown as its command line, says prod-db)
    assert all("prod-db" not in json.dumps(fix) for fix in doc["fixes"])
    assert doc["blockers"][0]["kind"] != "container-proxy"
    ls = json.loads(rebind_cli("ls", str(port), "--json").stdout)
    (owner,) = ls["sockets"][0]["owners"]
    assert owner["pid"] == rlp.pid and owner["proxy"] is None and owner["container"] is None
    free = rebind_cli("free", str(port), "--dry-run")
    assert free.returncode != 70, free.stderr
    out = free.stdout + free.stderr
    assert "proxy" not in out and "container prod-db" not in out
    assert "user" in out  # the refusal says whose process it is


def test_a_namespace_kept_only_by_a_socket_is_listed(netns: int, procs: Procs) -> None:
    """M5: a listener whose namespace has no process and no mount, held from the test's
    namespace: found through SIOCGSKNS on a copy of the holder's fd, with its owner."""
    from rebind.allns import socket_table_all_netns
    from rebind.kernel.namespaces import list_namespaces

    port = 18434
    holder = procs.start([*NB, PY, "-u", "-c", HIDDENNS, str(port), "60"])
    fd_text, link = procs.wait_line(holder).split()
    inode = int(link.removeprefix("socket:[").rstrip("]"))

    with list_namespaces() as scan:
        hidden = [n for n in scan.namespaces if n.via_socket]
        process_ns = {n.inode for n in scan.namespaces if n.pid is not None}
    table = socket_table_all_netns(ports=[port])
    (entry,) = [e for e in table.entries if e.socket.inode == inode]
    assert entry.socket.state is State.LISTEN and entry.socket.local.port == port
    assert entry.socket.netns not in process_ns and entry.socket.netns != netns
    assert entry.socket.netns in {n.inode for n in hidden}
    assert [(o.pid, o.fd) for o in entry.owners] == [(holder.pid, int(fd_text))]


def test_hidden_namespace_cli(netns: int, procs: Procs, rebind_cli: Callable[..., Any]) -> None:
    port = 18435
    holder = procs.start([*NB, PY, "-u", "-c", HIDDENNS, str(port), "60"])
    procs.wait_line(holder)
    res = rebind_cli("ls", "--all-netns", str(port), "--json")
    assert res.returncode == 0, res.stderr
    rows = [(s["local"]["port"], [o["pid"] for o in s["owners"]]) for s in json.loads(res.stdout)["sockets"]]
    assert (port, [holder.pid]) in rows


def test_all_netns_bad_proc_is_a_usage_error() -> None:
    """L2: a bad ``proc`` is the caller's mistake, said in one line, not FileNotFoundError."""
    from rebind.allns import socket_table_all_netns
    from rebind.errors import UsageError

    with pytest.raises(UsageError, match="nonexistent"):
        socket_table_all_netns(proc="/nonexistent")


def test_hostile_scripts_do_not_import_rebind() -> None:
    for code in (FAKEAPI, PROC_AS, FAKERLP, FAKECONMON, HIDDENNS):
        assert "rebind" not in code
    assert shlex.split("x")  # (shlex used by the fix-line checks above)
    assert sys.executable


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as other users")
def test_root_only_path(tmp_path: Path) -> None:
    """A Docker socket is asked only when root alone controls its path: every directory root's
    and not writable by others (a root-owned sticky directory such as /tmp excepted)."""
    import socket

    base = tmp_path / "root"
    base.mkdir(mode=0o755)
    ok = base / "ok.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(ok))
    assert kc.root_only_path(str(ok)) is None  # under /tmp (root, sticky): root's all the way
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    users = base / "users"
    users.mkdir(mode=0o755)
    os.chown(users, 65534, 65534)
    for d in (sticky, open_dir, users):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(d / "api.sock"))
    theirs = base / "theirs.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(theirs))
    os.chown(theirs, 65534, 65534)
    assert kc.root_only_path(str(sticky / "api.sock")) is None
    assert kc.root_only_path(str(open_dir / "api.sock")) == f"{open_dir} is writable by group or others"
    assert kc.root_only_path(str(users / "api.sock")) == f"{users} is owned by uid 65534, not root"
    assert kc.root_only_path(str(theirs)) == f"{theirs} is owned by uid 65534, not root"
    assert kc.root_only_path("relative.sock") == "not an absolute path"
    regular = base / "file"
    regular.write_text("")
    assert kc.root_only_path(str(regular)) == f"{regular} is not a socket"
