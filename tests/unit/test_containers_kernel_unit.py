"""Engine lookups without an engine: a fake /proc, a fake Docker API socket, a fake podman state."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from rebind.kernel import containers as kc
from rebind.kernel.containers import engines as kce
from rebind.model.containers import ContainerRef, Engine, ProxyKind

ID = "3f" * 32
ID2 = "ab" * 32


def _proc(
    tmp: Path, pid: int, *, cgroup: str = "0::/\n", comm: str = "x", argv: tuple[str, ...] = ()
) -> None:
    d = tmp / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_read_context(tmp_path: Path) -> None:
    _proc(tmp_path, 10, cgroup=f"9:name=systemd:/docker/{ID}\n0::/docker/{ID}\n")
    _proc(tmp_path, 11, cgroup="1:name=systemd:/system.slice/nginx.service\n0::/\n")
    assert kc.read_context(10, str(tmp_path)) == kc.ProcContext(ContainerRef(Engine.DOCKER, ID), None)
    assert kc.read_context(11, str(tmp_path)) == kc.ProcContext(None, "nginx.service")
    assert kc.read_context(12, str(tmp_path)) == kc.ProcContext()  # vanished


@pytest.fixture
def docker_api(tmp_path: Path) -> Iterator[str]:
    """A unix-socket HTTP server answering /containers/json like dockerd 20.10 does."""
    path = str(tmp_path / "docker.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    body = json.dumps(
        [
            {
                "Id": ID,
                "Names": ["/web"],
                "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}},
            },
            {"Id": 5, "Names": "bad"},  # hostile/garbled entries are skipped
        ]
    ).encode()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    srv.close()


def test_docker_api_names_and_addresses(docker_api: str) -> None:
    answer, problem = kce._docker_api(docker_api)
    assert answer is not None and problem is None
    state = kc.EngineState()
    kce._add_docker(state, answer)
    assert state.names[ID] == (Engine.DOCKER, "web")
    assert state.by_ip[ip_address("172.17.0.2")] == ID


def test_docker_api_absent_or_silent(tmp_path: Path) -> None:
    assert kce._docker_api(str(tmp_path / "nothing.sock"))[0] is None
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen()  # accepts into the backlog, never answers: bounded by the deadline
    try:
        assert kce._docker_api(str(tmp_path / "silent.sock"), time.monotonic() + 0.2) == (
            None,
            f"no complete answer within {kc.API_DEADLINE:g} s",
        )
    finally:
        silent.close()


def test_podman_state_file(tmp_path: Path) -> None:
    f = tmp_path / "containers.json"
    f.write_text(json.dumps([{"id": ID2, "names": ["db"]}, {"id": 3}]))
    state = kc.EngineState()
    assert kce._add_podman(state, str(f))
    assert state.names == {ID2: (Engine.PODMAN, "db")}
    f.write_text("{not json")
    assert not kce._add_podman(kc.EngineState(), str(f))


def test_resolve_proxy_trusts_only_root_proxies(tmp_path: Path) -> None:
    state = kc.EngineState(names={ID: (Engine.DOCKER, "web")}, by_ip={ip_address("172.17.0.2"): ID})
    argv = (
        "/usr/sbin/docker-proxy",
        "-proto",
        "tcp",
        "-host-port",
        "18081",
        "-container-ip",
        "172.17.0.2",
        "-container-port",
        "80",
    )
    found = kc.resolve_proxy(100, "docker-proxy", argv, 0, state, str(tmp_path))
    assert found is not None
    info, ref = found
    assert info.kind is ProxyKind.DOCKER_PROXY and ref == ContainerRef(Engine.DOCKER, ID, "web")
    # Any user can call a process docker-proxy: not believed unless it runs as root.
    assert kc.resolve_proxy(100, "docker-proxy", argv, 1000, state, str(tmp_path)) is None


def test_conmon_names_its_container(tmp_path: Path) -> None:
    argv = ("/usr/bin/conmon", "-c", ID2, "-n", "web")
    found = kc.resolve_proxy(7, "conmon", argv, 0, kc.EngineState(), str(tmp_path))
    assert found is not None and found[1] == ContainerRef(Engine.PODMAN, ID2, "web")


def test_not_a_proxy(tmp_path: Path) -> None:
    assert kc.resolve_proxy(7, "python3", ("python3",), 0, kc.EngineState(), str(tmp_path)) is None
