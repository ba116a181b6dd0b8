"""`rebind free` never signals the wrong process (issue 8), against real processes.

Each test runs in a throwaway network namespace; pid reuse is forced in a private pid namespace
(``unshare --pid`` + ns_last_pid); a hostile local user is played with ``setpriv`` to uid 65534.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rebind.actions.free import execute_plan, free, plan_free
from rebind.errors import UsageError
from rebind.kernel import owners, pidfd
from rebind.model.free_result import Fate
from rebind.model.records import Proto
from rebind.sockets import iter_records
from tests.kernel.helpers import LISTEN, OTHER_UID, TIME_WAIT

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (pid namespaces, setpriv)")

# Closes its listener when told to (on stdin), and keeps running.
CLOSES_ON_CUE = """
import socket, sys, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
sys.stdin.readline()
s.close()
print('closed', flush=True)
time.sleep(600)
"""

# Drains on SIGTERM: closes the listener and goes on running (finishing its work).
DRAINS_ON_TERM = """
import signal, socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
signal.signal(signal.SIGTERM, lambda *_: s.close())
print('ready', flush=True)
while True:
    time.sleep(600)
"""

# Runs as PID 1 of a fresh pid namespace: a holder on PORT; during free's owner scan, right
# after the holder's fds were read, the holder exits and `sleep` gets its pid (ns_last_pid).
PID_REUSE = r"""
import os, subprocess, sys
os.environ["REBIND_NO_BPF"] = "1"
from rebind.actions.free import execute_plan, plan_free
from rebind.kernel import owners

holder = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "ready"
state = {}

def reuse(pid):
    if pid != holder.pid or state:
        return
    holder.kill()
    holder.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    state["innocent"] = subprocess.Popen(["sleep", "30"])

owners._after_fd_scan = reuse
plan = plan_free(int(sys.argv[2]), grace=2)
innocent = state["innocent"]
print("reused", innocent.pid == holder.pid, flush=True)
print("targets", [(t.pid, t.name) for t in plan.targets], flush=True)
execute_plan(plan)
print("innocent", "alive" if innocent.poll() is None else f"died {innocent.returncode}", flush=True)
innocent.kill()
innocent.wait()
"""


def _cli(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Any:
    e = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    e.pop("FORCE_COLOR", None)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "rebind", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=e,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


def _in_new_pidns(*args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


@pytest.fixture
def unshare() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private pid namespace")
    yield


# --- item 2: identity is taken before the fds are read -----------------------------------------


def test_pid_reused_during_the_owner_scan_is_not_signalled(netns: int, unshare: None) -> None:
    holder = LISTEN.format(opts="", addr="127.0.0.1", port=18600)
    res = _in_new_pidns(sys.executable, "-c", PID_REUSE, holder, "18600")
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "reused True" in out, out  # the innocent process really got the holder's pid
    assert "targets []" in out, out
    assert "innocent alive" in out, out


# --- item 3: a stale plan does not kill ----------------------------------------------------------


def test_holder_that_closed_its_socket_after_planning_is_not_signalled(netns: int, procs: Any) -> None:
    p = procs.python(CLOSES_ON_CUE.format(port=18601), stdin=subprocess.PIPE)
    procs.wait_line(p)
    plan = plan_free(18601, grace=2)
    assert [t.pid for t in plan.targets] == [p.pid]
    assert p.stdin is not None
    p.stdin.write("close\n")
    p.stdin.flush()
    assert procs.wait_line(p) == "closed"  # ... while `Proceed?` waited
    events: list[str] = []
    res = execute_plan(plan, on_event=events.append)
    assert [(o.fate, o.signals) for o in res.processes] == [(Fate.RELEASED, ())]
    assert p.poll() is None
    assert res.ok and res.exit_code == 0
    assert any("no longer holds a socket that blocks the port; not sent SIGTERM" in e for e in events), events


def test_process_that_let_go_on_sigterm_is_not_killed(netns: int, procs: Any) -> None:
    p = procs.python(DRAINS_ON_TERM.format(port=18602))
    procs.wait_line(p)
    res = free(18602, grace=0.5)
    [outcome] = res.processes
    assert (outcome.fate, outcome.signals) == (Fate.RELEASED, ("SIGTERM",))
    assert p.poll() is None and res.ok


# --- item 6: --grace inf is a usage error, before anything is signalled ---------------------------


@pytest.mark.parametrize("grace", ["inf", "nan", "1e12", "-1", "²"])
def test_bad_grace_is_exit_2_and_nothing_is_signalled(netns: int, procs: Any, grace: str) -> None:
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18603))
    procs.wait_line(p)
    res = _cli("free", "18603", "--yes", "--grace", grace)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == "" and res.stderr.count("\n") == 1 and "grace" in res.stderr
    with pytest.raises(UsageError):
        free(18603, grace=float(grace) if grace != "²" else grace)  # type: ignore[arg-type]
    plan = plan_free(18603)
    with pytest.raises(UsageError):
        execute_plan(dataclasses.replace(plan, grace=float("inf")))
    assert p.poll() is None


# --- item 7: process-supplied text is shown, never obeyed ---------------------------------------

HOSTILE_NAME = """
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, {name!r}.encode(), 0, 0, 0)  # PR_SET_NAME: comm, 15 bytes max
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("name", ["\x1b[2J\x1b]0;PWN\x07", "[/x]\x1b[31m[b]"])
def test_hostile_process_names_are_escaped(netns: int, procs: Any, name: str) -> None:
    p = procs.start([sys.executable, "-c", HOSTILE_NAME.format(name=name, port=18604), "[/x]", "\x1b[2J"])
    procs.wait_line(p)
    dry = _cli("free", "18604", "--dry-run")
    done = _cli("free", "18604", "--yes", "--grace", "2")
    for res in (dry, done):
        text = res.stdout + res.stderr
        assert "\x1b" not in text and "\x07" not in text, text
        assert "\\x1b" in text, text
    assert dry.returncode == 0 and f"[{p.pid}]" in dry.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert p.wait(5) == -signal.SIGTERM


