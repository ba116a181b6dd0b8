"""Which container or systemd unit a process belongs to, from the text of ``/proc/PID/cgroup``.

Layouts handled (measured on this kind of machine, cgroup v1 "hybrid" with v2 at
/sys/fs/cgroup/unified, and from the engines' documentation for systemd hosts):

=========================  ==============================================  ==========
engine / manager           cgroup path                                     where
=========================  ==============================================  ==========
docker (cgroupfs)          ``/docker/<id>``                                v1 + ``0::``
docker (systemd)           ``/system.slice/docker-<id>.scope``             v2
podman (cgroupfs)          ``/libpod_parent/libpod-<id>``                  v1 + ``0::``
podman (systemd)           ``/machine.slice/libpod-<id>.scope``            v2
containerd (systemd)       ``…/cri-containerd-<id>.scope``                 v2
cri-o                      ``…/crio-<id>.scope``                           v2
kubernetes (any runtime)   ``/kubepods…/pod<uid>/<id>`` or ``…pod<uid>.slice/…-<id>.scope``
=========================  ==============================================  ==========

conmon itself sits in ``/libpod_parent/conmon`` (not a container); rootless Podman on cgroup v1
runs with no cgroup at all (path ``/``), so it is found through its network namespace instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rebind.model.containers.names import NAME_OK, ContainerRef, Engine

_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# A container scope or directory: an optional runtime prefix, the 64-hex id, an optional ".scope".
_SCOPE = re.compile(r"(?:(docker|libpod|cri-containerd|crio|containerd)-)?([0-9a-f]{64})(?:\.scope)?")
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".slice")


def _cgroup_paths(text: str) -> list[str]:
    """Paths of every hierarchy line ``ID:CONTROLLERS:PATH`` (v1 lines and the v2 ``0::`` line)."""
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2].startswith("/"):
            paths.append(parts[2])
    return paths


def _engine_for(prefix: str | None, components: Sequence[str]) -> Engine:
    if prefix in ("libpod",) or "libpod_parent" in components or "machine.slice" in components:
        return Engine.PODMAN
    if prefix in ("cri-containerd", "containerd", "crio"):
        return Engine.CONTAINERD
    return Engine.DOCKER


def container_from_path(path: str) -> ContainerRef | None:
    """The container a cgroup path names, or None (host processes, conmon, the sandbox)."""
    components = [c for c in path.split("/") if c]
    pod = next((m.group(1).replace("_", "-") for c in components if (m := _POD_UID.search(c))), None)
    in_kube = any(c.startswith("kubepods") for c in components)
    for i in range(len(components) - 1, -1, -1):
        m = _SCOPE.fullmatch(components[i])
        if m is None:
            continue
        prefix, cid = m.group(1), m.group(2)
        if in_kube:
            return ContainerRef(Engine.KUBERNETES, cid)
        # A bare 64-hex directory is a container only under a known parent: /docker/<id>
        # (docker cgroupfs), /libpod_parent/<libpod-id> handled by the prefix. The sandbox's
        # own /process_api/<hex> is 32 hex and never matches.
        if prefix is None and (i == 0 or components[i - 1] != "docker"):
            continue
        return ContainerRef(_engine_for(prefix, components[:i]), cid)
    if in_kube and pod is not None:
        return ContainerRef(Engine.KUBERNETES, f"pod{pod}")
    return None


def container_from_cgroup(text: str) -> ContainerRef | None:
    """The container of a process, from the text of ``/proc/PID/cgroup`` (v1, v2 or hybrid)."""
    for path in _cgroup_paths(text):
        ref = container_from_path(path)
        if ref is not None:
            return ref
    return None


def unit_from_cgroup(text: str) -> str | None:
    """The systemd unit of a process: the deepest ``*.service``/``*.scope``/... component of the
    ``name=systemd`` (v1) or ``0::`` (v2) path. Slices are only containers of units, not units a
    user would stop, so ``user.slice`` alone gives None."""
    candidates: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[1] not in ("name=systemd", ""):
            continue
        candidates.append(parts[2])
    for path in candidates:
        units = [c for c in path.split("/") if c.endswith(_UNIT_SUFFIXES) and not c.endswith(".slice")]
        if units and NAME_OK.fullmatch(units[-1].replace("@", "-").replace("\\", "-")):
            return units[-1]
    return None
