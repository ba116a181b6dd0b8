"""`rebind why` on real scenarios; the model must agree with the kernel's trial bind."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from tests.kernel.helpers import BOUND_ONLY, LISTEN, ORPHAN_CHILD, OTHER_UID, TIME_WAIT

REUSE = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"


#: The fallback paths (flags read by pidfd, inferred from trials) as on a host without BPF.
NO_BPF = {"REBIND_NO_BPF": "1"}


def why(rebind_cli: Any, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    res = rebind_cli("why", *args, "--json", env=env)
    assert res.returncode in (0, 1), res.stderr
    doc = json.loads(res.stdout)
    assert doc["disagreement"] is None, doc["disagreement"]
    return res.returncode, doc


def test_free_port(netns, rebind_cli):
    code, doc = why(rebind_cli, "18100")
    assert code == 0 and doc["bindable"] and doc["blockers"] == [] and "free" in doc["verdict"]


@pytest.mark.parametrize(("env", "source"), [(None, "kernel"), (NO_BPF, "unknown")])
def test_origin_story_time_wait_without_reuseaddr(netns, procs, rebind_cli, env, source):
    """With the BPF socket iterator the TIME_WAIT's own tw_reuse and the port's bucket are read
    (provenance kernel): the model is exact. Without it no trial runs in the occupied bucket
    (issue 17: it could change a later bind), so the flag stays unknown and says so."""
    p = procs.python(TIME_WAIT.format(port=18101, opts=""))
    procs.wait_line(p)
    code, doc = why(rebind_cli, "18101", env=env)
    assert code == 1
    assert "TIME_WAIT" in doc["verdict"] and "free in" in doc["verdict"] and "busy" in doc["verdict"]
    [b] = doc["blockers"]
    assert b["kind"] == "time-wait" and b["flags_source"] == source
    assert 0 < doc["frees_in_ms"] <= 60_000
    code, doc = _why_raw(rebind_cli, "18101", "--reuseaddr", env=env)
    _agrees(code, doc)
    if env is None:
        assert b["reuseaddr"] is False and "without SO_REUSEADDR" in doc["verdict"]
        # The post's fix does not help: the old socket lacked the flag.
        assert code == 1 and doc["blockers"][0]["rule"] == "reuseaddr-missing-old"
        assert doc["trial"] is None  # the model is exact: nothing is bound to ask
    else:
        assert b["reuseaddr"] is None and any("no trial bind" in n for n in doc["notes"])
        # With SO_REUSEADDR it depends on the TIME_WAIT's flag: said so, never "free".
        assert code == 1 and doc["status"] == "uncertain" and "SO_REUSEADDR" in doc["verdict"]
    # ...but another loopback address works: a TIME_WAIT holds only its own address.
    assert any(a["works"] and a["addr"] == "127.0.0.2" for a in doc["attempts"])
    assert any(f["command"] == "rebind wait 18101" for f in doc["fixes"])
    for addr, ok in (("127.0.0.2", True), ("127.0.0.1", False)):  # the kernel agrees
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, 18101))
            assert ok
        except OSError:
            assert not ok
        finally:
            s.close()


@pytest.mark.parametrize("env", [None, NO_BPF])
def test_time_wait_with_reuseaddr_lets_reuseaddr_restart(netns, procs, rebind_cli, env):
    p = procs.python(TIME_WAIT.format(port=18102, opts=REUSE))
    procs.wait_line(p)
    code, doc = _why_raw(rebind_cli, "18102", "--reuseaddr", env=env)
    _agrees(code, doc)
    if env is None:
        assert code == 0 and doc["bindable"] and doc["disagreement"] is None
    else:
        assert code == 1 and doc["status"] == "uncertain"  # unread TIME_WAIT flags, no trial
    code, doc = why(rebind_cli, "18102", env=env)
    assert code == 1 and doc["status"] == "busy"
    assert doc["blockers"][0]["reuseaddr"] is (True if env is None else None)


def test_live_listener_named_with_owner(netns, procs, rebind_cli):
    p = procs.python(LISTEN.format(opts=REUSE, addr="0.0.0.0", port=18103))
    procs.wait_line(p)
    code, doc = why(rebind_cli, "18103", "--reuseaddr", env=NO_BPF)
    assert code == 1 and "live listener" in doc["verdict"] and str(p.pid) in doc["verdict"]
    [b] = doc["blockers"]
    assert b["rule"] == "listener-never-yields" and b["flags_source"] == "read" and b["reuseaddr"] is True
    code, doc = why(rebind_cli, "18103", "--reuseaddr")  # getsockopt is the kernel's own sk_reuse:
    [b] = doc["blockers"]  # the iterator walks only the listening hash, for the bind bucket
    assert b["rule"] == "listener-never-yields" and b["flags_source"] == "read" and b["reuseaddr"] is True
    assert [o["pid"] for o in b["socket"]["owners"]] == [p.pid]


def test_bound_inactive_holder(netns, procs, rebind_cli):
    p = procs.python(BOUND_ONLY.format(port=18104))
    procs.wait_line(p)
    code, doc = why(rebind_cli, "18104")
    assert code == 1 and doc["blockers"][0]["kind"] == "bound-inactive"
    assert "bound but not listening" in doc["verdict"]
    # Both have SO_REUSEADDR and the holder is not listening: bind and listen both work.
    code, doc = why(rebind_cli, "18104", "--reuseaddr")
    assert code == 0


def test_inherited_listener_after_parent_exit(netns, procs, rebind_cli):
    p = procs.python(ORPHAN_CHILD.format(port=18105), start_new_session=True)
    child = int(procs.wait_line(p))
    procs.adopt(child)
    p.wait(5)
    code, doc = why(rebind_cli, "18105")
    assert code == 1 and doc["blockers"][0]["kind"] == "inherited-listener"
    assert "inherited" in doc["verdict"]
    assert any("close-on-exec" in f["title"] for f in doc["fixes"])


def test_dual_stack_listener_blocks_ipv4(netns, rebind_cli):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 18106))
    s.listen()
    code, doc = why(rebind_cli, "18106", "--addr", "127.0.0.1")
    assert code == 1 and doc["blockers"][0]["socket"]["v6only"] is False
    s.close()
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::", 18106))
    v6.listen()
    code, _ = why(rebind_cli, "18106", "--addr", "0.0.0.0")
    assert code == 0
    v6.close()


def test_other_users_reuseport_group(netns, procs, rebind_cli):
    code = OTHER_UID.replace("s.bind", "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\ns.bind")
    p = procs.python(code.format(port=18107))
    procs.wait_line(p)
    code_, doc = why(rebind_cli, "18107", "--reuseport")
    assert code_ == 1 and doc["blockers"][0]["rule"] == "reuseport-other-uid"


def test_outgoing_connection_using_the_port(netns, rebind_cli):
    srv = socket.create_server(("127.0.0.1", 18108))
    cli = socket.socket()
    cli.bind(("127.0.0.1", 40123))  # stands in for an ephemeral port inside ip_local_port_range
    cli.connect(("127.0.0.1", 18108))
    acc, _ = srv.accept()
    code, doc = why(rebind_cli, "40123")
    assert code == 1 and doc["blockers"][0]["kind"] == "outgoing"
    assert any("ip_local_reserved_ports" in (f["command"] or "") for f in doc["fixes"])
    for s in (acc, cli, srv):
        s.close()


def test_address_not_on_host(netns, rebind_cli):
    # 192.0.2.0/24 is TEST-NET-1: never configured here; bind() is refused, nothing is sent.
    code, doc = why(rebind_cli, "192.0.2.1:18109")
    assert code == 1 and doc["trial"]["error"] == "EADDRNOTAVAIL" and doc["outcome"]["errno"] == 99


def test_udp_rules(netns, rebind_cli):
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    a.bind(("0.0.0.0", 18110))
    assert why(rebind_cli, "18110", "--udp")[0] == 1
    assert why(rebind_cli, "18110", "--udp", "--reuseaddr")[0] == 0
    assert why(rebind_cli, "18110")[0] == 0  # TCP and UDP never conflict
    a.close()


def test_text_output_and_shorthand(netns, procs, rebind_cli):
    p = procs.python(TIME_WAIT.format(port=18111, opts=""))
    procs.wait_line(p)
    res = rebind_cli("18111")
    assert res.returncode == 1
    first = res.stdout.splitlines()[0]
    assert first.startswith("18111/tcp is busy: TIME_WAIT left by a server")
    assert "Fixes" in res.stdout and "SO_REUSEADDR" in res.stdout and "\x1b[" not in res.stdout


def test_privileged_port_without_capability(netns, rebind_cli):
    # Drop CAP_NET_BIND_SERVICE from the bounding set: port 80 is then refused with EACCES.
    import os
    import shutil
    import subprocess
    import sys

    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is needed"
    env = dict(os.environ, NO_COLOR="1")
    res = subprocess.run(
        [
            setpriv,
            "--bounding-set",
            "-net_bind_service",
            sys.executable,
            "-m",
            "rebind",
            "why",
            "80",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["trial"]["error"] == "EACCES" and doc["outcome"]["errno"] == 13
    assert doc["disagreement"] is None
    assert "CAP_NET_BIND_SERVICE" in doc["blockers"][0]["reason"]


CONTAINER_PROXY = """
import ctypes, socket, time
ctypes.CDLL(None).prctl(15, b"docker-proxy", 0, 0, 0)  # PR_SET_NAME: what `comm` shows
s = socket.create_server(("127.0.0.1", {port}))
print("ready", flush=True)
time.sleep(600)
"""


def test_container_proxy_is_named(netns, procs, rebind_cli):
    p = procs.python(CONTAINER_PROXY.format(port=18112))
    procs.wait_line(p)
    code, doc = why(rebind_cli, "18112")
    assert code == 1 and doc["blockers"][0]["kind"] == "container-proxy"
    assert "container" in doc["verdict"]
    assert any("docker ps" in (f["command"] or "") for f in doc["fixes"])


def _set_fin_timeout(seconds: int) -> None:
    with open("/proc/sys/net/ipv4/tcp_fin_timeout", "w") as f:  # per-netns sysctl
        f.write(f"{seconds}\n")


@pytest.mark.parametrize("env", [None, NO_BPF])
def test_orphan_fin_wait2_leftover_with_and_without_reuseaddr(netns, rebind_cli, env):
    """With the iterator the orphan's own flag is read and the answer exact; without it no trial
    runs in the occupied bucket (issue 17), so a SO_REUSEADDR restart is "uncertain"."""
    _set_fin_timeout(30)
    for port, opts, expect_flag in ((18113, "", False), (18114, REUSE, True)):
        port += 2000 if env else 0
        srv = socket.socket()
        if opts:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        cli = socket.create_connection(("127.0.0.1", port))
        acc, _ = srv.accept()
        acc.close()  # server closes first; the client never does -> server side orphan FIN_WAIT2
        srv.close()
        code, doc = _why_raw(rebind_cli, str(port), "--reuseaddr", env=env)
        _agrees(code, doc)
        if env is None:
            assert (code == 0) is expect_flag, doc["verdict"]
            if not expect_flag:
                assert doc["blockers"][0]["kind"] == "orphan-fin-wait2"
                assert doc["blockers"][0]["reuseaddr"] is False and "without SO_REUSEADDR" in doc["verdict"]
        else:
            assert code == 1 and doc["status"] == "uncertain"
            assert (
                doc["blockers"][0]["kind"] == "orphan-fin-wait2" and doc["blockers"][0]["reuseaddr"] is None
            )
        code, doc = why(rebind_cli, str(port), env=env)
        assert code == 1 and doc["status"] == "busy" and 0 < doc["frees_in_ms"] <= 30_000
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            assert expect_flag
        except OSError:
            assert not expect_flag
        finally:
            s.close()
        cli.close()


def test_close_wait_held_by_server_process(netns, procs, rebind_cli):
    code = """
import socket, sys, time
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.listen()
c = socket.create_connection(('127.0.0.1', {port}))
a, _ = s.accept()
s.close()   # the listener is gone...
c.close()   # ...the client hung up, but the server never closes its end: CLOSE_WAIT
print('ready', flush=True)
time.sleep(600)
"""
    p = procs.python(code.format(port=18115))
    procs.wait_line(p)
    code_, doc = why(rebind_cli, "18115", env=NO_BPF)
    assert code_ == 1
    [b] = doc["blockers"]
    assert b["socket"]["state"] == "CLOSE_WAIT" and b["kind"] == "closing-leftover"
    assert [o["pid"] for o in b["socket"]["owners"]] == [p.pid] and b["flags_source"] == "read"
    assert "CLOSE_WAIT" in doc["verdict"]


# --- issue 9: asking never changes the answer; the kernel's answer is the verdict ---------------

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)


def _why_raw(rebind_cli: Any, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    res = rebind_cli("why", *args, "--json", env=env)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def _agrees(code: int, doc: dict[str, Any]) -> None:
    """Verdict line, exit code and JSON bindable always agree."""
    assert (code == 0) == doc["bindable"] == (doc["status"] == "free")
    assert ("is busy" in doc["verdict"]) == (doc["status"] == "busy") or doc["status"] != "free"


@pytest.mark.parametrize("env", [None, NO_BPF])
def test_reuseport_cleared_after_bind_why_says_free_and_the_real_bind_still_works(netns, rebind_cli, env):
    """Wrong answer #1: the bucket's tb->fastreuseport cache lets B bind although A cleared its
    SO_REUSEPORT. With the bucket read (the listener's icsk_bind_hash; for a bound-only socket,
    which no table the iterator walks holds, the bind hash itself: kernel/facts.py
    _bucket_from_bind_hash) the model takes the fast path and says free; unread (no BPF) it says
    it depends on the cache -- never a wrong "busy" -- and runs no trial that could reset it. B's
    real bind works either way."""
    for listen in (False, True):
        port = 18130 + listen + (2 if env else 0)
        a = socket.socket()
        a.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        a.bind(("127.0.0.1", port))
        if listen:
            a.listen()
        a.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 0)
        code, doc = _why_raw(rebind_cli, str(port), "--addr", "127.0.0.1", "--reuseport", env=env)
        _agrees(code, doc)
        assert doc["disagreement"] is None and "changed after" not in json.dumps(doc)
        if env is None:
            assert code == 0 and doc["status"] == "free" and "fast path" in json.dumps(doc["notes"])
        else:
            assert doc["status"] == "uncertain" and "SO_REUSEPORT cache" in doc["verdict"]
        b = socket.socket()
        b.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        b.bind(("127.0.0.1", port))  # raised EADDRINUSE when a trial reset the cache
        b.close()
        a.close()


def test_time_wait_of_a_reuseport_listener_lets_a_reuseport_restart(netns, procs, rebind_cli):
    """Wrong answers #3/#4: TIME_WAIT left by a SO_REUSEPORT listener without SO_REUSEADDR."""
    opts = "s.setsockopt(socket.SOL_SOCKET, 15, 1)\n"
    p = procs.python(TIME_WAIT.format(port=19132, opts=opts))
    procs.wait_line(p)
    port = str(19132)
    code, doc = _why_raw(rebind_cli, port, "--reuseport")
    _agrees(code, doc)
    assert code == 0 and doc["status"] == "free" and doc["disagreement"] is None
    code, doc = _why_raw(rebind_cli, port, "--reuseport", env=NO_BPF)
    _agrees(code, doc)
    assert code == 1 and doc["status"] == "uncertain" and doc["disagreement"] is None
    code, doc = _why_raw(rebind_cli, port)  # read from the TIME_WAIT itself
    [b] = doc["blockers"]
    assert b["reuseport"] is True and b["reuseaddr"] is False and b["flags_source"] == "kernel"
    assert b["rule"] == "reuseport-missing-new"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", int(port)))
    s.close()