# --- item 12: permission denied is not "fd closed" --------------------------------------------

SCAN_WITHOUT_PTRACE = """
import json, os, sys
os.environ["REBIND_NO_BPF"] = "1"
from rebind.kernel import owners
from rebind.sockets import iter_records
recs = list(iter_records(ports=[int(sys.argv[1])])[0])
found, report = owners.find_owners(recs)
print(json.dumps({"owners": len(found), "inaccessible": report.inaccessible}))
"""


@needs_root
def test_unreadable_fds_are_counted_and_free_says_what_is_unknown(netns: int, procs: Any) -> None:
    p = procs.python(OTHER_UID.format(port=18605))
    procs.wait_line(p)
    # Root without CAP_SYS_PTRACE may list /proc/PID/fd of uid 65534 but not read its links.
    no_ptrace = ("setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace")
    scan = subprocess.run(
        [*no_ptrace, sys.executable, "-c", SCAN_WITHOUT_PTRACE, "18605"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert scan.returncode == 0, scan.stderr
    assert '"owners": 0' in scan.stdout and '"inaccessible": 0' not in scan.stdout, scan.stdout
    res = _cli("free", "18605", "--dry-run", "--force", prefix=no_ptrace, env={"REBIND_NO_BPF": "1"})
    assert res.returncode == 3, res.stdout + res.stderr
    assert "permission denied even as root" in res.stdout and "without root" not in res.stdout
    ls = _cli("ls", "18605", "--json", prefix=no_ptrace, env={"REBIND_NO_BPF": "1"})
    doc = json.loads(ls.stdout)
    assert any("permission denied even as root" in w for w in doc["warnings"]), doc["warnings"]
    assert p.poll() is None


# --- item 14: a blocker that is not a socket is never "destroyed" ---------------------------------


def test_non_local_address_is_not_a_socket_to_destroy(netns: int) -> None:
    res = _cli("free", "18606", "--addr", "10.9.9.9", "--yes")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "10.9.9.9 is not an address of this host" in res.stdout + res.stderr
    assert "destroy" not in res.stdout + res.stderr


# --- item 19: exit statuses -----------------------------------------------------------------------


@needs_root
def test_time_wait_without_cap_net_admin_is_exit_3(netns: int, procs: Any) -> None:
    t = procs.python(TIME_WAIT.format(port=18607, opts=""))
    procs.wait_line(t)
    res = _cli("free", "18607", "--yes", prefix=tuple(NOBODY))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "CAP_NET_ADMIN" in res.stdout


@needs_root
def test_nobody_cannot_touch_roots_process(netns: int, procs: Any) -> None:
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18608))
    procs.wait_line(p)
    res = _cli("free", "18608", "--yes", "--force", prefix=tuple(NOBODY))
    assert res.returncode == 3, res.stdout + res.stderr  # root's fds cannot even be read
    assert "run as root" in res.stdout and "nothing done" in res.stderr
    assert p.poll() is None


