"""Snippets run as real processes inside the test's network namespace."""

from __future__ import annotations

import json
import subprocess
from typing import Any

LISTEN = """
import socket, sys, time
s = socket.socket()
{opts}s.bind(({addr!r}, {port}))
s.listen()
print('ready', flush=True)
time.sleep(600)
"""

BOUND_ONLY = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', {port}))
print('ready', flush=True)
time.sleep(600)
"""

# Server accepts one client and closes first -> server-side TIME_WAIT.
TIME_WAIT = """
import socket
s = socket.socket()
{opts}s.bind(('127.0.0.1', {port}))
s.listen()
c = socket.create_connection(('127.0.0.1', {port}))
a, _ = s.accept()
a.close()
c.close()
s.close()
print('ready', flush=True)
"""

# Parent binds, forks a child that keeps the listener, parent exits.
ORPHAN_CHILD = """
import os, socket, sys, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
pid = os.fork()
if pid == 0:
    os.setsid() if False else None
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""

SHARED = """
import os, socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    kids.append(pid)
print(' '.join(map(str, kids)), flush=True)
time.sleep(600)
"""

OTHER_UID = """
import os, socket, time
os.setgid(65534); os.setuid(65534)
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
time.sleep(600)
"""


def ls_json(rebind_cli: Any, *args: str) -> dict[str, Any]:
    res: subprocess.CompletedProcess[str] = rebind_cli("ls", *args, "--json")
    assert res.returncode in (0, 1), res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc
