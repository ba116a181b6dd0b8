"""`rebind why` on a narrow colour terminal (COLUMNS=40): fix lines are never wrapped.

A command split over two lines is not pasteable. rich wraps every printed line at the
terminal's width; the lines that carry something to paste (``$ `` commands, ``Python:`` /
``C:`` code, ``fix:``) are printed whole (the terminal folds them for display only).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios

from rebind.render.why import is_fix_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _on_a_tty(args: list[str], columns: int) -> str:
    """What `rebind ARGS` writes to a terminal ``columns`` wide (a pty: rich sees a tty)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS=str(columns), TERM="xterm-256color")
    p = subprocess.Popen(
        [sys.executable, "-m", "rebind", *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert p.wait(timeout=60) in (0, 1)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


def test_fix_lines_are_whole_at_40_columns(netns, rebind_cli):
    keep = socket.socket()
    keep.bind(("127.0.0.1", 18950))  # no SO_REUSEADDR: busy, with commands among the fixes
    keep.listen()
    try:
        plain = rebind_cli("why", "18950")  # NO_COLOR, not a tty: never wrapped
        narrow = _on_a_tty(["why", "18950"], 40)
    finally:
        keep.close()
    fixes = [line.rstrip() for line in plain.stdout.splitlines() if is_fix_line(line)]
    assert any(line.strip().startswith("$ ") and len(line) > 40 for line in fixes)
    shown = {line.rstrip() for line in narrow.splitlines()}
    assert [f for f in fixes if f not in shown] == []
    assert any(len(line) > 40 for line in shown)  # they are whole ...
    # ... while prose still wraps at the terminal's width
    prose = [line for line in narrow.splitlines() if line.strip() and not is_fix_line(line)]
    assert all(len(line) <= 40 for line in prose)


def test_connect_fix_lines_are_whole_at_40_columns(netns, rebind_cli):
    """`why --connect` (its own renderer, the same RichOut.print(nowrap=True)): the range is used
    up, the fixes print sysctl commands and code lines; none is split."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("40000 40001")
    srv = socket.create_server(("127.0.0.1", 9000))
    clients = [socket.create_connection(("127.0.0.1", 9000)) for _ in range(2)]
    try:
        plain = rebind_cli("why", "--connect", "127.0.0.1:9000")
        narrow = _on_a_tty(["why", "--connect", "127.0.0.1:9000"], 40)
    finally:
        for c in (*clients, srv):
            c.close()
    pasted = [line.rstrip() for line in plain.stdout.splitlines() if line.lstrip().startswith(("$ ", "C: "))]
    assert any(line.lstrip().startswith("$ sysctl") and len(line) > 40 for line in pasted)
    shown = {line.rstrip() for line in narrow.splitlines()}
    assert [line for line in pasted if line not in shown] == []
