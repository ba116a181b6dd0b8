"""What the container engines say about their containers: Docker's API socket and Podman's state
on disk, each asked only when the kernel vouches for its writer (issue 18).

* a Docker socket is asked only when its path is root's all the way down, and the server end
  (SO_PEERCRED) is root: the very dockerd whose ``-H`` named it;
* every name and id is validated (model/containers/) and the answer bounded in bytes, JSON
  depth and total time: an engine that fails any of it "did not answer" (a table warning).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from rebind.kernel.containers.trust import real_uid, root_only_path, root_only_path_file, root_owned_exe
from rebind.model.containers import (
    ContainerRef,
    Engine,
    content_end,
    json_depth_within,
    parse_api_answer,
    valid_id,
    valid_name,
)
from rebind.textsafe import visible

IPAddress = IPv4Address | IPv6Address


DOCKER_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock")
PODMAN_STATE = ("/var/lib/containers/storage/overlay-containers/containers.json",)
#: The whole engine query (every socket asked) must end within this: `rebind ls` never waits on
#: a hung or dripping daemon. It is a total deadline, not a per-read timeout.
API_DEADLINE = 1.5
#: A hostile or huge API answer is not read past this (a host with thousands of containers
#: answers /containers/json in well under 4 MiB).
API_MAX_BYTES = 4 << 20
#: Real answers nest 5 deep; json.loads recurses once per level (RecursionError near 1000).
API_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class EngineState:
    """What the engines on this host say about their containers (empty when none answer)."""

    names: dict[str, tuple[Engine, str]] = field(default_factory=dict)  # id -> (engine, name)
    by_ip: dict[IPAddress, str] = field(default_factory=dict)  # container address -> id
    by_sandbox: dict[str, str] = field(default_factory=dict)  # netns path -> id
    sources: tuple[str, ...] = ()
    #: Engines that were found but not believed or did not answer, one line each (shown as
    #: table warnings: a missing container name is then explained, never an error).
    problems: tuple[str, ...] = ()

    def ref(self, cid: str, engine: Engine) -> ContainerRef:
        known = self.names.get(cid)
        return ContainerRef(known[0] if known else engine, cid, known[1] if known else None)


def _peer_cred(s: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process that created the listening socket we are connected to."""
    pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


PeerCheck = Callable[[int, int], "str | None"]


def dockerd_peer(want_pid: int | None, proc: str = "/proc") -> PeerCheck:
    """The server end must be root's: the very dockerd whose ``-H`` named the socket, or (for the
    default paths, which systemd's docker.socket may have created) a root-owned program run as
    root."""

    def check(pid: int, uid: int) -> str | None:
        if uid != 0:
            return f"its server runs as uid {uid}, not root"
        if want_pid is not None:
            return None if pid == want_pid else f"its server is pid {pid}, not dockerd[{want_pid}]"
        if real_uid(pid, proc) != 0 or root_owned_exe(pid, proc) is None:
            return f"its server (pid {pid}) is not a root-owned program run by root"
        return None

    return check


def _read_answer(s: socket.socket, deadline: float) -> bytes:
    """The raw HTTP answer, read until the server closes or Content-Length is reached; raises
    TimeoutError at the deadline and ValueError past API_MAX_BYTES (plus headers)."""
    buf = bytearray()
    limit = API_MAX_BYTES + 65536
    need: int | None = None  # total length once the headers are in; -1: until the server closes
    while need is None or need < 0 or len(buf) < need:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer before the deadline")
        s.settimeout(left)
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"answer larger than {API_MAX_BYTES >> 20} MiB")
        if need is None and b"\r\n\r\n" in buf:
            end = content_end(bytes(buf))
            need = -1 if end is None else end
    return bytes(buf)


def _docker_api(
    path: str, deadline: float | None = None, peer: PeerCheck | None = None
) -> tuple[list[object] | None, str | None]:
    """``GET /containers/json`` over a unix socket: (the list, None) or (None, why not).

    Never raises and never outlives ``deadline`` (monotonic; default API_DEADLINE from now):
    the answer is another process's bytes, bounded in time, size and nesting before parsing.
    """
    if deadline is None:
        deadline = time.monotonic() + API_DEADLINE
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        s.connect(path)
        if peer is not None:
            problem = peer(*_peer_cred(s))
            if problem is not None:
                return None, f"not asked: {problem}"
        s.sendall(b"GET /containers/json HTTP/1.0\r\nHost: docker\r\nConnection: close\r\n\r\n")
        raw = _read_answer(s, deadline)
    except TimeoutError:
        return None, f"no complete answer within {API_DEADLINE:g} s"
    except OSError as exc:
        return None, f"could not be asked ({exc.strerror or exc})"
    except ValueError as exc:
        return None, str(exc)
    finally:
        s.close()
    doc = parse_api_answer(raw, API_MAX_DEPTH)
    return (None, doc) if isinstance(doc, str) else (doc, None)


