"""Container context for owners: which container and unit a process is in, which container a
port-holding proxy serves, and which NAT rules capture a port. No engine is a dependency: each
source is tried when present and skipped quietly when not.

Sources, cheapest first:

* ``/proc/PID/cgroup`` → container id and systemd unit (:mod:`rebind.model.containers`);
* the proxy's own command line (conmon ``-c ID -n NAME``; docker-proxy ``-container-ip``);
* Docker's API socket (``GET /containers/json``: names, addresses), at ``/run/docker.sock`` and at
  every ``-H unix://…`` of a real dockerd;
* Podman's state on disk (``<graphroot>/overlay-containers/containers.json``: ids and names);
* ``iptables-save -t nat`` (iptables-nft included) for NAT captures.

rebind runs as root and every one of these is written by some other process, so each is
believed only as far as the kernel vouches for its writer (issue 18):

* a process is who the kernel says: its real uid (all four ``Uid:`` fields of /proc/PID/status,
  not the owner of /proc/PID, which a setuid program started by anyone makes root) and its
  executable (``/proc/PID/exe``: a root-owned file nobody else may write, named as the engine's
  program), never its comm or argv[0];
* a Docker socket is asked only when its path is root's all the way down, and the server end
  (SO_PEERCRED) is root: the very dockerd whose ``-H`` named it;
* a rootless proxy serves a container only if a conmon of its own user, in its namespace,
  points at that user's Podman state, which lists the container; the fix then runs as that user;
* every name and id is validated (model/containers/) and the answer bounded in bytes, JSON
  depth and total time: an engine that fails any of it "did not answer" (a table warning).
Rooms: ``trust.py`` (who a process really is, which paths only root controls), ``engines.py``
(Docker's API socket, Podman's state), ``proxies.py`` (which container a port proxy serves),
``nat.py`` (``iptables-save``), ``attribution.py`` (each owner's context, the engines asked
only when needed).
"""

from __future__ import annotations

from rebind.kernel.containers.attribution import ProcContext, annotate, annotate_owner, read_context
from rebind.kernel.containers.engines import (
    API_DEADLINE,
    API_MAX_BYTES,
    API_MAX_DEPTH,
    EngineState,
    PeerCheck,
    dockerd_peer,
    engine_state,
)
from rebind.kernel.containers.nat import captures_for, iptables_nat
from rebind.kernel.containers.proxies import resolve_proxy
from rebind.kernel.containers.trust import (
    ENGINE_EXES,
    is_engine_process,
    real_uid,
    root_only_path,
    root_only_path_file,
    root_owned_exe,
)

__all__ = [
    "API_DEADLINE",
    "API_MAX_BYTES",
    "API_MAX_DEPTH",
    "ENGINE_EXES",
    "EngineState",
    "PeerCheck",
    "ProcContext",
    "annotate",
    "annotate_owner",
    "captures_for",
    "dockerd_peer",
    "engine_state",
    "iptables_nat",
    "is_engine_process",
    "read_context",
    "real_uid",
    "resolve_proxy",
    "root_only_path",
    "root_only_path_file",
    "root_owned_exe",
]
