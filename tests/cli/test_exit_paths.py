"""Every way the real `rebind` binary can end is one line (or none) and a README exit code
(issue 8 items 6, 17, 18, 19): odd digits, closed or full stdout, a reader that leaves early,
^C while importing, non-finite durations, missing permissions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.helpers import LISTEN

REBIND = str(Path(sys.executable).with_name("rebind"))


def _env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    e.update(NO_COLOR="1", COLUMNS="200", **extra)
    return e


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([REBIND, *args], text=True, env=_env(), timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def _one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


SUPERSCRIPTS = [
    ["²"],
    ["why", "²"],
    ["ls", "1²"],
    ["ls", "²"],
    ["ls", "127.0.0.1:²"],
    ["pick", "--range", "²-³"],
    ["pick", "--range", "1-²"],
    ["wait", "٣"],  # Arabic-Indic three: int() would take it, a port number it is not
    ["80x"],
]
DURATIONS = [
    ["wait", "1", "--timeout", "inf"],
    ["wait", "1", "--timeout", "nan"],
    ["wait", "1", "--timeout", "1e300"],
    ["wait", "1", "--timeout", "-inf"],
    ["wait", "1", "--until-listening", "--timeout", "nan"],
    ["pick", "--hold", "inf"],
    ["pick", "--hold", "nan"],
    ["pick", "--lease", "inf"],
    ["pick", "--lease", "1e300"],
]


@pytest.mark.parametrize("args", SUPERSCRIPTS + DURATIONS, ids=" ".join)
def test_bad_numbers_are_one_line_and_exit_2(args):
    res = _run(args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert _one_clean_line(res.stderr).startswith("rebind: error:")


@pytest.fixture
def listener(netns, procs) -> int:  # type: ignore[no-untyped-def]
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18800))
    procs.wait_line(p)
    return 18800


def test_closed_stdout_is_not_a_traceback(listener):
    # `rebind ls >&-`: fd 1 closed. The note says the output went nowhere; the exit code stays.
    res = subprocess.run(
        ["sh", "-c", f'"$0" ls {listener} >&-', REBIND],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert res.returncode == 0
    assert "standard output is closed" in _one_clean_line(res.stderr)
    none = subprocess.run(
        ["sh", "-c", f'"$0" ls {listener} --json >&-; echo $? >&2', REBIND],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert none.stderr.splitlines()[-1] == "0" and "Traceback" not in none.stderr


def test_full_disk_is_one_line_and_exit_3(listener):
    with open("/dev/full", "w") as full:
        res = _run(["ls", str(listener)], stdout=full)
        assert res.returncode == 3
        assert _one_clean_line(res.stderr) == "rebind: error: cannot write output: No space left on device"
        js = _run(["ls", "1", "--json"], stdout=full)  # nothing matched, and the answer was lost
        assert js.returncode == 3 and "No space left" in _one_clean_line(js.stderr)


def _with_reader_gone(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader has already left: every write gets EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return _run(args, stdout=w)
    finally:
        os.close(w)


def test_a_reader_that_leaves_is_not_an_error(listener):
    for args, code in (
        (["ls", str(listener)], 0),
        (["ls", str(listener), "--json"], 0),
        (["ls", "1", "--json"], 1),  # the code the command would have had: nothing matched
        (["pick", "--lease", "0"], 0),
        (["wait", str(listener + 1), "--timeout", "0"], 0),
    ):
        res = _with_reader_gone(args)
        assert res.returncode == code, (args, res.stderr)
        assert res.stderr == "", (args, res.stderr)


MANY_UDP = """
import socket, time
socks = []
for port in range(30000, 32500):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('127.0.0.1', port))
    socks.append(s)
print('ready', flush=True)
time.sleep(600)
"""


def test_ls_into_head_exits_0_quietly(netns, procs):
    """`set -o pipefail; rebind ls | head -c 10`: a table bigger than the pipe buffer."""
    p = procs.python(MANY_UDP)
    procs.wait_line(p, timeout=60)
    for extra in ("", " --json"):
        res = subprocess.run(
            ["bash", "-c", f'set -o pipefail; "$0" ls{extra} | head -c 10 >/dev/null', REBIND],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""


_STARTUP_MARKERS = ("_opcode", "_datetime", "_uuid")  # extension modules click's import loads


def _interrupt_while_importing(args: list[str]) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [REBIND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and p.poll() is None:
        try:
            maps = Path(f"/proc/{p.pid}/maps").read_text()
        except OSError:
            break
        if any(m in maps for m in _STARTUP_MARKERS):
            break  # the CLI is importing click: mid start-up
    p.send_signal(signal.SIGINT)
    return p


@pytest.mark.parametrize("args", [["ls", "1", "--json"], ["ls"], ["pick"], ["wait", "1", "--timeout", "9"]])
def test_ctrl_c_during_start_up_exits_130_without_traceback(args):
    p = _interrupt_while_importing(args)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err
    if p.returncode in (0, 1):
        # On a loaded machine the command may finish before the signal arrives (with a warning
        # line on stderr, e.g. pick's port-risk note): nothing left to check.
        pytest.skip("the command finished before the signal arrived")
    assert p.returncode == 130, err
    assert len(err.splitlines()) <= 1, err


def test_ctrl_c_while_waiting_is_one_line(listener):
    p = subprocess.Popen(
        [REBIND, "wait", f"127.0.0.1:{listener}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    assert p.stderr is not None
    assert p.stderr.readline().startswith("waiting for")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == ""
    assert err == "rebind: interrupted\n"


def _without_cap_net_bind_service(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--bounding-set", "-net_bind_service", REBIND, *args],
        capture_output=True,
        text=True,
        env=_env(REBIND_PICK_LEASES=""),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_missing_permission_is_exit_3(netns):
    """README: 3 = missing permission. Privileged ports without CAP_NET_BIND_SERVICE."""
    pick = _without_cap_net_bind_service(["pick", "--range", "80-80"])
    assert pick.returncode == 3, pick.stderr
    assert "CAP_NET_BIND_SERVICE" in _one_clean_line(pick.stderr)
    wait = _without_cap_net_bind_service(["wait", "80", "--timeout", "5"])
    assert wait.returncode == 3, wait.stderr
    assert "Permission denied" in _one_clean_line(wait.stderr)


def test_bare_rebind_prints_the_help():
    """No arguments is no error: the help on stdout, exit 0 (it was the help as one mangled
    'error' line on stderr, exit 2)."""
    res = _run([])
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: rebind") and "Examples:" in res.stdout
