"""Shared fixtures. Kernel tests run in throwaway network namespaces with real processes.

``--require-kernel`` (used by `make test` and CI) turns "cannot create a namespace" from a skip
into an error, and fails the run if no kernel test actually ran.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rebind.kernel import netns as _netns

# rebind's pytest plugin (the free_port fixture) is opt-in, as it is for users of the package.
pytest_plugins = ["rebind.pytest_plugin"]
# tests.toolcheck: need_tool(), the one way tests find tmux, promtool, dockerd, nginx, cc, ...
pytest_plugins += ["tests.toolcheck"]

ROOT = Path(__file__).resolve().parent.parent
_kernel_ran = 0
_permitted: bool | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-kernel",
        action="store_true",
        help="fail (not skip) when network namespaces are unavailable or no kernel test ran",
    )


def _ns_permitted() -> bool:
    global _permitted
    if _permitted is None:
        _permitted = _netns.namespaces_permitted()
    return _permitted


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[int]:
    """Step this test's thread into a fresh network namespace with lo up; yields its inode."""
    global _kernel_ran
    if not _ns_permitted():
        if request.config.getoption("--require-kernel"):
            pytest.fail("network namespaces are not permitted here (need root / CAP_SYS_ADMIN)")
        pytest.skip("network namespaces are not permitted here (need root / CAP_SYS_ADMIN)")
    with _netns.private_netns() as ino:
        _kernel_ran += 1
        yield ino


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    cfg = session.config
    if not cfg.getoption("--require-kernel"):
        return
    selected_kernel = any(item.get_closest_marker("kernel") for item in session.items)
    if selected_kernel and _kernel_ran == 0:
        print("\nERROR: --require-kernel: no kernel (network namespace) test ran", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "netns" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernel)


class Procs:
    """Processes a test started; all ended by pid at teardown (never by name)."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[str]] = []
        self.extra_pids: list[int] = []
        self._buffers: dict[tuple[int, str], bytes] = {}  # read ahead by wait_line, per (pid, stream)

    def start(self, args: list[str], **kw: object) -> subprocess.Popen[str]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p: subprocess.Popen[str] = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
        self.popens.append(p)
        return p

    def python(self, code: str, **kw: object) -> subprocess.Popen[str]:
        """Run a Python snippet; by convention it prints 'ready' (and maybe pids) when set up."""
        return self.start([sys.executable, "-u", "-c", code], **kw)

    def wait_line(self, p: subprocess.Popen[Any], timeout: float = 10.0, *, stream: str = "stdout") -> str:
        """The next line the process prints on ``stream`` (a readiness handshake), stripped.

        The pipe is read with os.read into a buffer kept per process and stream, never through
        the Popen's buffered file: a child printing two lines in one write gives both, one per
        call (select() does not see a line already pulled into a file's buffer, and readline()
        after select() blocks on half a line past the timeout). Do not mix with ``p.stdout``
        reads: what this read ahead is in the buffer, see :meth:`rest`.
        """
        f = p.stdout if stream == "stdout" else p.stderr
        assert f is not None, f"pid {p.pid}: std{stream[3:]} is not a pipe"
        key = (p.pid, stream)
        buf = self._buffers.get(key, b"")
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([f.fileno()], [], [], left)[0]:
                    raise TimeoutError(f"no line on {stream} of pid {p.pid} within {timeout}s: {p.args!r}")
                chunk = os.read(f.fileno(), 1 << 16)
                if not chunk:
                    err = "" if stream == "stderr" else self.rest(p, "stderr")
                    raise RuntimeError(f"pid {p.pid} exited before it was ready: {err}")
                buf += chunk
        finally:
            self._buffers[key] = buf
        line, _, self._buffers[key] = buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def rest(self, p: subprocess.Popen[Any], stream: str = "stdout", timeout: float = 60) -> str:
        """Everything left on ``stream`` once the process has exited: what :meth:`wait_line`
        read ahead, then the rest of the pipe."""
        f = p.stdout if stream == "stdout" else p.stderr
        if f is None:
            return ""
        p.wait(timeout)
        chunks = [self._buffers.pop((p.pid, stream), b"")]
        while chunk := os.read(f.fileno(), 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def adopt(self, pid: int) -> None:
        """Track a pid the test did not start directly (e.g. a forked grandchild)."""
        self.extra_pids.append(pid)

    def stop_all(self) -> None:
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdout, p.stderr, p.stdin):
                if stream:
                    stream.close()
        # Reap adopted pids that are our children; others are reaped by init.
        deadline = time.monotonic() + 2
        for pid in self.extra_pids:
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                time.sleep(0.01)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def rebind_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real `rebind` CLI (python -m rebind) in the current namespace."""

    def run(
        *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        e = dict(os.environ)
        e.pop("FORCE_COLOR", None)
        e["NO_COLOR"] = "1"
        e["COLUMNS"] = "200"
        if env:
            e.update(env)
        return subprocess.run(
            [sys.executable, "-m", "rebind", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=e,
            stdin=subprocess.DEVNULL,
        )

    return run
