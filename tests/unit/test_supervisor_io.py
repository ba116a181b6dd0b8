"""The supervisor's small I/O helpers, without root: pid file, log writes, notify budget."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rebind.errors import UsageError
from rebind.supervisor import members
from rebind.supervisor.fdreserve import FdReserve
from rebind.supervisor.notify import FdDisposal, NotifyReceiver
from rebind.supervisor.pidfile import remove_pid_file, write_pid_file


def test_pid_file_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    pid_file = tmp_path / "app.pid"
    pid_file.symlink_to(target)
    write_pid_file(str(pid_file))
    assert target.read_text() == "keep\n"
    assert not pid_file.is_symlink() and pid_file.read_text() == f"{os.getpid()}\n"
    assert oct(pid_file.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.pid", "precious"]  # no temp left
    remove_pid_file(str(pid_file))
    assert not pid_file.exists()


def test_pid_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--pid-file"):
        write_pid_file(str(tmp_path / "no" / "such" / "x.pid"))


def test_pid_file_of_another_supervisor_is_left_alone(tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    pid_file.write_text("1\n")
    remove_pid_file(str(pid_file))
    assert pid_file.read_text() == "1\n"


def test_log_to_a_closed_pipe_is_dropped() -> None:
    code = (
        "import os\nr, w = os.pipe()\nos.close(r)\nos.dup2(w, 2)\n"
        "from rebind.supervisor.run import stderr_log\n"
        "for _ in range(3):\n    stderr_log('line \\x1b[2J \\udcff')\nprint('alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "alive\n", out.stderr


def test_log_escapes_control_characters(capfd: pytest.CaptureFixture[str]) -> None:
    from rebind.supervisor.run import stderr_log

    stderr_log("name \x1b]0;PWN\x07 \udcff")
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\\x1b" in err and err.startswith("rebind run: ")


def test_notify_receive_takes_at_most_its_budget() -> None:
    rx = NotifyReceiver()
    try:
        sent = 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
            tx.setblocking(False)  # the queue holds net.unix.max_dgram_qlen (often 10) datagrams
            for _ in range(8):
                try:
                    tx.sendto(b"READY=1", "\0" + rx.address[1:])
                    sent += 1
                except BlockingIOError:
                    break
        assert sent >= 4
        assert len(rx.receive(3)) == 3
        assert len(rx.receive(64)) == sent - 3
        assert rx.receive(64) == []
    finally:
        rx.close()


def _p(pid: int, ppid: int, pgrp: int, start: int = 100, zombie: bool = False) -> members.ProcInfo:
    return members.ProcInfo(pid, ppid, pgrp, start, zombie)


def test_generation_members_are_group_tree_and_recorded_orphans() -> None:
    me = 10
    procs = {
        p.pid: p
        for p in (
            _p(10, 1, 10),  # the supervisor
            _p(20, 10, 20),  # generation 1's leader
            _p(21, 20, 20),  # its child, same group
            _p(22, 10, 22, start=5),  # an orphan that called setsid(), recorded earlier
            _p(23, 22, 22),  # ... and its child
            _p(24, 10, 24),  # an orphan we know nothing about (no REBIND_GENERATION readable)
            _p(25, 20, 20, zombie=True),
            _p(30, 10, 30),  # generation 2's leader
            _p(31, 30, 30),
            _p(40, 1, 20),  # in generation 1's group though not a descendant (setpgid)
        )
    }
    got = members.members(1, 20, 20, {(22, 5)}, me, procs, frozenset({30}))
    assert {pid for pid, _ in got} == {20, 21, 22, 23, 40}
    # After the leader is reaped, its group and the record still find the rest.
    del procs[20]
    got = members.members(1, None, 20, {(22, 5)}, me, procs, frozenset({30}))
    assert {pid for pid, _ in got} == {21, 22, 23, 40}
    # A recycled pid (other start time) is not a member.
    got = members.members(1, None, None, {(22, 6)}, me, procs, frozenset({30}))
    assert got == set()


def test_signal_verified_refuses_a_changed_start_time() -> None:
    assert members.signal_verified((os.getpid(), 1), 0) is False
    me = members.read_proc(os.getpid())
    assert me is not None and members.signal_verified((me.pid, me.start), 0) is True


def test_listen_spec_udp_and_tcp_prefixes() -> None:
    from rebind.supervisor.spec import check_unique, parse_listen

    udp = parse_listen("udp:127.0.0.1:5353/dns")
    assert (udp.proto, udp.host, udp.port, udp.name) == ("udp", "127.0.0.1", 5353, "dns")
    assert str(udp) == "udp:127.0.0.1:5353/dns"
    tcp = parse_listen("tcp:[::1]:8080", 1)
    assert (tcp.proto, tcp.host, tcp.port, tcp.name) == ("tcp", "::1", 8080, "listen1")
    check_unique((parse_listen("udp:53/a"), parse_listen("53/b")))  # same port, two protocols: fine


def test_outer_notifier_sends_with_fds_and_ignores_a_missing_socket(tmp_path: Path) -> None:
    import array

    from rebind.supervisor.notify import OuterNotifier

    assert (
        OuterNotifier.from_env({}) is None and OuterNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1"}) is None
    )
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "n"))
    tx = OuterNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "n")})
    assert tx is not None
    r, w = os.pipe()
    try:
        assert tx.send("FDSTORE=1\nFDNAME=web", (r,))
        data, anc, _, _ = rx.recvmsg(4096, socket.CMSG_SPACE(4))
        assert data == b"FDSTORE=1\nFDNAME=web"
        fds = array.array("i")
        fds.frombytes(anc[0][2])
        os.close(fds[0])
        rx.close()
        assert not tx.send("READY=1")  # the manager's socket is gone: dropped, no exception
    finally:
        tx.close()
        os.close(r)
        os.close(w)


def _lingering_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    """A client with SO_LINGER {1, 3600}, its accepted peer and the listener (loopback, no root)."""
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    return c, peer, srv


def _linger(s: socket.socket) -> tuple[int, int]:
    on, secs = struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    return on, secs


def test_foreign_inet_socket_is_closed_at_once_without_linger() -> None:
    """Issue 18 item 7: a passed socket from outside the generations gets SO_LINGER {1, 0} (close()
    resets instead of waiting) and is closed by the caller itself, at once."""
    c, peer, srv = _lingering_pair()
    disposal = FdDisposal()
    try:
        passed = os.dup(c.fileno())
        disposal.dispose((passed,), foreign=True)
        with pytest.raises(OSError):
            os.fstat(passed)  # closed already, not queued
        assert disposal.pending == 0
        assert _linger(c) == (1, 0)  # the same socket: the sender's copy resets too
    finally:
        disposal.close()
        for s in (c, peer, srv):
            s.close()


def test_generation_socket_keeps_its_linger_and_is_closed_off_the_caller() -> None:
    """A generation's passed socket may still be in use by the app: its options are not touched."""
    c, peer, srv = _lingering_pair()
    disposal = FdDisposal()
    try:
        passed = os.dup(c.fileno())
        disposal.dispose((passed,), foreign=False)
        disposal.close()
        deadline = time.monotonic() + 10
        while disposal.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disposal.pending == 0
        assert _linger(c) == (1, 3600)
    finally:
        for s in (c, peer, srv):
            s.close()