def test_udp_flags_inferred_from_trials_without_owners(netns, monkeypatch):
    """Trials infer SO_REUSEPORT for UDP too (owners=False: nobody reads the flags)."""
    from rebind.diagnosis import default_request, diagnose

    monkeypatch.setenv("REBIND_NO_BPF", "1")

    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
    u.bind(("127.0.0.1", 18133))
    d = diagnose(default_request(18133, proto="udp"), owners=False)
    assert d.verdict.value == "busy" and not d.bindable and d.disagreement is None
    [b] = d.blockers
    assert b.opts.reuseport is True and b.provenance.value == "inferred-trial"
    assert b.blocker.rule.value == "reuseport-missing-new"
    assert any(a.works and a.request.reuseport for a in d.attempts)
    u.close()


def test_trial_honours_freebind(netns):
    from dataclasses import replace

    from rebind.diagnosis import default_request, diagnose

    d = diagnose(replace(default_request(18999, addr="192.0.2.1"), freebind=True))
    assert d.bindable and d.disagreement is None and d.trial is not None and d.trial.ok
    d = diagnose(default_request(18999, addr="192.0.2.1"))
    assert not d.bindable and d.disagreement is None and d.verdict.value == "cannot-bind"


def test_tentative_ipv6_address(netns, rebind_cli):
    """Wrong answer #2: DAD still running (a veth without carrier keeps the address tentative)."""
    import subprocess

    from tests.toolcheck import need_tool

    need_tool("ip")
    subprocess.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
    subprocess.run(["ip", "link", "set", "v0", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "2001:db8:1::5/64", "dev", "v0"], check=True)
    code, doc = _why_raw(rebind_cli, "18134", "--addr", "2001:db8:1::5")
    _agrees(code, doc)
    assert code == 1 and doc["status"] == "cannot-bind" and doc["disagreement"] is None
    assert doc["blockers"][0]["kind"] == "address-tentative" and "tentative" in doc["verdict"]
    assert doc["trial"]["error"] == "EADDRNOTAVAIL"


