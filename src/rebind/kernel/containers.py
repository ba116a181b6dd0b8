"""Container context for owners: which container and unit a process is in, which container a
port-holding proxy serves, and which NAT rules capture a port. No engine is a dependency: each
source is tried when present and skipped quietly when not.

Sources, cheapest first:

* ``/proc/PID/cgroup`` → container id and systemd unit (:mod:`rebind.model.containers`);
* the proxy's own command line (conmon ``-c ID -n NAME``; docker-proxy ``-container-ip``) — trusted
  only when the proxy runs as root, since any user can name a process ``docker-proxy``;
* Docker's API socket (``GET /containers/json``: names, addresses, sandbox keys), found at
  ``/run/docker.sock`` and at every ``-H unix://…`` of a root-owned dockerd;
* Podman's state on disk (``overlay-containers/containers.json``: ids and names);
* ``iptables-save -t nat`` (iptables-nft included) for NAT captures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING

from rebind.model.containers import (
    ContainerRef,
    Engine,
    NatCapture,
    ProxyInfo,
    ProxyKind,
    classify_proxy,
    container_from_cgroup,
    nat_captures,
    unit_from_cgroup,
)

if TYPE_CHECKING:
    from rebind.model.records import Owner, SocketTable

IPAddress = IPv4Address | IPv6Address

DOCKER_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock")
PODMAN_STATE = ("/var/lib/containers/storage/overlay-containers/containers.json",)
#: An engine's API must answer quickly or not at all: `rebind ls` never waits on a hung daemon.
API_TIMEOUT = 1.0
#: A hostile or huge API answer is not read past this.
API_MAX_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class ProcContext:
    container: ContainerRef | None = None
    unit: str | None = None


def read_context(pid: int, proc: str = "/proc") -> ProcContext:
    """Container and unit of one process, or empty when it vanished or cannot be read."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except OSError:
        return ProcContext()
    return ProcContext(container_from_cgroup(text), unit_from_cgroup(text))


@dataclass(frozen=True, slots=True)
class EngineState:
    """What the engines on this host say about their containers (empty when none answer)."""

    names: dict[str, tuple[Engine, str]] = field(default_factory=dict)  # id -> (engine, name)
    by_ip: dict[IPAddress, str] = field(default_factory=dict)  # container address -> id
    by_sandbox: dict[str, str] = field(default_factory=dict)  # netns path -> id
    sources: tuple[str, ...] = ()

    def ref(self, cid: str, engine: Engine) -> ContainerRef:
        known = self.names.get(cid)
        return ContainerRef(known[0] if known else engine, cid, known[1] if known else None)


def _docker_api(path: str) -> list[dict[str, object]] | None:
    # Imported here: `rebind ls` annotates owners on every run, and asks an engine only when
    # an owner is in a container or serves one.
    import http.client
    import json
    import socket

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(API_TIMEOUT)
            try:
                s.connect(path)
            except OSError:
                s.close()
                raise
            self.sock = s

    conn = UnixHTTPConnection("localhost", timeout=API_TIMEOUT)
    try:
        conn.request("GET", "/containers/json")
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        doc = json.loads(resp.read(API_MAX_BYTES))
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return doc if isinstance(doc, list) else None


def _root_dockerd_sockets(proc: str = "/proc") -> list[str]:
    """API sockets of dockerd processes owned by root (``-H unix://PATH``, ``--host=unix://PATH``)."""
    found: list[str] = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"{proc}/{entry.name}").st_uid != 0:
                continue
            with open(f"{proc}/{entry.name}/comm", encoding="utf-8", errors="replace") as fh:
                if fh.read().strip() != "dockerd":
                    continue
            with open(f"{proc}/{entry.name}/cmdline", "rb") as fh:
                argv = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        for i, arg in enumerate(argv):
            value = None
            if arg in ("-H", "--host") and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(("--host=", "-H=")):
                value = arg.split("=", 1)[1]
            if value and value.startswith("unix://"):
                found.append(value[len("unix://") :])
    return found


def _add_docker(state: EngineState, containers: Iterable[dict[str, object]]) -> None:
    for c in containers:
        cid = c.get("Id")
        if not isinstance(cid, str):
            continue
        names = c.get("Names")
        if isinstance(names, list) and names and isinstance(names[0], str):
            state.names[cid] = (Engine.DOCKER, names[0].lstrip("/"))
        nets = c.get("NetworkSettings")
        networks = nets.get("Networks") if isinstance(nets, dict) else None
        if isinstance(networks, dict):
            for net in networks.values():
                if not isinstance(net, dict):
                    continue
                for key in ("IPAddress", "GlobalIPv6Address"):
                    with contextlib.suppress(ValueError, TypeError):
                        if net.get(key):
                            state.by_ip[ip_address(str(net.get(key)))] = cid


def _add_podman(state: EngineState, path: str) -> bool:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.loads(fh.read(API_MAX_BYTES))
    except (OSError, ValueError):
        return False
    if not isinstance(doc, list):
        return False
    for c in doc:
        if isinstance(c, dict) and isinstance(c.get("id"), str):
            names = c.get("names")
            if isinstance(names, list) and names and isinstance(names[0], str):
                state.names.setdefault(c["id"], (Engine.PODMAN, names[0]))
    return True


