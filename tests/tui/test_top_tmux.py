"""`rebind top` in a real terminal: tmux runs it inside the test's network namespace, send-keys
types, capture-pane reads the screen. Every wait polls the screen with a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Procs

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.usefixtures("tmux_tool"),
]


@pytest.fixture
def tmux_tool() -> str:
    from tests.toolcheck import need_tool

    return need_tool("tmux")


DEADLINE = 20.0


class Term:
    """A private tmux server (its own socket) running one command in an 80x24 window."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.sock = f"rebind-top-test-{os.getpid()}-{time.monotonic_ns()}"
        cmd = " ".join(_quote(a) for a in ["env", *(f"{k}={v}" for k, v in env.items()), *argv])
        self.tmux("new-session", "-d", "-s", "t", "-x", "80", "-y", "24", cmd)
        self.tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        res = subprocess.run(
            ["tmux", "-L", self.sock, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=10
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, check: Callable[[str], object], what: str, deadline: float = DEADLINE) -> str:
        end = time.monotonic() + deadline
        text = ""
        while time.monotonic() < end:
            text = self.screen()
            if check(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"screen never showed {what} within {deadline}s; last screen:\n{text}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


@pytest.fixture
def term(netns: int) -> Iterator[Callable[..., Term]]:
    made: list[Term] = []

    def start(*args: str) -> Term:
        env = {"TERM": "xterm-256color", "NO_COLOR": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        if "REBIND_BPF_DIR" in os.environ:  # a test's private birth-certificate pins
            env["REBIND_BPF_DIR"] = os.environ["REBIND_BPF_DIR"]
        t = Term([sys.executable, "-m", "rebind", "top", *args], env)
        made.append(t)
        return t

    try:
        yield start
    finally:
        for t in made:
            t.close()


def _row(screen: str, needle: str) -> str:
    return next((line for line in screen.splitlines() if needle in line), "")


def _left(screen: str) -> int | None:
    import re

    m = re.search(r"TIME_WAIT\s+\S+\s+(\d+)s", _row(screen, "TIME_WAIT"))
    return int(m.group(1)) if m else None


TIME_WAIT = """
import socket
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
c = socket.create_connection(('127.0.0.1', {port}))
a, _ = s.accept()
a.close()
c.close()
s.close()
print('ready', flush=True)
"""

# A listener that never accepts; one more client connection per line read on stdin.
QUEUE = """
import socket, sys
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen({backlog})
held = []
print('ready', flush=True)
for line in sys.stdin:
    held.append(socket.create_connection(('127.0.0.1', {port})))
    print('connected', len(held), flush=True)
"""

LISTEN = """
import socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
time.sleep(600)
"""


def test_time_wait_counts_down(term: Callable[..., Term], procs: Procs) -> None:
    p = procs.python(TIME_WAIT.format(port=9000))
    assert procs.wait_line(p) == "ready"
    t = term("9000")
    first_screen = t.wait_for(lambda s: _left(s) is not None, "a TIME_WAIT row with time left")
    first = _left(first_screen)
    assert first is not None and 0 < first <= 60
    later = t.wait_for(lambda s: (_left(s) or 99) < first, "the countdown decreasing")
    assert "9000/tcp" in later


def test_accept_queue_bar_grows(term: Callable[..., Term], procs: Procs) -> None:
    p = procs.python(QUEUE.format(port=8080, backlog=8), stdin=subprocess.PIPE)
    assert procs.wait_line(p) == "ready"
    t = term("8080")
    empty = t.wait_for(lambda s: "0/8" in _row(s, "LISTEN"), "an empty queue (0/8)")
    cells_before = _row(empty, "LISTEN").count("█")
    assert p.stdin is not None
    for n in range(1, 5):
        p.stdin.write("x\n")
        p.stdin.flush()
        assert procs.wait_line(p) == f"connected {n}"
    full = t.wait_for(lambda s: "4/8" in _row(s, "LISTEN"), "a queue of 4 of 8")
    assert _row(full, "LISTEN").count("█") > cells_before


def test_why_screen(term: Callable[..., Term], procs: Procs) -> None:
    p = procs.python(LISTEN.format(port=8081))
    assert procs.wait_line(p) == "ready"
    t = term("8081")
    t.wait_for(lambda s: "LISTEN" in s and f"[{p.pid}]" in s, "the listener and its owner")
    t.keys("w")
    why = t.wait_for(lambda s: "8081/tcp is busy" in s, "the why verdict")
    assert "Blocking" in why
    t.keys("Escape")
    t.wait_for(lambda s: "LISTEN" in _row(s, "8081/tcp"), "the port table again")


def test_free_signals_only_after_confirmation(term: Callable[..., Term], procs: Procs) -> None:
    p = procs.python(LISTEN.format(port=8082))
    assert procs.wait_line(p) == "ready"
    t = term("8082")
    t.wait_for(lambda s: f"[{p.pid}]" in s, "the holder")
    t.keys("f")
    plan = t.wait_for(lambda s: "Proceed" in s, "the free plan and its question")
    assert "stop" in plan and str(p.pid) in plan
    time.sleep(0.3)  # nothing may happen while the question is open: give it a chance to go wrong
    assert p.poll() is None, "the holder was signalled before confirmation"
    t.keys("y")
    assert p.wait(timeout=DEADLINE) is not None
    t.wait_for(lambda s: "is bindable now" in s, "the verified result")


def test_filter_and_quit(term: Callable[..., Term], procs: Procs) -> None:
    a = procs.python(LISTEN.format(port=8083))
    b = procs.python(LISTEN.format(port=8084))
    assert procs.wait_line(a) == "ready" and procs.wait_line(b) == "ready"
    t = term("8083", "8084")
    t.wait_for(lambda s: "8083/tcp" in s and "8084/tcp" in s, "both ports")
    t.keys("/")
    # Keys sent before the filter input has focus go to the table (a loaded machine is slow to
    # mount it): type only once it is shown, and press Enter only once the text is in it.
    t.wait_for(lambda s: "Enter to apply" in s, "the filter input")

    def typed(s: str) -> bool:
        return any("8084" in ln and "/tcp" not in ln for ln in s.splitlines())

    for _ in range(3):  # the input may still be taking focus: type again if nothing arrived
        t.keys("8084")
        try:
            t.wait_for(typed, "8084 typed", deadline=5.0)
            break
        except AssertionError:
            t.keys("C-u")  # clear whatever part did arrive
    t.wait_for(typed, "8084 typed")
    t.keys("Enter")
    t.wait_for(lambda s: "8084/tcp" in s and "8083/tcp" not in s, "only the filtered port")
    t.keys("q")
    t.wait_for(lambda s: "Pane is dead" in s or "rebind top" not in s, "top exiting on q")


APP = """
import rebind
s = rebind.listen("127.0.0.1", {port})
rebind.notify_ready()
while True:
    c, _ = s.accept()
    c.close()
"""


def test_reload_a_port_served_by_rebind_run(
    term: Callable[..., Term], procs: Procs, tmp_path: object
) -> None:
    from pathlib import Path

    ctl = Path(str(tmp_path)) / "app.ctl"
    sup = procs.start(
        [
            sys.executable,
            "-m",
            "rebind",
            "run",
            "--listen",
            "127.0.0.1:8086",
            "--control",
            str(ctl),
            "--ready",
            "notify",
            "--grace",
            "1",
            "--",
            sys.executable,
            "-c",
            APP.format(port=8086),
        ],
        start_new_session=True,
    )
    t = term("8086")
    t.wait_for(lambda s: f"[{sup.pid}]" in s and ctl.exists(), "the supervisor holding the listener")
    t.keys("r")
    screen = t.wait_for(lambda s: "Start a new generation" in s, "the supervisor's status and the question")
    assert f"rebind run pid {sup.pid}" in screen and "status: ok: serving" in screen
    t.keys("y")
    t.wait_for(lambda s: "ok: generation 2" in s, "the reload outcome")
    assert sup.poll() is None


def test_reload_says_when_it_cannot_identify_a_supervisor(term: Callable[..., Term], procs: Procs) -> None:
    p = procs.python(LISTEN.format(port=8087))
    assert procs.wait_line(p) == "ready"
    t = term("8087")
    t.wait_for(lambda s: f"[{p.pid}]" in s, "the holder")
    t.keys("r")
    t.wait_for(lambda s: "cannot reload" in s and "not served by `rebind run`" in s, "the explanation")


# A listener shared by a parent and its forked child: two owners on one row.
SHARED_LISTENER = """
import os, socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
time.sleep(600)
"""


def test_owners_column_is_shortened_with_an_ellipsis_at_80_columns(
    term: Callable[..., Term], procs: Procs
) -> None:
    """interop 2026-12-05 §5: at 80x24 the owners column was cut by the screen's edge
    (`python3[9277] roo`), hiding the second owner without a sign. Now it is shortened to fit,
    ending in an ellipsis."""
    p = procs.python(SHARED_LISTENER.format(port=8088))
    child = int(procs.wait_line(p))
    procs.adopt(child)
    t = term("8088")
    screen = t.wait_for(lambda s: f"[{p.pid}]" in _row(s, "LISTEN"), "the listener's owners")
    row = _row(screen, "LISTEN")
    assert t.tmux("display-message", "-p", "-t", "t", "#{pane_width}").strip() == "80"
    assert "…" in row, row  # two owners with users do not fit in 80 columns
    assert row.rstrip().endswith("…") and len(row.rstrip()) <= 80, row
    first = min(p.pid, child)
    comm = Path(f"/proc/{first}/comm").read_text().strip()  # python or python3: how pytest was run
    assert f"{comm}[{first}]" in row, row  # the first owner is whole


def test_wait_screen_names_the_blocker_and_counts_down(term: Callable[..., Term], procs: Procs) -> None:
    """interop 2026-12-05 §5: `W` said "still busy: busy"; it says what blocks and when it frees."""
    p = procs.python(TIME_WAIT.format(port=9002))
    assert procs.wait_line(p) == "ready"
    t = term("9002")
    t.wait_for(lambda s: _left(s) is not None, "the TIME_WAIT row")
    t.keys("W")
    screen = t.wait_for(lambda s: "still busy:" in s, "the wait screen's status")
    line = _row(screen, "still busy:")
    assert "still busy: busy" not in line
    assert "9002/tcp is busy" in screen and "TIME_WAIT" in screen and "free in" in screen, screen
    t.keys("Escape")


def test_no_owners_names_the_binder_by_its_birth_certificate(
    term: Callable[..., Term], procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`top --no-owners` scans no process, yet a listener's row says who bound it (`rebind trace
    --install`, pinned in a private BPF filesystem here, removed at the end)."""
    import ctypes

    from rebind.kernel import birth

    fs = tmp_path / "bpffs"
    fs.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(fs).encode(), b"bpf", 0, b"mode=0700") != 0:
        pytest.skip(f"cannot mount a BPF filesystem: {os.strerror(ctypes.get_errno())}")
    pins = str(fs / "rebind")
    monkeypatch.setenv("REBIND_BPF_DIR", pins)
    try:
        birth.install(pins)
        p = procs.python("open('/proc/self/comm', 'w').write('srv')\n" + LISTEN.format(port=8097))
        assert procs.wait_line(p) == "ready"
        t = term("8097", "--no-owners")
        # 80 columns: the owners cell is cut after the pid's first digits
        t.wait_for(lambda s: f"bound by srv[{str(p.pid)[:3]}" in _row(s, "LISTEN"), "the certificate")
    finally:
        birth.uninstall(pins)
        libc.umount2(str(fs).encode(), 0)