def test_link_local_scope_and_bad_interface(netns, rebind_cli):
    """Issue 8 #14: no "UNCONN connection" for a no-socket blocker; a bad interface is usage."""
    code, doc = _why_raw(rebind_cli, "18135", "--addr", "fe80::1%lo")
    assert code == 1 and doc["disagreement"] is None and doc["request"]["ifindex"] == 1
    assert doc["blockers"][0]["kind"] == "address-not-local" and "connection" not in doc["verdict"]
    res = rebind_cli("why", "18135", "--addr", "fe80::1%nosuchif")
    assert res.returncode == 2 and "nosuchif" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    code, doc = _why_raw(rebind_cli, "18135", "--addr", "fe80::1")
    assert code == 1 and doc["blockers"][0]["kind"] == "invalid-address" and doc["disagreement"] is None


def test_procfs_fallback_names_its_blind_spot(netns, procs, rebind_cli):
    """Issue 8 #22: bound-inactive sockets are not in /proc/net/tcp: a limitation, not a bug."""
    p = procs.python(BOUND_ONLY.format(port=18136))
    procs.wait_line(p)
    res = rebind_cli("why", "18136", env={"REBIND_FORCE_PROCFS": "1"})
    assert res.returncode == 1, res.stdout
    assert "please report" not in res.stdout and "/proc/net/tcp" in res.stdout
    assert "is busy" in res.stdout.splitlines()[0]


