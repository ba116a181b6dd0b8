"""`rebind top --record` under a hostile user's churning listener (audit 2026-12-05 M3).

The audit's churnbig.py, scaled down: uid 65534 restarts, again and again, a listener whose
command line is two 20,000-character non-ASCII arguments (240 KB per owner line as the record
used to store it, so ~14 MB for this run). The test drives the recording pipeline of
`rebind top` itself (Sampler -> diff -> Recorder, what TopApp.show does at each refresh) and
checks the file never passes its cap, lines stay small, and `rebind history` reads the result.
The churner is paced by the test (one restart per line on stdin): no sleeps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rebind.top.events import diff
from rebind.top.record import MIN_MAX_BYTES, Recorder
from rebind.top.sampler import Sampler

PORT = 18600
ROUNDS = 30

# Runs as uid 65534 without rebind: for each line on stdin, start a listener with a huge argv,
# say "up" once it listens, then stop it at the next line and say "down".
CHURN = f"""
import subprocess, sys
arg = "\\u00e9" * 20000
code = ("import socket,sys;s=socket.socket();s.bind(('127.0.0.1',{PORT}));s.listen();"
        "print('up',flush=True);sys.stdin.readline()")
for _ in range({ROUNDS}):
    p = subprocess.Popen([sys.executable, "-c", code, arg, arg], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    print("up", flush=True)
    sys.stdin.readline()
    p.stdin.write("x\\n"); p.stdin.flush(); p.wait()
    print("down", flush=True)
    sys.stdin.readline()
"""


def test_a_churning_huge_argv_cannot_fill_the_disk(netns, procs, tmp_path: Path, rebind_cli) -> None:  # type: ignore[no-untyped-def]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    tmp_path.chmod(0o755)
    churn = procs.start(
        [
            setpriv,
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-u",
            "-c",
            CHURN,
        ],
        stdin=subprocess.PIPE,
        cwd="/",
    )
    assert churn.stdin is not None
    record = tmp_path / "ports.jsonl"
    cap = MIN_MAX_BYTES
    sampler = Sampler([PORT], interval=1.0)
    rec = Recorder(str(record), max_bytes=cap)
    prev = None
    owner_lines = 0
    try:
        for _ in range(ROUNDS):
            for want in ("up", "down"):
                assert procs.wait_line(churn, timeout=30) == want
                snap = sampler.sample()
                cur = snap.by_key()
                events = diff(prev, cur, snap.taken_at)
                prev = cur
                owner_lines += sum(1 for e in events if e.owner is not None)
                rec.write(events)
                churn.stdin.write("\n")
                churn.stdin.flush()
                assert record.stat().st_size <= cap
    finally:
        rec.close()
    assert churn.wait(30) == 0
    assert owner_lines == 2 * ROUNDS  # every restart was seen, with its owner
    old = Path(f"{record}.1")
    assert rec.rotations >= 1 and old.stat().st_size <= cap and record.stat().st_size <= cap
    owners = []
    for f in (old, record):
        for line in f.read_text().splitlines():
            assert len(line) < 8 * 1024  # was ~240 KB per owner line
            doc = json.loads(line)
            if doc["owner"] is not None:
                owners.append(doc["owner"])
    assert owners and all(o["truncated"] for o in owners)
    assert {o["user"] for o in owners} <= {"nobody", "65534"}
    for f in (old, record):
        res = rebind_cli("history", str(f), str(PORT))
        assert res.returncode == 0, res.stderr
        assert "18600/tcp" in res.stdout