def test_foreign_unix_socket_goes_to_the_closer_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unix socket may carry queued fds whose release waits: the caller never closes it, and
    the closer's backlog is counted (the supervisor stops reading at ``limit``)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    passed = os.dup(b.fileno())
    gate = threading.Event()
    real_close = os.close

    def held_close(fd: int) -> None:
        if fd == passed:
            gate.wait(10)  # a close that waits, as a lingering release would
        real_close(fd)

    monkeypatch.setattr(os, "close", held_close)
    disposal = FdDisposal(limit=1)
    try:
        disposal.dispose((passed,), foreign=True)
        assert disposal.pending == 1 and disposal.full
        gate.set()
        deadline = time.monotonic() + 10
        while disposal.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disposal.pending == 0
    finally:
        gate.set()
        disposal.close()
        a.close()
        b.close()


def test_fd_reserve_is_released_for_a_retry_and_logged_once_per_shortage() -> None:
    """Issue 18 item 2: EMFILE -> the reserve is closed, the work retried, the reserve taken back."""
    reserve = FdReserve(3)
    lines: list[str] = []
    calls = 0

    def needs_fds() -> str:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        assert not reserve.fds  # retried with the reserve closed
        return "done"

    try:
        assert reserve.retry(needs_fds, lines.append, "start generation 2") == "done"
        assert reserve.retry(needs_fds, lines.append, "start generation 3") == "done"
        assert len(reserve.fds) == 3 and calls == 4
        assert lines == [
            "out of file descriptors (Too many open files) to start generation 2: using 3 reserved"
        ]
        with pytest.raises(OSError):  # not a shortage: not retried
            reserve.retry(lambda: os.close(-1), lines.append, "start generation 4")
        with pytest.raises(OSError, match="Too many"):  # KEEP: never below it
            reserve.retry(needs_fds, lines.append, "accept", 1, 3)
    finally:
        reserve.close()
    assert not reserve.fds