def test_holder_outside_this_pid_namespace(netns, procs):
    """Issue 8 #26: a listener no process here holds (root saw every fd): no `rebind free`."""
    import os
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("unshare(1) missing")
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18137))
    procs.wait_line(p)
    env = {**os.environ, "NO_COLOR": "1"}
    res = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "rebind", "why", "18137"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 1, res.stderr
    assert "outside this PID namespace" in res.stdout and "rebind free" not in res.stdout


def _real_bind(
    family: int, target: tuple[Any, ...], *, device: int = 0, v6only: int | None = None
) -> int | None:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if device:
            s.setsockopt(socket.SOL_SOCKET, 62, device)  # SO_BINDTOIFINDEX
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        s.bind(target)
        return None
    except OSError as exc:
        return exc.errno
    finally:
        s.close()


def _veth(*cmds: str) -> None:
    import subprocess

    subprocess.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
    for cmd in cmds:
        subprocess.run(["ip", *cmd.split()], check=True)
    subprocess.run(["ip", "link", "set", "d0", "up"], check=True)
    subprocess.run(["ip", "link", "set", "d1", "up"], check=True)


def test_scope_id_beside_device_the_scope_wins(netns, rebind_cli):
    """Issue 17: `--addr fe80::1%d0 --device d1`: __inet6_bind lets the scope id override
    SO_BINDTODEVICE. The model, the trial and the real bind (set up the same way) agree."""
    _veth("addr add fe80::1/64 dev d0 nodad")
    d0, d1 = socket.if_nametoindex("d0"), socket.if_nametoindex("d1")
    for scope, device, ok in (("d0", "d1", True), ("d1", "d0", False)):
        code, doc = _why_raw(rebind_cli, "18140", "--addr", f"fe80::1%{scope}", "--device", device)
        _agrees(code, doc)
        assert doc["request"]["ifindex"] == socket.if_nametoindex(scope) and doc["disagreement"] is None
        real = _real_bind(
            socket.AF_INET6,
            ("fe80::1", 18140, 0, socket.if_nametoindex(scope)),
            device=socket.if_nametoindex(device),
        )
        assert (real is None) is ok and (code == 0) is ok
        if not ok:
            assert real == 99 and doc["blockers"][0]["kind"] == "address-not-local"
    assert {d0, d1} == {socket.if_nametoindex("d0"), socket.if_nametoindex("d1")}


