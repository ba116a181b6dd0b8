"""Which port-holding proxy a process is, from its name and command line (docker-proxy, dockerd,
conmon; rootless: rootlessport, pasta, slirp4netns). The name is the process's own choice:
kernel/containers/proxies.py believes it only with the kernel's proof.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from rebind.model.containers.names import HEX64, NAME_OK, Engine, IPAddress, ip_or_none, port_or_none


class ProxyKind(enum.StrEnum):
    """A process that holds a published port on a container's behalf."""

    DOCKER_PROXY = "docker-proxy"  # userland proxy: forwards every connection
    DOCKERD = "dockerd"  # --userland-proxy=false: a reservation socket; NAT moves the traffic
    CONMON = "conmon"  # rootful Podman: a reservation socket; netavark's DNAT moves the traffic
    ROOTLESSPORT = "rootlessport"  # rootless Podman: forwards into the container's netns
    PASTA = "pasta"
    SLIRP4NETNS = "slirp4netns"


_FORWARDING = frozenset(
    {ProxyKind.DOCKER_PROXY, ProxyKind.ROOTLESSPORT, ProxyKind.PASTA, ProxyKind.SLIRP4NETNS}
)


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    kind: ProxyKind
    engine: Engine
    container_id: str | None = None
    container_name: str | None = None
    container_ip: IPAddress | None = None
    container_port: int | None = None
    host_port: int | None = None
    proto: str | None = None

    @property
    def forwards(self) -> bool:
        """True when the proxy itself carries the traffic (killing it cuts the service)."""
        return self.kind in (
            ProxyKind.DOCKER_PROXY,
            ProxyKind.ROOTLESSPORT,
            ProxyKind.PASTA,
            ProxyKind.SLIRP4NETNS,
        )


def _args(cmdline: Sequence[str]) -> dict[str, str]:
    """``-flag value``, ``--flag value`` and ``--flag=value`` pairs, keyed without dashes."""
    out: dict[str, str] = {}
    it = iter(range(len(cmdline)))
    for i in it:
        arg = cmdline[i]
        if not arg.startswith("-"):
            continue
        key = arg.lstrip("-")
        if "=" in key:
            key, _, value = key.partition("=")
            out.setdefault(key, value)
        elif i + 1 < len(cmdline) and not cmdline[i + 1].startswith("-"):
            out.setdefault(key, cmdline[i + 1])
            next(it, None)
    return out


def _program(comm: str, cmdline: Sequence[str]) -> str:
    base = cmdline[0].rsplit("/", 1)[-1] if cmdline else ""
    # comm is cut to 15 bytes by the kernel (TASK_COMM_LEN 16): prefer argv[0] when it agrees.
    return base if base.startswith(comm[:15]) or not comm else comm


def classify_proxy(comm: str, cmdline: Sequence[str]) -> ProxyInfo | None:
    """The proxy a process is, from its name and command line, or None for anything else.

    Only exact program names count; a hostile process can call itself ``docker-proxy``, so callers
    also check the owner's uid (root for rootful engines) before trusting what this returns.
    """
    prog = _program(comm, cmdline)
    if prog == "docker-proxy":
        a = _args(cmdline)
        return ProxyInfo(
            ProxyKind.DOCKER_PROXY,
            Engine.DOCKER,
            container_ip=ip_or_none(a.get("container-ip")),
            container_port=port_or_none(a.get("container-port")),
            host_port=port_or_none(a.get("host-port")),
            proto=a.get("proto") if a.get("proto") in ("tcp", "udp", "sctp") else None,
        )
    if prog == "conmon":
        a = _args(cmdline)
        cid = a.get("c") or a.get("cid")
        name = a.get("n") or a.get("name")
        return ProxyInfo(
            ProxyKind.CONMON,
            Engine.PODMAN,
            container_id=cid if cid and HEX64.fullmatch(cid) else None,
            container_name=name if name and NAME_OK.fullmatch(name) else None,
        )
    if prog == "dockerd":
        return ProxyInfo(ProxyKind.DOCKERD, Engine.DOCKER)
    if prog in ("rootlessport", "rootlessport-child"):
        return ProxyInfo(ProxyKind.ROOTLESSPORT, Engine.PODMAN)
    if prog.startswith("pasta"):
        return ProxyInfo(ProxyKind.PASTA, Engine.PODMAN)
    if prog == "slirp4netns":
        return ProxyInfo(ProxyKind.SLIRP4NETNS, Engine.PODMAN)
    return None
