"""Real rootful Podman (netavark, in a throwaway netns): conmon holds the published port."""

from __future__ import annotations

from rebind.model.containers import Engine, ProxyKind
from tests.engines.conftest import Netns, free_port, podman_engine
from tests.engines.test_docker_engine import _listener


def test_conmon_reservation_names_its_container(engine_netns: Netns) -> None:
    port = free_port()
    with podman_engine(engine_netns) as p:
        cid = p.run(
            "--name",
            "pweb",
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
        e = _listener(port)
        (owner,) = e.owners
        assert owner.name == "conmon" and owner.proxy is ProxyKind.CONMON
        assert owner.container is not None
        assert (owner.container.engine, owner.container.id, owner.container.name) == (
            Engine.PODMAN,
            cid,
            "pweb",
        )
