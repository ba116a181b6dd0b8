"""The README's and docs' examples, run for real (issue 18 #16): docs that drift fail here.

Each example is rebuilt in a throwaway namespace and the real output is compared with the
documented one by its SHAPE -- headings, row labels, fix titles, commands, JSON keys -- not by
numbers (ports, pids, seconds).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def fenced(path: Path, anchor: str, lang: str) -> str:
    """The ```lang block that contains ``anchor``, or else the first one after it."""
    text = path.read_text()
    at = text.index(anchor)
    for m in re.compile(rf"^```{lang}\n(.*?)^```", re.M | re.S).finditer(text):
        if m.end() > at:
            return m.group(1)
    raise AssertionError(f"no ```{lang} block at {anchor!r} in {path.name}")


def in_a_terminal(args: list[str], answer: str, timeout: float = 30) -> tuple[int, str]:
    """Run ``args`` on a pseudo-terminal, as a pasted line runs, typing ``answer`` to a prompt."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    env = dict(os.environ, NO_COLOR="1")
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
                if not sent and b"?" in out:
                    os.write(master, answer.encode())
                    sent = True
            elif p.poll() is not None:
                break
        return p.wait(timeout=5), out.decode(errors="replace")
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()


def _num(s: str) -> str:
    return re.sub(r"\d+", "#", s)


def why_shape(text: str) -> dict[str, list[str]]:
    """Headline and headings, the "what works" row labels, fix titles and the `$ ` commands."""
    shape: dict[str, list[str]] = {"headings": [], "rows": [], "fixes": [], "commands": []}
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            shape["headings"].append(_num(line))
        elif m := re.match(r"^  [✓✗?] (.+?)\s{2,}", line):
            shape["rows"].append(_num(m.group(1)))
        elif m := re.match(r"^  \d+\. (.*)$", line):
            shape["fixes"].append(_num(m.group(1)))
        elif m := re.match(r"^\s+\$ (.*)$", line):
            shape["commands"].append(_num(m.group(1)))
    return shape


def time_wait_left_by_a_server(port: int) -> None:
    """The README's scenario: a server without SO_REUSEADDR served a client and exited."""
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen()
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = s.accept()
    a.close()  # the server closes first: its side is the TIME_WAIT
    c.close()
    s.close()


def test_readme_why_sample_is_the_real_output(netns, rebind_cli):
    doc = fenced(README, "### `rebind why` in one screen", "text")
    first, _, documented = doc.partition("\n")
    assert first.startswith("$ rebind ")
    args = first.split()[2:]
    time_wait_left_by_a_server(int(args[-1]))
    res = rebind_cli(*args)
    assert res.returncode == 1, res.stderr
    assert why_shape(res.stdout) == why_shape(documented), res.stdout


def test_readme_why_sample_commands_run_as_printed(netns, rebind_cli):
    """The `$ ` lines of that output, pasted: free, then wait (now immediate), pick; the
    supervisor line's YOUR-SERVER placeholder fails cleanly."""
    time_wait_left_by_a_server(12345)
    res = rebind_cli("12345")
    cmds = [m.group(1) for m in re.finditer(r"^\s+\$ (.*)$", res.stdout, re.M)]
    assert {c.split()[1] for c in cmds} == {"wait", "free", "pick", "run"}, cmds
    order = sorted(cmds, key=lambda c: ["free", "wait", "pick", "run"].index(c.split()[1]))
    for cmd in order:
        if cmd.startswith("rebind free"):
            # `free` asks before it acts: answered as a user at a terminal would.
            code, text = in_a_terminal([sys.executable, "-m", "rebind", *cmd.split()[1:]], "y\n")
            assert code == 0 and "Proceed?" in text, text
            continue
        done = rebind_cli(*cmd.split()[1:], timeout=30)
        if "YOUR-SERVER" in cmd:
            assert done.returncode == 2 and "command not found: YOUR-SERVER" in done.stderr
            assert "Traceback" not in done.stderr
        else:
            assert done.returncode == 0, (cmd, done.stdout, done.stderr)