def test_v6only_0_can_be_asked_when_bindv6only_is_1(netns, rebind_cli):
    """Issue 17: IPV6_V6ONLY=0 under net.ipv6.bindv6only=1 (per netns): dual-stack [::] meets an
    IPv4 listener; the default (the sysctl's 1) does not. Model == real bind for each."""
    path = "/proc/sys/net/ipv6/bindv6only"
    with open(path) as f:
        old = f.read().strip()
    lst = socket.socket()
    try:
        with open(path, "w") as f:
            f.write("1")
        lst.bind(("0.0.0.0", 18141))
        lst.listen()
        for flag, v6only, busy in (
            (("--v6only", "0"), 0, True),
            ((), None, False),
            (("--v6only", "1"), 1, False),
        ):
            code, doc = _why_raw(rebind_cli, "18141", "--addr", "::", *flag)
            _agrees(code, doc)
            real = _real_bind(socket.AF_INET6, ("::", 18141), v6only=v6only)
            assert (real == 98) is busy and (code == 1) is busy, (flag, doc["verdict"])
            assert doc["request"]["v6only"] == (None if v6only is None else bool(v6only))
    finally:
        lst.close()
        with open(path, "w") as f:
            f.write(old)


def test_subnet_broadcast_address_is_bindable(netns, rebind_cli):
    """Issue 17: 10.9.0.255 beside 10.9.0.1/24 is RTN_BROADCAST: bind() takes it (TCP too)."""
    _veth("addr add 10.9.0.1/24 dev d0")
    for addr, ok in (("10.9.0.255", True), ("10.9.0.0", False), ("10.9.0.7", False)):
        code, doc = _why_raw(rebind_cli, "18142", "--addr", addr)
        _agrees(code, doc)
        real = _real_bind(socket.AF_INET, (addr, 18142))
        assert (real is None) is ok and (code == 0) is ok and doc["disagreement"] is None, addr
        from rebind.diagnosis import default_request
        from rebind.kernel.facts import gather
        from rebind.model.advice import assess

        facts = gather(default_request(18142, addr=addr), trials=False)  # the model alone
        assert assess(facts.request, facts).outcome.ok is ok, addr