def _root_dockerd_sockets(proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, path) of the API sockets of every real dockerd (``-H unix://PATH``,
    ``--host=unix://PATH``): a process running wholly as root whose executable is a root-owned
    file named dockerd. Its name and argv are its own choice and prove nothing."""
    found: list[tuple[int, str]] = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if real_uid(pid, proc) != 0 or root_owned_exe(pid, proc) != "dockerd":
            continue
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as fh:
                argv = [a.decode("utf-8", "surrogateescape") for a in fh.read(1 << 20).split(b"\0") if a]
        except OSError:
            continue
        for i, arg in enumerate(argv):
            value = None
            if arg in ("-H", "--host") and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(("--host=", "-H=")):
                value = arg.split("=", 1)[1]
            if value and value.startswith("unix://"):
                found.append((pid, value[len("unix://") :]))
    return found


def _add_docker(state: EngineState, containers: Iterable[object]) -> None:
    """Ids, names and addresses from an answer: only a 64-hex id and a valid name are kept."""
    for c in containers:
        if not isinstance(c, dict):
            continue
        cid = c.get("Id")
        if not valid_id(cid):
            continue
        assert isinstance(cid, str)
        names = c.get("Names")
        if isinstance(names, list) and names and isinstance(names[0], str):
            name = names[0].removeprefix("/")
            if valid_name(name):
                state.names[cid] = (Engine.DOCKER, name)
        nets = c.get("NetworkSettings")
        networks = nets.get("Networks") if isinstance(nets, dict) else None
        if isinstance(networks, dict):
            for net in networks.values():
                if not isinstance(net, dict):
                    continue
                for key in ("IPAddress", "GlobalIPv6Address"):
                    value = net.get(key)
                    if isinstance(value, str) and value:
                        with contextlib.suppress(ValueError):
                            state.by_ip[ip_address(value)] = cid


def podman_names(path: str) -> dict[str, str] | None:
    """id -> name from a Podman ``containers.json`` (ids 64 hex, names valid), None if unreadable."""
    import json

    try:
        with open(path, "rb") as fh:
            text = fh.read(API_MAX_BYTES + 1)
    except OSError:
        return None
    if len(text) > API_MAX_BYTES or not json_depth_within(text, API_MAX_DEPTH):
        return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, list):
        return None
    out: dict[str, str] = {}
    for c in doc:
        if isinstance(c, dict) and valid_id(c.get("id")):
            names = c.get("names")
            if isinstance(names, list) and names and valid_name(names[0]):
                out.setdefault(c["id"], names[0])
    return out


def _add_podman(state: EngineState, path: str) -> bool:
    names = podman_names(path)
    if names is None:
        return False
    for cid, name in names.items():
        state.names.setdefault(cid, (Engine.PODMAN, name))
    return True


def engine_state(proc: str = "/proc") -> EngineState:
    """Ask every engine that is reachable and believed; never raises, and the whole Docker query
    ends within API_DEADLINE (an engine that is late, huge or garbled "did not answer")."""
    state = EngineState()
    sources: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    deadline = time.monotonic() + API_DEADLINE
    found = [(None, p) for p in DOCKER_SOCKETS] + list(_root_dockerd_sockets(proc))
    for pid, path in found:
        real = os.path.realpath(path)
        if real in seen or not os.path.exists(real):
            continue
        seen.add(real)
        why = root_only_path(real)
        if why is None:
            answer, why = _docker_api(real, deadline, dockerd_peer(pid, proc))
            if answer is not None:
                _add_docker(state, answer)
                sources.append(f"docker:{path}")
                continue
        problems.append(
            f"Docker engine at {visible(path)} did not answer ({why}): its containers are not named"
        )
    for path in PODMAN_STATE:
        if root_only_path_file(path) is None and _add_podman(state, path):
            sources.append(f"podman:{path}")
    return EngineState(state.names, state.by_ip, state.by_sandbox, tuple(sources), tuple(problems))
