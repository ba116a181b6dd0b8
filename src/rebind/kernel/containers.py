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
* every name and id is validated (model/containers.py) and the answer bounded in bytes, JSON
  depth and total time: an engine that fails any of it "did not answer" (a table warning).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Sequence
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
    content_end,
    json_depth_within,
    nat_captures,
    parse_api_answer,
    unit_from_cgroup,
    valid_id,
    valid_name,
    valid_user,
)
from rebind.textsafe import visible

if TYPE_CHECKING:
    from rebind.model.records import Owner, SocketTable

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
#: The program names of the engines' port-holding processes, as the kernel knows their
#: executable (``/proc/PID/exe``), never as the process calls itself (comm, argv[0]).
ENGINE_EXES: dict[ProxyKind, frozenset[str]] = {
    ProxyKind.DOCKERD: frozenset({"dockerd"}),
    ProxyKind.DOCKER_PROXY: frozenset({"docker-proxy"}),
    ProxyKind.CONMON: frozenset({"conmon"}),
    # podman 4 ships /usr/lib/podman/rootlessport; podman 3 re-executed itself under that name.
    ProxyKind.ROOTLESSPORT: frozenset({"rootlessport", "podman"}),
    ProxyKind.PASTA: frozenset({"pasta", "pasta.avx2"}),
    ProxyKind.SLIRP4NETNS: frozenset({"slirp4netns"}),
}
_ROOTLESS = frozenset({ProxyKind.ROOTLESSPORT, ProxyKind.PASTA, ProxyKind.SLIRP4NETNS})


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
    #: Engines that were found but not believed or did not answer, one line each (shown as
    #: table warnings: a missing container name is then explained, never an error).
    problems: tuple[str, ...] = ()

    def ref(self, cid: str, engine: Engine) -> ContainerRef:
        known = self.names.get(cid)
        return ContainerRef(known[0] if known else engine, cid, known[1] if known else None)


# ------------------------------------------------------------------ who a process really is


