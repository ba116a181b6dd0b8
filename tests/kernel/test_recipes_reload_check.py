"""`rebind why --reload`, against the kernel: the queued connections a SO_REUSEPORT hand-off
resets when the old listener closes (200 of 200 with tcp_migrate_req=0, 0 with 1, 0 while
another process still holds the old socket), the warning that predicts it, and its printed
command, run exactly as printed in this throwaway namespace, which makes the hand-off lose none."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from rebind.model.reload import SAME_GENERATION_SECONDS
from tests.conftest import Procs

PORT = 8400
QUEUED = 200

# A generation of a SO_REUSEPORT server that never accepts; "close" closes its listener, after
# handing a copy to a child first when HOLD is set (the socket then stays open).
GEN = r"""
import os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", {port}))
s.listen(1024)
print("ready", flush=True)
if sys.stdin.readline().strip() == "close":
    pid = 0
    if {hold}:
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
    s.close()
    print("closed", pid, flush=True)
time.sleep(600)
"""


def printed_commands(stdout: str) -> list[str]:
    """The ``  $ LINE`` lines of the plain output: each is meant to be pasted as is."""
    return [line[4:] for line in stdout.splitlines() if line.startswith("  $ ")]


@pytest.mark.parametrize(
    ("migrate", "hold", "run_fix", "resets"),
    [(0, False, False, QUEUED), (1, False, False, 0), (0, True, False, 0), (0, False, True, 0)],
)
def test_reuseport_handoff_resets_queued_connections(
    netns: int,
    procs: Procs,
    rebind_cli: Callable[..., subprocess.CompletedProcess[str]],
    migrate: int,
    hold: bool,
    run_fix: bool,
    resets: int,
) -> None:
    with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:  # this namespace only
        f.write(str(migrate))
    old = procs.start([sys.executable, "-u", "-c", GEN.format(port=PORT, hold=hold)], stdin=-1)
    assert procs.wait_line(old) == "ready"
    started = time.monotonic()  # the old generation started before this
    clients = [socket.create_connection(("127.0.0.1", PORT), timeout=5) for _ in range(QUEUED)]
    # Another generation is one started later (rebind tells them apart by start time).
    while time.monotonic() - started < 1.2 * SAME_GENERATION_SECONDS:
        time.sleep(0.05)
    new = procs.start([sys.executable, "-u", "-c", GEN.format(port=PORT, hold=False)], stdin=-1)
    assert procs.wait_line(new) == "ready"

    r = rebind_cli("why", "--reload", str(PORT))
    if migrate == 0:
        assert r.returncode == 1 and f"{QUEUED} connection(s) wait" in r.stdout, r
        assert "RESETS" in r.stdout
        commands = printed_commands(r.stdout)
        assert commands and any("tcp_migrate_req=1" in c for c in commands), r.stdout
    else:
        assert r.returncode == 0 and "moves them" in r.stdout, r
    if run_fix:
        for command in commands:  # exactly as printed, in this namespace (the netns fixture)
            done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and not done.stderr, (command, done)
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            assert f.read().strip() == "1"
        r = rebind_cli("why", "--reload", str(PORT))
        assert r.returncode == 0 and "moves them" in r.stdout and not printed_commands(r.stdout), r

    assert old.stdin is not None
    old.stdin.write("close\n")
    old.stdin.flush()
    word, holder = procs.wait_line(old).split()
    assert word == "closed"
    if hold:
        procs.adopt(int(holder))
    reset = 0
    for c in clients:
        c.setblocking(False)
        try:
            c.recv(1)
        except ConnectionResetError:
            reset += 1
        except BlockingIOError:
            pass  # still queued (in the new listener, or in the held old one)
        finally:
            c.close()
    assert reset == resets
