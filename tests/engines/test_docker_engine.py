"""Real Docker (dockerd started by hand in a throwaway netns): who holds a published port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rebind.allns import socket_table_all_netns
from rebind.kernel.containers import iptables_nat
from rebind.kernel.namespaces import list_namespaces, run_in
from rebind.model.containers import Engine, ProxyKind, nat_captures
from rebind.model.records import SocketEntry, State
from tests.engines.conftest import Netns, docker_engine, free_port


def _listener(port: int, timeout: float = 20.0) -> SocketEntry:
    """The listener on ``port`` once its owner's container is resolved (an engine sets up the
    proxy a moment before the container process exists), or whatever is there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        table = socket_table_all_netns(ports=[port])
        found = [e for e in table.entries if e.socket.state is State.LISTEN and e.owners]
        done = found and all(o.container is not None for o in found[0].owners)
        if done or time.monotonic() > deadline:
            assert found, f"nothing listens on {port}: {table}"
            return found[0]
        time.sleep(0.1)


def test_docker_proxy_resolves_to_its_container(engine_netns: Netns) -> None:
    port = free_port()
    with docker_engine(engine_netns) as d:
        cid = d.cli(
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            f"127.0.0.1:{port}:80",
            "localhost/bb:latest",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ).stdout.strip()
        e = _listener(port)
        (owner,) = e.owners
        assert owner.name == "docker-proxy" and owner.proxy is ProxyKind.DOCKER_PROXY
        assert owner.container is not None
        assert (owner.container.engine, owner.container.id, owner.container.name) == (
            Engine.DOCKER,
            cid,
            "web",
        )
        assert e.netns_name == engine_netns.name
        # The CLI, as a user runs it: JSON names the container, the table says the proxy serves it.
        env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
        out = subprocess.run(
            [sys.executable, "-m", "rebind", "ls", "--all-netns", str(port), "--state", "listen", "--json"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        (sock,) = [s for s in json.loads(out)["sockets"] if s["netns_name"] == engine_netns.name]
        assert sock["owners"][0]["container"] == {"engine": "docker", "id": cid, "name": "web", "user": None}
        assert sock["owners"][0]["proxy"] == "docker-proxy"
        table = subprocess.run(
            [sys.executable, "-m", "rebind", "ls", "--all-netns", str(port), "--state", "listen"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        assert f"docker-proxy[{owner.pid}] → web" in table
        # The DNAT rule exists too (used for non-loopback traffic): NAT captures see it.
        ns = next(n for n in list_namespaces().namespaces if n.name == engine_netns.name)
        text = run_in(ns, iptables_nat)
        assert text is not None
        caps = nat_captures(text, port)
        assert caps and caps[0].engine is Engine.DOCKER and caps[0].to_port == 80


def test_dockerd_reservation_without_userland_proxy(engine_netns: Netns) -> None:
    port = free_port()
    with docker_engine(engine_netns, "--userland-proxy=false") as d:
        cid = d.cli(
            "run",
            "-d",
            "--name",
            "web2",
            "-p",
            f"127.0.0.1:{port}:80",
            "localhost/bb:latest",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ).stdout.strip()
        e = _listener(port)
        (owner,) = e.owners
        assert owner.name == "dockerd" and owner.proxy is ProxyKind.DOCKERD
        assert owner.container is not None and owner.container.id == cid and owner.container.name == "web2"


def test_host_network_container_is_named_from_its_cgroup(engine_netns: Netns) -> None:
    port = free_port()
    with docker_engine(engine_netns) as d:
        cid = d.cli(
            "run",
            "-d",
            "--name",
            "hostweb",
            "--network",
            "host",
            "localhost/bb:latest",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            f"127.0.0.1:{port}",
            "-h",
            "/www",
        ).stdout.strip()
        e = _listener(port)
        (owner,) = e.owners
        assert owner.proxy is None and owner.name == "busybox"
        assert owner.container is not None and owner.container.id == cid and owner.container.name == "hostweb"


def _rebind_in(ns: Netns, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        ["nsenter", f"--net={ns.path}", sys.executable, "-m", "rebind", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_why_names_the_container_and_free_refuses_the_proxy(engine_netns: Netns) -> None:
    port = free_port()
    with docker_engine(engine_netns) as d:
        d.cli(
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            f"127.0.0.1:{port}:80",
            "localhost/bb:latest",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        )
        (owner,) = _listener(port).owners
        res = _rebind_in(engine_netns, "why", str(port), "--json")
        assert res.returncode == 1, res.stderr
        doc = json.loads(res.stdout)
        assert doc["blockers"][0]["kind"] == "container-proxy"
        assert doc["fixes"][0]["command"] == "docker stop web"
        # free: refused (exit 5), nothing signalled, and it says to stop the container instead.
        res = _rebind_in(engine_netns, "free", str(port), "--yes")
        assert res.returncode == 5, res.stdout + res.stderr
        assert "docker-proxy" in res.stdout and "stop or re-map the container" in res.stdout
        assert os.path.exists(f"/proc/{owner.pid}")
        # The fix, exactly as printed (DOCKER_HOST names this test's private dockerd), stops it.
        env = dict(os.environ, DOCKER_HOST=d.host)
        done = subprocess.run(
            ["sh", "-c", doc["fixes"][0]["command"]], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert d.cli("inspect", "-f", "{{.State.Running}}", "web").stdout.strip() == "false"


def test_why_warns_about_a_nat_rule_with_no_socket(netns: int) -> None:
    """No engine at all: a DNAT rule like the ones Docker, netavark and kube-proxy write, in the
    test's own namespace. bind() works; why says the traffic goes elsewhere."""
    from tests.engines.conftest import need

    need("iptables")
    port = free_port()
    for rule in (
        ["-N", "DOCKER"],
        [
            "-A",
            "DOCKER",
            "-p",
            "tcp",
            "--dport",
            str(port),
            "-j",
            "DNAT",
            "--to-destination",
            "172.17.0.9:80",
        ],
    ):
        subprocess.run(["iptables", "-t", "nat", *rule], check=True, capture_output=True)
    env = dict(os.environ, NO_COLOR="1")
    res = subprocess.run(
        [sys.executable, "-m", "rebind", "why", str(port), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    notes = json.loads(res.stdout)["notes"]
    assert any("NAT rule (chain DOCKER)" in n and "172.17.0.9:80" in n for n in notes), notes