def real_uid(pid: int, proc: str = "/proc") -> int | None:
    """The uid of a process when its real, effective, saved and filesystem uids all agree
    (``Uid:`` of /proc/PID/status), else None. The owner of /proc/PID is the *effective* uid, so
    a setuid-root program started by any user looks like root there; its real uid does not."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as fh:
            text = fh.read(8192)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            ids = set(line.split()[1:])
            if len(ids) == 1:
                with contextlib.suppress(ValueError):
                    return int(ids.pop())
            return None
    return None


def root_owned_exe(pid: int, proc: str = "/proc") -> str | None:
    """The basename of a process's executable when the kernel's link (/proc/PID/exe) leads to a
    regular file owned by root and writable by nobody else, else None. Unlike comm and argv[0],
    which the process picks, this is the file the kernel executed: a symlink named ``dockerd``
    to /usr/bin/su shows here as ``su``."""
    try:
        target = os.readlink(f"{proc}/{pid}/exe")
        st = os.stat(f"{proc}/{pid}/exe")  # follows the kernel's link to the very inode
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return None
    # A binary replaced by a package upgrade while running reads "/usr/bin/x (deleted)".
    return target.removesuffix(" (deleted)").rsplit("/", 1)[-1]


def is_engine_process(pid: int, kind: ProxyKind, uid: int, proc: str = "/proc") -> bool:
    """Is ``pid`` the engine program ``kind`` (by its executable) running wholly as ``uid``?"""
    return real_uid(pid, proc) == uid and root_owned_exe(pid, proc) in ENGINE_EXES[kind]


def root_only_path(path: str) -> str | None:
    """Why an API socket path is not one only root controls, or None when it is.

    Every directory from / down must be root's and not writable by group or others (a
    root-owned sticky directory such as /tmp is allowed: nobody else may rename or remove root's
    entries in it), and the socket itself root's. The socket's own mode only says who may
    connect (Docker's is 0660 root:docker), not who serves it, so it is not judged.
    """
    if not os.path.isabs(path):
        return "not an absolute path"
    parts = [p for p in path.split("/") if p]
    at = "/"
    for i, part in enumerate(["", *parts]):
        at = os.path.join(at, part) if part else "/"
        try:
            st = os.lstat(at)
        except OSError as exc:
            return f"{at}: {exc.strerror}"
        last = i == len(parts)
        if st.st_uid != 0:
            return f"{at} is owned by uid {st.st_uid}, not root"
        if last:
            return None if stat.S_ISSOCK(st.st_mode) else f"{at} is not a socket"
        if not stat.S_ISDIR(st.st_mode):
            return f"{at} is not a directory"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{at} is writable by group or others"
    return None


# ------------------------------------------------------------------------ Docker's API socket


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


def _podman_names(path: str) -> dict[str, str] | None:
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
    names = _podman_names(path)
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


def root_only_path_file(path: str) -> str | None:
    """As root_only_path, for a regular file (a root engine's state file)."""
    parent, _, _base = path.rpartition("/")
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return f"{path} is not a root-owned regular file"
    why = _dirs_owned_by(parent or "/", 0)
    return why


def _dirs_owned_by(path: str, uid: int) -> str | None:
    """Every directory from / to ``path``: owned by root or ``uid``, and writable by nobody else
    (a root-owned sticky directory such as /tmp excepted: others cannot rename its entries)."""
    at = "/"
    for part in ["", *(p for p in path.split("/") if p)]:
        at = os.path.join(at, part) if part else "/"
        try:
            st = os.lstat(at)
        except OSError as exc:
            return f"{at}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{at} is not a directory"
        if st.st_uid not in (0, uid):
            return f"{at} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
            return f"{at} is writable by group or others"
    return None


# ------------------------------------------------------------------------------ port proxies


def resolve_proxy(
    pid: int, comm: str, cmdline: tuple[str, ...], uid: int | None, engines: EngineState, proc: str = "/proc"
) -> tuple[ProxyInfo, ContainerRef | None] | None:
    """The proxy a port holder is and the container it serves, or None when it is no proxy.

    Rootful proxies (docker-proxy, dockerd, conmon) must run as root (``uid`` is the real uid)
    to be believed. Rootless ones (rootlessport, pasta, slirp4netns) run as their user, and are
    believed only with a container of that same user behind them: a conmon running wholly as
    that user (by its executable, not its name) in the proxy's network namespace, whose
    container id is listed by that user's own Podman state. A process of another user gains
    nothing by its name: it is then no proxy at all, and never names a container.
    """
    info = classify_proxy(comm, cmdline)
    if info is None:
        return None
    if info.kind not in _ROOTLESS:
        if uid != 0:
            return None
        if info.kind is ProxyKind.CONMON and info.container_id:
            return info, engines.ref(info.container_id, Engine.PODMAN).with_name(info.container_name)
        if info.kind is ProxyKind.DOCKER_PROXY and info.container_ip is not None:
            cid = engines.by_ip.get(info.container_ip)
            return info, engines.ref(cid, Engine.DOCKER) if cid else None
        return info, None
    if uid is None or not is_engine_process(pid, info.kind, uid, proc):
        return None
    served = _container_in_netns_of(pid, uid, proc)
    return (info, served) if served is not None else None


def _netns_inodes(pid: int, proc: str) -> set[int]:
    """The network namespaces a proxy works in: its main thread's (rootlessport's is the
    container's), and every namespace it holds open (pasta and slirp4netns keep the
    container's namespace fd while living in the host's)."""
    from rebind.kernel.procfs import ProcFS

    found: set[int] = set()
    with contextlib.suppress(OSError):
        found.add(os.stat(f"{proc}/{pid}/ns/net").st_ino)
    links, _read = ProcFS(proc).fd_links(pid, limit=4096)
    for link in links.values():
        if link.startswith("net:[") and link.endswith("]"):
            with contextlib.suppress(ValueError):
                found.add(int(link[5:-1]))
    return found


def _container_in_netns_of(pid: int, uid: int, proc: str) -> ContainerRef | None:
    """The container of user ``uid`` whose conmon's child lives in a network namespace of the
    proxy ``pid``; None unless the conmon and the state it points at are that user's."""
    targets = _netns_inodes(pid, proc)
    try:
        own = os.stat(f"{proc}/self/ns/net").st_ino
    except OSError:
        own = None
    targets.discard(own or -1)  # the host's namespace holds everything: no evidence
    if not targets:
        return None
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            if os.stat(f"{proc}/{entry.name}/ns/net").st_ino not in targets:
                continue
            with open(f"{proc}/{entry.name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"{proc}/{ppid}/cmdline", "rb") as fh:
                argv = tuple(a.decode("utf-8", "replace") for a in fh.read(1 << 20).split(b"\0") if a)
            with open(f"{proc}/{ppid}/comm", encoding="utf-8", errors="replace") as fh:
                comm = fh.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        parent = classify_proxy(comm, argv)
        if parent is None or parent.kind is not ProxyKind.CONMON or not parent.container_id:
            continue
        if not is_engine_process(ppid, ProxyKind.CONMON, uid, proc):
            continue
        ref = _podman_container(parent.container_id, _arg(argv, "-b", "--bundle"), uid)
        if ref is not None:
            return ref
    return None


def _arg(argv: Sequence[str], *flags: str) -> str | None:
    for i, a in enumerate(argv):
        if a in flags and i + 1 < len(argv):
            return argv[i + 1]
        for f in flags:
            if f.startswith("--") and a.startswith(f + "="):
                return a[len(f) + 1 :]
    return None


def _podman_container(cid: str, bundle: str | None, uid: int) -> ContainerRef | None:
    """The container ``cid`` as user ``uid``'s Podman records it: its bundle
    (``<graphroot>/<driver>-containers/<ID>/userdata``) and that directory's ``containers.json``
    must be owned by ``uid`` in directories nobody else may write, and list ``cid`` by name."""
    if bundle is None or not os.path.isabs(bundle):
        return None
    bundle = os.path.normpath(bundle)
    cdir, _, leaf = bundle.rpartition("/")
    store, _, idpart = cdir.rpartition("/")
    if leaf != "userdata" or idpart != cid or not store.endswith("-containers"):
        return None
    if _dirs_owned_by(bundle, uid) is not None:
        return None
    state = f"{store}/containers.json"
    try:
        st = os.lstat(state)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        return None
    names = _podman_names(state)
    name = names.get(cid) if names else None
    if name is None:
        return None
    user: str | None = None
    if uid != 0:
        import pwd

        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return None  # no name to run its own engine as: do not guess
        if not valid_user(user):
            return None
    return ContainerRef(Engine.PODMAN, cid, name, user)


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
    problems: tuple[str, ...] = ()
    if engines is None and _needs_engines(cache.values()):
        engines = engine_state(proc)
        problems = engines.problems
        cache = {k: annotate_owner(o, engines, proc) for k, o in cache.items()}
    entries = tuple(replace(e, owners=tuple(cache[(o.pid, o.fd)] for o in e.owners)) for e in table.entries)
    return replace(table, entries=entries, warnings=(*table.warnings, *problems))