def test_readme_python_api_block_runs_verbatim(netns):
    code = fenced(README, "## Python API", "python")
    held = socket.create_server(("127.0.0.1", 5432))  # something for connect_diagnose to ask about
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # print(d.headline, d.verdict, d.bindable); print(picked.port); print(exc, exc.exit_code)
    assert len(lines) == 3, res.stdout
    assert re.match(r"^8080/tcp .* \S+ (True|False)$", lines[0]), lines[0]
    assert lines[1].isdigit()
    assert lines[2].endswith(" 2")


def test_json_md_ls_example_has_the_real_shape(netns, procs):
    """docs/json.md's `rebind ls 8080 --json` after http.server answered one request."""
    doc = json.loads(fenced(DOCS / "json.md", "## Example", "json"))
    p = procs.start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "8080"])
    deadline = time.monotonic() + 30
    while True:  # one request, read to EOF: the server closes first, its side is the TIME_WAIT
        try:
            with socket.create_connection(("127.0.0.1", 8080), timeout=5) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                while c.recv(65536):
                    pass
            break
        except OSError:
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.05)
    res = subprocess.run(
        [sys.executable, "-m", "rebind", "ls", "8080", "--json"], capture_output=True, text=True, timeout=60
    )
    real = json.loads(res.stdout)

    def keys(x: object) -> object:
        if isinstance(x, dict):
            return {k: keys(v) for k, v in x.items() if not (isinstance(v, list) and not v)}
        if isinstance(x, list):
            return keys(x[0]) if x else []
        return type(x).__name__ if x is not None else None

    assert real["schema"] == doc["schema"]
    assert [s["state"] for s in real["sockets"]] == [s["state"] for s in doc["sockets"]]
    assert set(real) == set(doc) and set(real["owner_scan"]) == set(doc["owner_scan"])
    for got, want in zip(real["sockets"], doc["sockets"], strict=True):
        assert set(got) == set(want)
        for o_got, o_want in zip(got["owners"], want["owners"], strict=True):
            assert set(o_got) == set(o_want)
    assert p.poll() is None


def test_actions_md_free_and_pick_blocks_run(netns, procs):
    """docs/actions.md's free block (with something to free) and pick block (its `server` is
    the reader's socket: given here) run as written."""
    free_block = fenced(DOCS / "actions.md", "res = rebind.free(8080", "python")
    pick_block = fenced(DOCS / "actions.md", "p = rebind.pick_port()", "python")
    holder = procs.python(
        "import socket, time\ns = socket.create_server(('0.0.0.0', 8080))\nprint('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    assert procs.wait_line(holder) == "ready"
    prelude = "import socket\nimport rebind\n"
    res = subprocess.run(
        [sys.executable, "-c", prelude + free_block], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    holder.wait(10)  # freed: the holder was signalled
    server = textwrap.dedent(
        """
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", prelude + server + pick_block], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("anchor", ["res = rebind.wait_bindable(8080"])
def test_actions_md_wait_block_runs(netns, anchor):
    """The wait block, top-level awaits included (run inside one coroutine), with a listener on
    8080 for wait_listening and nothing blocking the bind for wait_bindable... which needs 8080
    bindable: the listener is on 127.0.0.1 with SO_REUSEADDR and SO_REUSEPORT off, so the
    bindable check asks for 0.0.0.0 -- run in two steps to keep each call honest."""
    block = fenced(DOCS / "actions.md", anchor, "python")
    body = textwrap.indent(block.replace("import rebind\n", ""), "    ")
    code = f"import asyncio\nimport rebind\n\nasync def main():\n{body}\n\nasyncio.run(main())\n"
    bindable_part, _, listening_part = code.partition("    rebind.wait_listening(")
    listening_part = "    rebind.wait_listening(" + listening_part
    # 1) nothing on 8080: wait_bindable returns at once.
    first = bindable_part + "\n\nasyncio.run(main())\n"
    res = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # 2) a listener on 8080: wait_listening returns at once.
    srv = socket.create_server(("127.0.0.1", 8080))
    try:
        second = "import asyncio\nimport rebind\n\nasync def main():\n" + listening_part
        res = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    finally:
        srv.close()