def engine_state(proc: str = "/proc") -> EngineState:
    """Ask every engine that is reachable; never raises, never waits more than API_TIMEOUT each."""
    state = EngineState()
    sources: list[str] = []
    seen: set[str] = set()
    for path in (*DOCKER_SOCKETS, *_root_dockerd_sockets(proc)):
        real = os.path.realpath(path)
        if real in seen or not os.path.exists(real):
            continue
        seen.add(real)
        answer = _docker_api(real)
        if answer is not None:
            _add_docker(state, answer)
            sources.append(f"docker:{path}")
    for path in PODMAN_STATE:
        if _add_podman(state, path):
            sources.append(f"podman:{path}")
    return EngineState(state.names, state.by_ip, state.by_sandbox, tuple(sources))


def resolve_proxy(
    pid: int, comm: str, cmdline: tuple[str, ...], uid: int | None, engines: EngineState, proc: str = "/proc"
) -> tuple[ProxyInfo, ContainerRef | None] | None:
    """The proxy a port holder is and the container it serves, or None when it is no proxy.

    Rootful proxies (docker-proxy, dockerd, conmon) must run as root to be believed; rootlessport
    runs as its user and is resolved through the network namespace of its main thread, which is
    the container's (measured: its other threads stay in the host namespace).
    """
    info = classify_proxy(comm, cmdline)
    if info is None:
        return None
    if info.kind in (ProxyKind.DOCKER_PROXY, ProxyKind.DOCKERD, ProxyKind.CONMON) and uid != 0:
        return None
    if info.kind is ProxyKind.CONMON and info.container_id:
        ref = engines.ref(info.container_id, Engine.PODMAN).with_name(info.container_name)
        return info, ref
    if info.kind is ProxyKind.DOCKER_PROXY and info.container_ip is not None:
        cid = engines.by_ip.get(info.container_ip)
        return info, engines.ref(cid, Engine.DOCKER) if cid else None
    if info.kind is ProxyKind.ROOTLESSPORT:
        return info, _container_in_netns_of(pid, engines, proc)
    return info, None


def _container_in_netns_of(pid: int, engines: EngineState, proc: str) -> ContainerRef | None:
    """The container whose conmon's child lives in the same netns as ``pid``'s main thread."""
    try:
        target = os.stat(f"{proc}/{pid}/ns/net").st_ino
    except OSError:
        return None
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            if os.stat(f"{proc}/{entry.name}/ns/net").st_ino != target:
                continue
            with open(f"{proc}/{entry.name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"{proc}/{ppid}/cmdline", "rb") as fh:
                argv = tuple(a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a)
            with open(f"{proc}/{ppid}/comm", encoding="utf-8", errors="replace") as fh:
                comm = fh.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        parent = classify_proxy(comm, argv)
        if parent is not None and parent.kind is ProxyKind.CONMON and parent.container_id:
            return engines.ref(parent.container_id, Engine.PODMAN).with_name(parent.container_name)
    return None


def iptables_nat() -> str | None:
    """``iptables-save -t nat`` (and ip6tables), or None when the tools are absent or refuse."""
    import shutil
    import subprocess

    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        exe = shutil.which(tool) or next(
            (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.path.exists(p)), None
        )
        if exe is None:
            continue
        try:
            res = subprocess.run(
                [exe, "-t", "nat"], capture_output=True, text=True, timeout=5, errors="replace", check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0:
            out.append(res.stdout)
    return "\n".join(out) if out else None


def captures_for(port: int, proto: str, addr: IPAddress | None) -> tuple[NatCapture, ...]:
    text = iptables_nat()
    return nat_captures(text, port, proto, addr) if text else ()


def annotate_owner(o: Owner, engines: EngineState | None, proc: str = "/proc") -> Owner:
    """The owner with its container, unit and proxy role filled in (unchanged if it vanished).
    ``engines`` None: only what the process itself says (cgroup, command line)."""
    ctx = read_context(o.pid, proc)
    container, proxy = ctx.container, None
    found = resolve_proxy(o.pid, o.name, o.cmdline, o.uid, engines or EngineState(), proc)
    if found is not None:
        info, served = found
        proxy = info.kind
        container = served or container
    elif container is not None and container.name is None and engines is not None:
        container = engines.ref(container.id, container.engine)
    return replace(o, container=container, unit=ctx.unit, proxy=proxy)


def _needs_engines(owners: Iterable[Owner]) -> bool:
    """Engine state (an API round trip) is asked only when an owner is in or serves a container."""
    return any((o.container is not None and o.container.name is None) or o.proxy is not None for o in owners)


def annotate(table: SocketTable, engines: EngineState | None = None, proc: str = "/proc") -> SocketTable:
    """Every owner of ``table`` with its context; each (pid, fd) is read once, and the engines
    are asked only when some owner is a container's process or a port proxy."""
    cache: dict[tuple[int, int], Owner] = {}
    for e in table.entries:
        for o in e.owners:
            if (o.pid, o.fd) not in cache:
                cache[(o.pid, o.fd)] = annotate_owner(o, engines, proc)
    if engines is None and _needs_engines(cache.values()):
        engines = engine_state(proc)
        cache = {k: annotate_owner(o, engines, proc) for k, o in cache.items()}
    entries = tuple(replace(e, owners=tuple(cache[(o.pid, o.fd)] for o in e.owners)) for e in table.entries)
    return replace(table, entries=entries)
