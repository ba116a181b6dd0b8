"""Rootless Podman: `rootlessport` holds the port with nothing in its command line; the container
is found through the network namespace of its main thread (the container's)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

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


def test_rootless_fix_runs_as_the_containers_user(
    netns: int, rootless_user: RootlessUser, rebind_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """The container is the user's: root's `podman stop NAME` would act on root's containers. The
    fix line runs the user's own podman, and works exactly as printed."""
    port = free_port()
    ulimits = "--ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
    res = rootless_user.sh(
        "tar -C rootfs -c . | $P import -q - localhost/bb:latest >/dev/null && "
        f"$P run -d --name rlfix {ulimits} -p 127.0.0.1:{port}:80 localhost/bb:latest "
        "/bin/busybox httpd -f -p 80 -h /www",
        check=False,
    )
    assert res.returncode == 0, res.stderr
    # The container's record in the user's Podman state can trail `run -d` on a loaded machine
    # (the state database is still being written): rebind rightly says "no container" until it
    # lists it, so wait for the state, not for a fixed time.
    deadline = time.monotonic() + 30
    while True:
        (owner,) = _listener(port).owners
        if owner.container is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert owner.container is not None and owner.container.user == rootless_user.name
    why = rebind_cli("why", str(port), "--json")
    assert why.returncode == 1, why.stderr
    command = json.loads(why.stdout)["fixes"][0]["command"]
    assert command == f"su - {rootless_user.name} -c 'podman stop rlfix'"
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    state = rootless_user.sh("$P inspect -f '{{.State.Status}}' rlfix").stdout.strip()
    assert state == "exited"
