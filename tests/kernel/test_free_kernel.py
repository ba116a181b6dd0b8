"""`rebind free` / rebind.free against real processes in a throwaway network namespace."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
from ipaddress import IPv4Address

import pytest

from rebind.actions.free import execute_plan, free, plan_free
from rebind.actions.wait import accepts
from rebind.kernel.diag import iter_sockets
from rebind.kernel.owners import read_start_ticks
from rebind.kernel.trial import trial_bind
from rebind.model.free import Refusal
from rebind.model.free_result import Fate, SocketFate
from rebind.model.records import Proto, State
from rebind.model.request import BindRequest
from tests.kernel.helpers import LISTEN, OTHER_UID, SHARED, TIME_WAIT

IGNORES_TERM = """
import signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
time.sleep(600)
"""

# A listener that forks one child holding the listener when told to (after the plan was made).
FORK_ON_CUE = """
import os, socket, sys, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
time.sleep(600)
"""

CLIENT = """
import socket, time
c = socket.create_connection(('127.0.0.1', {port}))
print('ready', flush=True)
time.sleep(600)
"""

# Accepts one connection and keeps it open.
ACCEPTING = """
import socket, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
print('ready', flush=True)
conn, _ = s.accept()
print('accepted', flush=True)
time.sleep(600)
"""

SLEEPER = """
import time
print('ready', flush=True)
time.sleep(600)
"""


def _alive(p) -> bool:  # type: ignore[no-untyped-def]
    return p.poll() is None


def _bindable(port: int) -> bool:
    return trial_bind(BindRequest.create(port)).ok


def test_free_listener_that_ignores_sigterm_escalates(netns, procs):
    p = procs.python(IGNORES_TERM.format(port=18200))
    procs.wait_line(p)
    res = free(18200, grace=0.3)
    [outcome] = res.processes
    assert outcome.target.pid == p.pid
    assert outcome.fate is Fate.KILLED and outcome.signals == ("SIGTERM", "SIGKILL")
    assert res.ok and res.after.trial.ok and _bindable(18200)
    assert p.wait(5) == -signal.SIGKILL


def test_free_shared_listener_stops_parent_and_forked_children(netns, procs):
    p = procs.python(SHARED.format(port=18201))
    kids = {int(x) for x in procs.wait_line(p).split()}
    for k in kids:
        procs.adopt(k)
    plan = plan_free(18201, grace=2)
    assert {t.pid for t in plan.targets} == kids | {p.pid}
    res = execute_plan(plan)
    assert {o.target.pid for o in res.processes} == kids | {p.pid}
    assert all(o.fate is Fate.EXITED for o in res.processes)
    assert res.ok and _bindable(18201)


def test_free_leaves_a_client_connected_to_the_port_alone(netns, procs):
    srv = procs.python(ACCEPTING.format(port=18202))
    procs.wait_line(srv)
    cli = procs.python(CLIENT.format(port=18202))
    procs.wait_line(cli)
    assert procs.wait_line(srv) == "accepted"
    plan = plan_free(18202)
    assert {t.pid for t in plan.targets} == {srv.pid}
    assert cli.pid not in {r.pid for r in plan.refused}
    res = execute_plan(plan)
    # The server's accepted connection turns into an orphan (FIN_WAIT2: the client never
    # closes) that still holds 127.0.0.1:18202; free destroys it, the client stays up.
    assert res.ok and _bindable(18202)
    assert _alive(cli)
    assert any(s.fate is SocketFate.DESTROYED for s in res.sockets)
    assert cli.pid not in {o.target.pid for o in res.processes}


def test_free_destroys_time_wait(netns, procs):
    p = procs.python(TIME_WAIT.format(port=18203, opts=""))
    procs.wait_line(p)
    plan = plan_free(18203)
    assert not plan.bindable and not plan.targets
    assert [r.state for r in plan.destroy] == [State.TIME_WAIT]
    res = execute_plan(plan)
    assert [s.fate for s in res.sockets] == [SocketFate.DESTROYED]
    assert res.ok and _bindable(18203)
    assert not [r for r in iter_sockets(ports=[18203]) if r.state is State.TIME_WAIT]


def test_exited_pid_is_not_signalled(netns, procs):
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18204))
    procs.wait_line(p)
    plan = plan_free(18204)
    assert [t.pid for t in plan.targets] == [p.pid]
    p.kill()
    p.wait(5)
    res = execute_plan(plan)
    assert [o.fate for o in res.processes] == [Fate.GONE]
    assert res.ok


def test_reused_pid_is_not_signalled(netns, procs):
    """The planned process exits and its pid now names another process: hands off."""
    a = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18205))
    procs.wait_line(a)
    plan = plan_free(18205)
    [target] = plan.targets
    a.kill()
    a.wait(5)
    b = procs.python(SLEEPER)
    procs.wait_line(b)
    assert read_start_ticks(b.pid) != target.start_ticks
    # Pid reuse cannot be forced on a shared machine; the plan is rewritten as if b had
    # been given a's pid number, keeping a's identity (start time) as captured at plan time.
    reused = dataclasses.replace(plan, targets=(dataclasses.replace(target, pid=b.pid),))
    res = execute_plan(reused)
    assert [o.fate for o in res.processes] == [Fate.REUSED]
    assert _alive(b)


def test_fork_after_plan_is_reported_as_still_holding(netns, procs):
    p = procs.python(FORK_ON_CUE.format(port=18206), stdin=subprocess.PIPE)
    procs.wait_line(p)
    plan = plan_free(18206, grace=2)
    assert [t.pid for t in plan.targets] == [p.pid]
    assert p.stdin is not None
    p.stdin.write("fork\n")
    p.stdin.flush()
    child = int(procs.wait_line(p))
    procs.adopt(child)
    res = execute_plan(plan)
    assert [o.fate for o in res.processes] == [Fate.EXITED]
    assert not res.ok
    assert any(f"[{child}]" in line and "not in the plan" in line for line in res.remaining), res.remaining


def test_rebind_itself_is_refused(netns, procs):
    srv = socket.create_server(("127.0.0.1", 18207))
    try:
        plan = plan_free(18207)
        assert not plan.targets
        assert [(r.pid, r.reason) for r in plan.refused] == [(os.getpid(), Refusal.SELF)]
        res = execute_plan(plan)
        assert not res.ok and res.processes == ()
        assert any("rebind itself" in line for line in res.remaining)
    finally:
        srv.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_other_users_process_needs_force(netns, procs):
    p = procs.python(OTHER_UID.format(port=18208))
    procs.wait_line(p)
    plan = plan_free(18208)
    assert [(r.pid, r.reason) for r in plan.refused] == [(p.pid, Refusal.OTHER_USER)]
    assert not plan.has_actions
    res = free(18208, force=True, grace=2)
    assert [o.target.pid for o in res.processes] == [p.pid] and res.ok


def test_free_udp_socket(netns, procs):
    code = (
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('127.0.0.1', 18209))\nprint('ready', flush=True)\ntime.sleep(600)\n"
    )
    p = procs.python(code)
    procs.wait_line(p)
    assert free(18209, proto="tcp").processes == ()  # TCP is a separate table: nothing blocks it
    res = free(18209, proto="udp", grace=2)
    assert [o.target.pid for o in res.processes] == [p.pid] and res.ok


def test_a_bind_request_is_what_the_keywords_build(netns, procs):
    """plan_free / free / wait_bindable take the request `rebind why` builds; the documented
    port + keyword form is the same request (issue 21: requests all the way through)."""
    from rebind.actions.wait import wait_bindable
    from rebind.diagnosis import default_request

    code = (
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('127.0.0.1', 18212))\nprint('ready', flush=True)\ntime.sleep(600)\n"
    )
    p = procs.python(code)
    procs.wait_line(p)
    req = default_request(18212, proto="udp", addr="127.0.0.1")
    by_request, by_keywords = (
        plan_free(req, grace=2),
        plan_free(18212, proto="udp", addr="127.0.0.1", grace=2),
    )
    assert by_request.request == by_keywords.request == req
    assert [t.pid for t in by_request.targets] == [t.pid for t in by_keywords.targets] == [p.pid]
    assert not wait_bindable(req, timeout=0).ok
    res = free(req, grace=2)
    assert [o.target.pid for o in res.processes] == [p.pid] and res.ok
    assert wait_bindable(req, timeout=0).ok


def test_nothing_to_do_when_bindable(netns, procs):
    res = free(18210)
    assert res.ok and res.processes == () and res.sockets == () and not res.plan.has_actions
    assert not accepts(IPv4Address("127.0.0.1"), 18210)


def test_outgoing_connection_using_the_port_needs_outgoing(netns, procs):
    _ = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18211))
    procs.wait_line(_)
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("18212 18213\n")  # per-netns: the client's ephemeral port will be 18212 or 18213
    c = procs.python(CLIENT.format(port=18211))
    procs.wait_line(c)
    [port] = [r.port for r in iter_sockets(ports=[18212, 18213]) if r.state is State.ESTABLISHED]
    plan = plan_free(port)
    assert not plan.targets and [(r.pid, r.reason) for r in plan.refused] == [(c.pid, Refusal.OUTGOING)]
    res = free(port, outgoing=True, grace=2)
    assert [o.target.pid for o in res.processes] == [c.pid] and res.ok


# Serves 8080 (with connections), 5353/udp and holds 9001 bound: freeing 9001 kills all of it.
SERVES_THREE = """
import socket, time
web = socket.socket(); web.bind(('127.0.0.1', 8080)); web.listen()
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); dns.bind(('127.0.0.1', 5353))
idle = socket.socket(); idle.bind(('127.0.0.1', 9001))
clients = [socket.create_connection(('127.0.0.1', 8080)) for _ in range(2)]
conns = [web.accept()[0] for _ in range(2)]
print('ready', flush=True)
time.sleep(600)
"""


def test_free_plan_names_the_other_ports_the_signal_takes_down(netns, procs, rebind_cli):
    """issue 18 item 12 (interop D5): the plan for 9001 said only "stop python3[N]: tcp
    BOUND_INACTIVE 127.0.0.1:9001" while `y` also took down 8080 and 5353/udp."""
    p = procs.python(SERVES_THREE)
    assert procs.wait_line(p) == "ready"
    plan = plan_free(9001)
    (t,) = plan.targets
    assert t.pid == p.pid
    # model == kernel: every other inet socket of the process, read back from the kernel.
    mine = {
        r.inode: r for r in iter_sockets(protos=(Proto.TCP, Proto.UDP), states=frozenset(State)) if r.inode
    }
    fds = {
        int(os.readlink(f"/proc/{p.pid}/fd/{n}")[8:-1])
        for n in os.listdir(f"/proc/{p.pid}/fd")
        if os.readlink(f"/proc/{p.pid}/fd/{n}").startswith("socket:[")
    }
    expected = sum(1 for ino in fds if ino in mine and mine[ino].local.port != 9001)
    assert sum(o.count for o in t.also_holds) == expected == 1 + 1 + 2 + 2
    assert (
        "5353/udp" in plan.collateral_summary()
        and "8080/tcp (LISTEN, 2 connections)" in plan.collateral_summary()
    )

    res = rebind_cli("free", "9001", "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "tcp LISTEN 127.0.0.1:8080" in out and "udp UNCONN 127.0.0.1:5353" in out
    assert "also takes down 5353/udp, 8080/tcp (LISTEN, 2 connections), 2 outgoing connections" in out
    assert _alive(p)  # a dry run signals nothing

    res = rebind_cli("free", "9001", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    import json

    doc = json.loads(res.stdout)
    assert doc["schema"] == "rebind.free.plan/1"
    ports = {(o["proto"], o["port"]) for o in doc["stop"][0]["also_holds"] if o["port"] is not None}
    assert {("tcp", 8080), ("udp", 5353)} <= ports
    assert "--dry-run" in rebind_cli("free", "9001", "--json").stderr


# A prefork server: parent and child share the listener on 8080 and the bound 9001; each then
# accepts a connection of its own and says so.
PREFORK = """
import os, socket, sys, time
web = socket.socket(); web.bind(('127.0.0.1', 8080)); web.listen()
idle = socket.socket(); idle.bind(('127.0.0.1', 9001))
clients = [socket.create_connection(('127.0.0.1', 8080)) for _ in range(2)]
pid = os.fork()
conn = web.accept()[0]
os.write(1, f'{os.getpid()} accepted\\n'.encode())  # one write: two writers share the pipe
time.sleep(600)
"""


def test_collateral_counts_each_socket_once_over_forked_workers(netns, procs):
    p = procs.python(PREFORK)
    first = procs.wait_line(p)
    second = procs.wait_line(p)  # often in the same read as the first: wait_line keeps it
    pids = {int(first.split()[0]), int(second.split()[0])}
    for pid in pids - {p.pid}:
        procs.adopt(pid)
    plan = plan_free(9001)
    assert {t.pid for t in plan.targets} == pids | {p.pid}
    # one accepted connection per worker: 2 in all, not 1 (alike entries of two workers) nor 4
    assert plan.collateral_summary().startswith("8080/tcp (LISTEN, 2 connections)"), plan.collateral_summary()
