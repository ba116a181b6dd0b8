"""rebind.listen(), the LISTEN_FDS reader, sd_notify and the /proc readiness parsers."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from rebind.errors import UsageError
from rebind.supervisor import listen as L
from rebind.supervisor.notify import FdDisposal, NotifyReceiver
from rebind.supervisor.procscan import _parse_epoll_fdinfo, serving
from rebind.supervisor.run import exit_code
from rebind.supervisor.spec import ListenSpec, check_unique, parse_listen

T = TypeVar("T")


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("8080", ListenSpec("", 8080, "listen0")),
        ("127.0.0.1:8080", ListenSpec("127.0.0.1", 8080, "listen0")),
        ("*:80/web", ListenSpec("", 80, "web")),
        ("[::1]:8080/api", ListenSpec("::1", 8080, "api")),
        ("localhost:1", ListenSpec("localhost", 1, "listen0")),
    ],
)
def test_parse_listen(text: str, spec: ListenSpec) -> None:
    assert parse_listen(text) == spec


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "no port"),
        ("::1:80", "brackets"),
        ("x:99999", "out of range"),
        ("x:²", "not a port"),
        ("²", "no port"),
        ("8080/a:b", "name"),
        ("[::1:80", "bracketed"),
    ],
)
def test_parse_listen_rejects(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_listen(text)


def test_duplicate_names_rejected() -> None:
    with pytest.raises(UsageError, match="twice"):
        check_unique((parse_listen("1/a"), parse_listen("2/a")))


def test_exit_code_follows_the_shell() -> None:
    assert exit_code(3 << 8) == 3
    assert exit_code(9) == 137


def test_epoll_fdinfo_parser() -> None:
    lines = [
        "pos:\t0",
        "tfd:        3 events:       19 data:                3  pos:0 ino:141166 sdev:9",
        "tfd:        7 events:        4 data:                7  pos:0 ino:ff sdev:9",  # EPOLLOUT only
    ]
    assert _parse_epoll_fdinfo(lines) == {0x141166}


READER = r"""
import os, socket, sys, json
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
port = s.getsockname()[1]; fd = s.detach()
if fd != 3:
    os.dup2(fd, 3); os.close(fd)
