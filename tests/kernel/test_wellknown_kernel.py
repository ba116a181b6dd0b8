"""Every catalogue holder that apt has, run for real (issue 20): `rebind why` recognises it from
the kernel's facts and prints its owner's fix; the fix, run exactly as printed in a sandbox
(tests/cases/sandbox.py), frees the port, `why --check-fix` agrees, a real bind works, and the
printed revert brings the holder back. systemd-resolved and kube-proxy cannot run here: see
tests/unit/test_wellknown.py. A hostile user's look-alike gets no advice."""

from __future__ import annotations

import json
import subprocess

import pytest

from rebind.kernel.wellknown import catalogue
from tests.cases.daemons import DAEMONS, Daemon
from tests.cases.sandbox import Sandbox, bind_works, need, port_held, sandbox, wait_for


def start_daemon(box: Sandbox, d: Daemon) -> int:
    need(d.exe)
    for line in d.net:
        subprocess.run(line.split(), check=True)
    return box.start(d.unit, d.argv, lambda: port_held(d.port, d.proto), d.id, d.restart_as)


def why_args(d: Daemon, *more: str) -> list[str]:
    return ["why", str(d.port), *(["--udp"] if d.proto == "udp" else []), *more]


@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_holder_recognised_fix_works_and_reverts(netns, tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    d = DAEMONS[name]
    need(d.exe)
    entry = next(e for e in catalogue() if e.id == d.id)
    with sandbox(tmp_path, d.setup) as box:
        pid = start_daemon(box, d)
        res = box.rebind(*why_args(d, "--json"))
        doc = json.loads(res.stdout)
        ids = [w["id"] for w in doc["wellknown"]]
        assert ids == [d.id], (ids, doc["lookalikes"], res.stderr)
        w = doc["wellknown"][0]
        assert w["pid"] == pid
        fix = [line.format(port=d.port, proto=d.proto) for line in entry.fix]
        assert w["fix"] == fix
        text = box.rebind(*why_args(d)).stdout
        for line in fix:
            assert f"$ {line}" in text  # printed exactly as it will be run
        if d.frees_port:
            assert box.rebind(*why_args(d, "--check-fix")).returncode == 1  # not yet
        outputs = []
        for line in fix:
            ran = box.run(line)
            assert ran.returncode == 0, (line, ran.stdout, ran.stderr)
            outputs.append(ran.stdout)
        if d.frees_port:
            wait_for(lambda: not port_held(d.port, d.proto), 15, f"{d.id} to let go of {d.port}")
            check = box.rebind(*why_args(d, "--check-fix"))
            assert check.returncode == 0, check.stdout + check.stderr
            assert "fixed" in check.stdout
            assert bind_works(d.port, d.proto)
        else:  # sshd: the fix is another port for *your* server
            (picked,) = [int(x) for x in outputs[-1].split() if x.isdigit()]
            assert bind_works(picked, d.proto)
        if entry.revert:
            for line in w["revert"]:
                ran = box.run(line)
                assert ran.returncode == 0, (line, ran.stderr)
            wait_for(lambda: port_held(d.port, d.proto), 15, f"{d.id} back on {d.port} after the revert")


HOSTILE = """
import socket, time, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 5353))
print('ready', flush=True)
time.sleep(600)
"""


def test_hostile_process_named_like_avahi_gets_no_advice(netns, procs, rebind_cli) -> None:  # type: ignore[no-untyped-def]
    """`exec -a avahi-daemon` as nobody: comm and argv[0] say avahi-daemon, /proc/PID/exe says
    python. root must not be told to disable avahi."""
    code = f"import os, sys; os.execv(sys.executable, ['avahi-daemon', '-c', {HOSTILE!r}])"
    p = procs.start(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", code]
    )
    assert procs.wait_line(p) == "ready"
    subprocess.run(["sh", "-c", f"echo -n avahi-daemon > /proc/{p.pid}/comm"], check=False)
    doc = json.loads(rebind_cli("why", "5353", "--udp", "--json").stdout)
    assert doc["wellknown"] == []
    (fake,) = doc["lookalikes"]
    assert fake["like"] == "avahi-daemon" and fake["pid"] == p.pid
    text = rebind_cli("why", "5353", "--udp").stdout
    assert "systemctl" not in text and "no advice" in text


def test_real_binary_run_by_an_ordinary_user_is_not_the_system_daemon(netns, procs, rebind_cli) -> None:  # type: ignore[no-untyped-def]
    """nobody running the packaged dnsmasq is not the dnsmasq service: no root advice."""
    need("/usr/sbin/dnsmasq")
    # This namespace only: let nobody bind 53.
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as f:
        f.write("0")
    procs.start(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/sbin/dnsmasq",
            "-k",
            "--conf-file=/dev/null",
            "--port=53",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--pid-file",
            "--user=nobody",
        ]
    )
    wait_for(lambda: port_held(53, "udp"), 10, "dnsmasq as nobody")
    doc = json.loads(rebind_cli("why", "53", "--udp", "--json").stdout)
    assert doc["wellknown"] == []
    assert [x["like"] for x in doc["lookalikes"]] == ["dnsmasq"]
    assert "uid 65534" in doc["lookalikes"][0]["reason"]


def test_kube_nodeport_rule_recognised_fix_works_and_reverts(netns, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kube-proxy holds no socket: the KUBE-NODEPORTS rule (real, in this namespace) is the
    holder; the Service's name comes from the rule's comment, the printed kubectl lines run
    against a stand-in that does what kube-proxy does when the Service goes (drops the rule)."""
    need("iptables")
    with sandbox(tmp_path) as box:
        box.nodeport("shop", "cart", 30080)
        doc = json.loads(box.rebind("why", "30080", "--json").stdout)
        assert doc["bindable"] is True  # binds fine: the rule, not a socket, is the trouble
        (w,) = doc["wellknown"]
        assert w["id"] == "kube-proxy-nodeport" and w["via"] == "KUBE-NODEPORTS" and w["pid"] is None
        assert w["fix"] == [
            "kubectl -n shop get service cart -o yaml > rebind-service-backup.yaml",
            "kubectl -n shop delete service cart",
        ]
        assert box.rebind("why", "30080", "--check-fix").returncode == 1
        for line in w["fix"]:
            ran = box.run(line)
            assert ran.returncode == 0, (line, ran.stderr)
        check = box.rebind("why", "30080", "--check-fix")
        assert check.returncode == 0, check.stdout
        for line in w["revert"]:
            ran = box.run(line)
            assert ran.returncode == 0, (line, ran.stderr)
        assert box.rebind("why", "30080", "--check-fix").returncode == 1  # the Service is back