@needs_root
def test_nobodys_process_is_signalled_only_as_root_with_force(netns: int, procs: Any) -> None:
    p = procs.python(OTHER_UID.format(port=18609))
    procs.wait_line(p)
    res = _cli("free", "18609", "--yes")
    assert res.returncode == 5, res.stdout + res.stderr
    assert "only root with --force" in res.stdout and p.poll() is None
    res = _cli("free", "18609", "--yes", "--force", "--grace", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert p.wait(5) == -signal.SIGTERM


# --- item 23: rebind's own pidfd_getfd duplicates are not owners ----------------------------------


@pytest.mark.parametrize("bpf", ["", "1"], ids=["default", "proc-scan"])
def test_own_transient_duplicate_is_not_an_owner(
    netns: int, procs: Any, monkeypatch: pytest.MonkeyPatch, bpf: str
) -> None:
    monkeypatch.setenv("REBIND_NO_BPF", bpf)
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18610))
    procs.wait_line(p)
    [rec] = [r for r in iter_records(ports=[18610], protos=[Proto.TCP])[0] if r.inode]
    found, _ = owners.find_owners([rec])
    [o] = found[rec.inode]
    dup_open, scanned = threading.Event(), threading.Event()
    real = pidfd._read_flags

    def paused(s: Any) -> tuple[bool, bool, bool | None]:
        dup_open.set()  # our duplicate of the holder's socket is in our fd table now
        scanned.wait(10)
        return real(s)

    monkeypatch.setattr(pidfd, "_read_flags", paused)
    flags: list[object] = []
    reader = threading.Thread(target=lambda: flags.append(pidfd.socket_flags(o.pid, o.fd, o.start_ticks)))
    reader.start()
    try:
        assert dup_open.wait(10)
        during, _ = owners.find_owners([rec])
    finally:
        scanned.set()
        reader.join(10)
    assert {x.pid for x in during[rec.inode]} == {p.pid}, during
    assert flags == [(False, False, None)]


# --- item 26: an owner outside this pid namespace ---------------------------------------------------


def test_owner_outside_the_pid_namespace_cannot_be_freed(netns: int, unshare: None) -> None:
    import socket

    srv = socket.create_server(("127.0.0.1", 18611))  # held by pytest, invisible in the new pidns
    try:
        for args in (("--dry-run",), ("--yes",)):
            res = _in_new_pidns(sys.executable, "-m", "rebind", "free", "18611", *args, env={"NO_COLOR": "1"})
            assert res.returncode == 1, res.stdout + res.stderr
            assert "outside this PID namespace" in res.stdout, res.stdout
            assert "cannot make 0.0.0.0:18611/tcp bindable" in res.stdout
    finally:
        srv.close()


# A thread that unshared its fd table (CLONE_FILES) keeps the listener the main table closed.
THREAD_TABLE = """
import ctypes, os, socket, threading, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
ready = threading.Event()
def keep():
    assert ctypes.CDLL(None, use_errno=True).unshare(0x400) == 0  # CLONE_FILES
    ready.set()
    time.sleep(600)
threading.Thread(target=keep, daemon=True).start()
ready.wait()
os.close(s.detach())
print('ready', flush=True)
time.sleep(600)
"""


def test_holding_is_checked_in_threads_with_their_own_fd_table(netns: int, procs: Any) -> None:
    p = procs.python(THREAD_TABLE.format(port=18612))
    procs.wait_line(p)
    [rec] = [r for r in iter_records(ports=[18612], protos=[Proto.TCP])[0] if r.inode]
    pfd = pidfd.pin(p.pid)
    assert pfd is not None
    try:
        assert pidfd.holds_socket(pfd, p.pid, {rec.inode}) is pidfd.Holding.YES
        assert pidfd.holds_socket(pfd, p.pid, {rec.inode + 1}) is pidfd.Holding.NO
    finally:
        os.close(pfd)