os.set_inheritable(3, True)  # as a supervisor hands it over
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="web", LISTEN_PID=sys.argv[1] or str(os.getpid()))
import rebind
from rebind.errors import UsageError
got = rebind.inherited_sockets()
out = {"n": len(got), "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
if got:
    out.update(name=got[0].name, inheritable=os.get_inheritable(3), same=rebind.listen(name="web") is got[0].sock)
    try:
        rebind.listen("127.0.0.1", port + 1)
    except UsageError as exc:
        out["mismatch"] = str(exc)
else:
    out["fd3_open"] = os.get_inheritable(3)  # not ours: left alone
print(json.dumps(out))
"""


def _reader(netns: int, listen_pid: str) -> dict[str, object]:
    import json

    out = subprocess.run(
        [sys.executable, "-c", READER, listen_pid], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_inherited_sockets_follow_sd_listen_fds(netns: int) -> None:
    got = _reader(netns, "")
    assert got["n"] == 1 and got["name"] == "web" and got["same"] is True
    assert got["inheritable"] is False  # close-on-exec: grandchildren do not get it
    assert got["env"] == []  # variables cleared
    assert "no inherited socket matches port" in str(got["mismatch"])


def test_inherited_sockets_ignore_another_pids_fds(netns: int) -> None:
    got = _reader(netns, "1")
    assert got["n"] == 0 and got["env"] == [] and got["fd3_open"] is True


def test_listen_binds_itself_with_explicit_options(netns: int) -> None:
    L._reset_for_tests()
    with L.listen("", 0) as s:
        assert s.family == socket.AF_INET6
        assert s.getsockopt(socket.IPPROTO_IPV6, L.IPV6_V6ONLY) == 0  # dual-stack, explicitly
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with socket.create_connection(("127.0.0.1", s.getsockname()[1]), timeout=5):
            pass
    with L.listen("::1", 0) as s6:
        assert s6.getsockopt(socket.IPPROTO_IPV6, L.IPV6_V6ONLY) == 1


def test_bind_failure_is_explained(netns: int) -> None:
    with L.listen("127.0.0.1", 0) as held:
        port = held.getsockname()[1]
        with pytest.raises(OSError) as info:
            L.listen("127.0.0.1", port)
    assert info.value.errno == 98
    assert info.value.__notes__ and str(port) in "".join(info.value.__notes__)


def test_notify_carries_kernel_checked_pid_and_closes_passed_fds(
    netns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rx = NotifyReceiver()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", rx.address)
        assert L.notify_ready("serving")
        # FDSTORE-style message carrying an fd: the receiver must not keep it.
        r, w = os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
            fds = array.array("i", [r])
            tx.sendmsg(
                [b"FDSTORE=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, "\0" + rx.address[1:]
            )
        os.close(r)
        os.close(w)
        before = len(os.listdir("/proc/self/fd"))
        msgs = rx.receive()
        # The passed fd is handed back for the supervisor's FdDisposal (the sender decides how
        # it is closed); disposing of it leaves nothing in our table.
        assert len(msgs[1].fds) == 1
        disposal = FdDisposal()
        disposal.dispose(msgs[1].fds, foreign=True)
        disposal.close()
        _wait_for(lambda: len(os.listdir("/proc/self/fd")) == before, "the passed fd to be closed")
    finally:
        rx.close()
    assert [m.get("READY") for m in msgs] == ["1", None]
    assert msgs[0].pid == os.getpid() and msgs[0].get("STATUS") == "serving"


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert L.notify_ready() is False


def test_serving_sees_blocking_accept_not_a_mere_listener(netns: int) -> None:
    waits = {"accept": "s.accept()", "sleep": "time.sleep(60)"}
    code = "import socket, time\ns = socket.socket(fileno=3)\nprint('go', flush=True)\n"
    with socket.create_server(("127.0.0.1", 0)) as s:
        ino = frozenset({os.fstat(s.fileno()).st_ino})
        results = {}
        for mode in ("accept", "sleep"):
            p = _with_fd3(code + waits[mode], s.fileno())
            try:
                assert p.stdout is not None and p.stdout.readline().strip() == "go"
                results[mode] = _served_once_waiting(p.pid, ino, mode)
            finally:
                p.kill()
                p.wait()
    assert results["accept"] and "accept" in str(next(iter(results["accept"].values())))
    assert results["sleep"] == {}  # holds the socket, waits on nothing: not serving


def _served_once_waiting(pid: int, ino: frozenset[int], mode: str) -> dict[int, object]:
    """serving() once the child waits: in accept() (it serves from then on), or in a sleep."""
    if mode == "accept":
        return _wait_for(lambda: dict(serving(pid, ino)), "the child to enter accept()")
    _wait_for(lambda: _blocked(pid), "the child to block in time.sleep()")
    return dict(serving(pid, ino))


def _wait_for(cond: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """cond()'s first true value, polled until a deadline (a loaded machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return got


def _blocked(pid: int) -> bool:
    """The process sleeps inside a system call (state S, /proc/PID/syscall not "running")."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/syscall") as f:
            call = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return state == "S" and call not in ("running", "-1")


def _with_fd3(code: str, fd: int) -> subprocess.Popen[str]:
    """Start CODE with FD duplicated to 3 (the way a supervisor hands it over)."""
    prelude = f"import os\nif {fd} != 3:\n    os.dup2({fd}, 3)\n    os.close({fd})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code], pass_fds=(fd,), stdout=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("port", [70000, -1, 65536, True])
def test_listen_rejects_ports_out_of_range(port: int) -> None:
    """getaddrinfo wraps 70000 to 4464: listen() would bind a port nobody asked for."""
    L._reset_for_tests()
    with pytest.raises(UsageError):
        L.listen("127.0.0.1", port)
    with pytest.raises(UsageError):
        L.bind_listener("127.0.0.1", port)
    with pytest.raises(UsageError):
        import asyncio

        asyncio.run(L.start_server(lambda r, w: None, "127.0.0.1", port))


def test_listen_spec_rejects_ports_out_of_range() -> None:
    with pytest.raises(UsageError):
        ListenSpec("", 70000, "web")


UDP_AND_TCP = r"""
import os, socket, sys, json
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
port = u.getsockname()[1]
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", port)); t.listen()
for want, s in ((3, u), (4, t)):  # UDP first: the one a port match used to pick
    fd = s.detach()
    if fd != want:
        os.dup2(fd, want)
        os.close(fd)
os.environ.update(LISTEN_FDS="2", LISTEN_PID=str(os.getpid()))
import rebind
s = rebind.listen("127.0.0.1", port)
print(json.dumps({"type": int(s.type), "fd": s.fileno()}))
"""


def test_listen_picks_the_tcp_socket_when_udp_shares_the_port(netns: int) -> None:
    import json

    out = subprocess.run([sys.executable, "-c", UDP_AND_TCP], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"type": int(socket.SOCK_STREAM), "fd": 4}


def test_huge_listen_fds_is_bounded_and_warned_once() -> None:
    code = (
        "import os\nos.environ.update(LISTEN_FDS='2147483647', LISTEN_PID=str(os.getpid()))\n"
        "import rebind\nprint(len(rebind.inherited_sockets()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "0"
    assert len(out.stderr.splitlines()) <= 2, out.stderr[:500]
