"""Rootless Podman: `rootlessport` holds the port with nothing in its command line; the container
is found through the network namespace of its main thread (the container's)."""

from __future__ import annotations

from rebind.model.containers import Engine, ProxyKind
from tests.engines.conftest import RootlessUser, free_port
from tests.engines.test_docker_engine import _listener


def test_rootlessport_is_resolved_by_netns(netns: int, rootless_user: RootlessUser) -> None:
    port = free_port()  # the user's podman runs in this test's namespace (su inherits it)
    ulimits = "--ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
    res = rootless_user.sh(
        "tar -C rootfs -c . | $P import -q - localhost/bb:latest >/dev/null && "
        f"$P run -d --name rlweb {ulimits} -p 127.0.0.1:{port}:80 localhost/bb:latest "
        "/bin/busybox httpd -f -p 80 -h /www",
        check=False,
    )
    assert res.returncode == 0, res.stderr
    cid = res.stdout.strip().splitlines()[-1]
    e = _listener(port)
    (owner,) = e.owners
    assert owner.name == "rootlessport" and owner.proxy is ProxyKind.ROOTLESSPORT
    assert owner.uid == rootless_user.uid
    assert owner.container is not None
    assert (owner.container.engine, owner.container.id, owner.container.name) == (Engine.PODMAN, cid, "rlweb")
