"""Which container or systemd unit a process belongs to, which port-holding proxy it is, and which
NAT rule captures a port: pure parsing of what the kernel and the engines leave in plain text.

Everything parsed here is written by another process (``/proc/PID/cgroup`` is the kernel's, but
command lines and rule comments are not): identifiers are accepted only in their exact shape (a
64-hex container id, an IP address, a port number); anything else is dropped, never echoed raw.

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

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address

_HEX64 = re.compile(r"[0-9a-f]{64}")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# A container scope or directory: an optional runtime prefix, the 64-hex id, an optional ".scope".
_SCOPE = re.compile(r"(?:(docker|libpod|cri-containerd|crio|containerd)-)?([0-9a-f]{64})(?:\.scope)?")
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".slice")
#: A container name as the engines accept it (docker's and podman's ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``),
#: and the only shape of engine-supplied name rebind shows or puts in a command: every other
#: string (from an engine's API, a state file or a command line) is dropped.
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: A login name as useradd accepts it (Debian's default NAME_REGEX, without the trailing "$").
_USER_OK = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def valid_name(name: object) -> bool:
    """Is this an engine-supplied container name rebind may show and quote into a command?"""
    return isinstance(name, str) and _NAME_OK.fullmatch(name) is not None


def valid_id(cid: object) -> bool:
    """A full container id: exactly 64 lowercase hex digits."""
    return isinstance(cid, str) and _HEX64.fullmatch(cid) is not None


def valid_user(user: object) -> bool:
    return isinstance(user, str) and _USER_OK.fullmatch(user) is not None


class Engine(enum.StrEnum):
    DOCKER = "docker"
    PODMAN = "podman"
    CONTAINERD = "containerd"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """A container, as ``{"engine", "id", "name"}`` in JSON (``rebind.ls/1`` owners)."""

    engine: Engine
    #: The full id (64 hex) when known; for a Kubernetes pod without a container id, ``pod<uid>``.
    id: str
    name: str | None = None
    #: A rootless container's user (its engine runs as that user, not root); None for root's.
    user: str | None = None

    @property
    def label(self) -> str:
        """What a table shows: the name, else the short id (12 hex, as ``docker ps`` shows it)."""
        return self.name or self.id[:12]

    def with_name(self, name: str | None) -> ContainerRef:
        return self if not valid_name(name) else ContainerRef(self.engine, self.id, name, self.user)


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
        if units and _NAME_OK.fullmatch(units[-1].replace("@", "-").replace("\\", "-")):
            return units[-1]
    return None


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


def _ip(text: str | None) -> IPAddress | None:
    try:
        return ip_address(text) if text else None
    except ValueError:
        return None


def _port(text: str | None) -> int | None:
    if text and text.isascii() and text.isdigit() and 0 < int(text) <= 65535:
        return int(text)
    return None


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
            container_ip=_ip(a.get("container-ip")),
            container_port=_port(a.get("container-port")),
            host_port=_port(a.get("host-port")),
            proto=a.get("proto") if a.get("proto") in ("tcp", "udp", "sctp") else None,
        )
    if prog == "conmon":
        a = _args(cmdline)
        cid = a.get("c") or a.get("cid")
        name = a.get("n") or a.get("name")
        return ProxyInfo(
            ProxyKind.CONMON,
            Engine.PODMAN,
            container_id=cid if cid and _HEX64.fullmatch(cid) else None,
            container_name=name if name and _NAME_OK.fullmatch(name) else None,
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


def stop_command(ref: ContainerRef) -> str:
    """The command line that stops what really serves (never "kill the proxy"), safe to paste.

    Built only from validated pieces, each ``shlex.quote``d: a name that is not a valid container
    name (an engine's answer is another process's text) is replaced by the id, and an id that is
    not 64 hex by nothing (then the line only lists the engine's containers). A rootless
    container is stopped by its own user's engine (``su - USER -c 'podman stop NAME'``): root's
    ``podman stop NAME`` would act on root's containers, which may have the same name.
    """
    import shlex  # not at import time: records.py imports this module on every start

    q = shlex.quote
    if ref.engine is Engine.KUBERNETES:
        # kubelet restarts whatever is stopped by hand: the workload is what to change.
        return "crictl ps   # then delete the pod or scale the workload that runs this container"
    target = ref.name if valid_name(ref.name) else (ref.id[:12] if valid_id(ref.id) else None)
    if ref.engine is Engine.CONTAINERD:
        return f"ctr -n k8s.io task kill {q(target)}" if target else "ctr -n k8s.io task ls"
    tool = "podman" if ref.engine is Engine.PODMAN else "docker"
    words = [tool, "stop", target] if target else [tool, "ps"]
    line = " ".join(q(w) for w in words)
    if ref.user is None:
        return line
    if not valid_user(ref.user):
        return f"{tool} ps   # the container belongs to another user: run this as that user"
    return f"su - {q(ref.user)} -c {q(line)}"


# ------------------------------------------------------------------- an engine's API answer
#
# Docker's API socket answers HTTP; the answer is another process's bytes, read as root. Before
# json.loads sees it, it is bounded in size (by the reader), checked for its status, and checked
# for its nesting depth: json.loads recurses once per level, and "[" * 200000 raised
# RecursionError out of `rebind ls` (exit 70).

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_nesting_problem(text: bytes, limit: int) -> str | None:
    """Why a JSON text must not reach json.loads ("deeper than LIMIT levels", "unbalanced"), or
    None. Linear passes in C: strings are blanked, everything but brackets dropped, then the
    innermost pairs removed once per level."""
    brackets = _JSON_STRING.sub(b'""', text).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return None
        brackets, n = _INNERMOST.subn(b"", brackets)
        if n == 0:
            return "with unbalanced brackets"  # json.loads would fail (or first recurse) on it
    return f"nested deeper than {limit} levels" if brackets else None


def json_depth_within(text: bytes, limit: int) -> bool:
    """Do the brackets of a JSON text balance and nest at most ``limit`` deep?"""
    return json_nesting_problem(text, limit) is None


def _headers(raw: bytes) -> tuple[int, dict[bytes, bytes], int] | None:
    """(status, lower-cased headers, offset of the body) of an HTTP/1.x answer, or None."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        key, colon, value = line.partition(b":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers, len(head) + len(sep)


def content_end(raw: bytes) -> int | None:
    """Where an answer ends by its Content-Length (None: it ends when the server closes)."""
    h = _headers(raw)
    if h is None or b"chunked" in h[1].get(b"transfer-encoding", b"").lower():
        return None
    length = h[1].get(b"content-length", b"")
    return h[2] + int(length) if length.isdigit() and len(length) < 12 else None


def _dechunk(body: bytes) -> bytes | None:
    out = bytearray()
    at = 0
    while True:
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = body[at:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return None
        if size == 0:
            return bytes(out)
        start = line_end + 2
        if size < 0 or start + size > len(body):
            return None
        out += body[start : start + size]
        at = start + size + 2


def parse_api_answer(raw: bytes, max_depth: int) -> list[object] | str:
    """The JSON list an engine answered, or why it is not believed (one short line)."""
    import json

    h = _headers(raw)
    if h is None:
        return "answered no HTTP"
    status, headers, at = h
    if status != 200:
        return f"answered HTTP {status}"
    body: bytes | None = raw[at:]
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = _dechunk(raw[at:])
    else:
        end = content_end(raw)
        if end is not None:
            body = raw[at:end] if len(raw) >= end else None
    if body is None:
        return "answered an incomplete body"
    problem = json_nesting_problem(body, max_depth)
    if problem is not None:
        return f"answered JSON {problem}"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return "answered no valid JSON"
    return doc if isinstance(doc, list) else "answered JSON that is not a list"


# ----------------------------------------------------------------------------- NAT captures


class NatChain(enum.StrEnum):
    """The chains the engines publish ports through (iptables-nft names)."""

    DOCKER = "DOCKER"
    NETAVARK = "NETAVARK-HOSTPORT-DNAT"
    CNI = "CNI-HOSTPORT-DNAT"
    KUBE_NODEPORTS = "KUBE-NODEPORTS"


_ENGINE_OF_CHAIN = {
    NatChain.DOCKER: Engine.DOCKER,
    NatChain.NETAVARK: Engine.PODMAN,
    NatChain.CNI: Engine.PODMAN,
    NatChain.KUBE_NODEPORTS: Engine.KUBERNETES,
}


@dataclass(frozen=True, slots=True)
class NatCapture:
    """A DNAT rule that sends traffic for a local port somewhere else."""

    chain: NatChain
    proto: str
    port: int
    engine: Engine
    #: Where the traffic goes (None when the rule jumps into per-service chains we did not follow).
    to_addr: IPAddress | None = None
    to_port: int | None = None
    #: The destination the rule matches (-d), None for any.
    match_addr: str | None = None
    #: The rule's comment, visible-escaped by the renderer (podman puts the container id there,
    #: kube-proxy the ``namespace/service:port``).
    comment: str | None = None

    @property
    def container_id(self) -> str | None:
        m = re.search(r"id: ([0-9a-f]{64})", self.comment or "")
        return m.group(1) if m else None

    @property
    def destination(self) -> str:
        if self.to_addr is None:
            return self.comment or self.chain.value
        host = f"[{self.to_addr}]" if self.to_addr.version == 6 else str(self.to_addr)
        return f"{host}:{self.to_port}" if self.to_port else host


@dataclass(frozen=True, slots=True)
class _Rule:
    chain: str
    proto: str | None
    dports: tuple[tuple[int, int], ...]
    dest: str | None
    comment: str | None
    jump: str | None
    to: str | None


def _dport_ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a, b = _port(lo), _port(hi) if hi else _port(lo)
        if a is not None and b is not None and a <= b:
            out.append((a, b))
    return tuple(out)


def _parse_rule(line: str) -> _Rule | None:
    import shlex  # only when NAT rules are read: records.py imports this module on every start

    try:
        words = shlex.split(line)
    except ValueError:
        return None
    if len(words) < 2 or words[0] != "-A":
        return None
    chain = words[1]
    proto: str | None = None
    dports: tuple[tuple[int, int], ...] = ()
    dest = comment = jump = to = None
    i = 2
    while i < len(words) - 1:
        w, v = words[i], words[i + 1]
        if w == "-p":
            proto = v
        elif w in ("--dport", "--dports", "--destination-port", "--destination-ports"):
            dports = _dport_ranges(v)
        elif w == "-d":
            dest = v
        elif w == "--comment":
            comment = v
        elif w == "-j":
            jump = v
        elif w == "--to-destination":
            to = v
        else:
            i += 1
            continue
        i += 2
    return _Rule(chain, proto, dports, dest, comment, jump, to)


def _split_to(to: str) -> tuple[IPAddress | None, int | None]:
    """``10.88.0.17:80``, ``[fd00::2]:80``, ``10.0.0.1`` or ``10.0.0.1:80-90`` (first port)."""
    if to.startswith("["):
        host, _, rest = to[1:].partition("]")
        port = rest.lstrip(":").split("-")[0]
    elif to.count(":") == 1:
        host, _, port = to.partition(":")
        port = port.split("-")[0]
    else:
        host, port = to, ""
    return _ip(host), _port(port)


def _matches_addr(dest: str | None, addr: IPAddress | None) -> bool:
    if dest is None or addr is None:
        return True
    try:
        net = ip_network(dest.lstrip("!").strip(), strict=False)
    except ValueError:
        return True
    return addr in net if net.version == addr.version else False


def _follow(rules: dict[str, list[_Rule]], chain: str, depth: int = 0) -> tuple[IPAddress | None, int | None]:
    """The DNAT destination reached from a per-service chain (NETAVARK-DN-…, KUBE-EXT-…)."""
    if depth > 4:  # kube-proxy nests KUBE-EXT -> KUBE-SVC -> KUBE-SEP; never loop on a hostile file
        return None, None
    for r in rules.get(chain, []):
        if r.jump == "DNAT" and r.to:
            return _split_to(r.to)
        if r.jump and r.jump.startswith(("NETAVARK-", "KUBE-", "CNI-", "DOCKER")):
            found = _follow(rules, r.jump, depth + 1)
            if found[0] is not None:
                return found
    return None, None


def nat_captures(
    iptables_save: str, port: int, proto: str = "tcp", addr: IPAddress | None = None
) -> tuple[NatCapture, ...]:
    """Rules of ``iptables-save -t nat`` output (iptables-nft included) that capture ``port``."""
    rules: dict[str, list[_Rule]] = {}
    for line in iptables_save.splitlines():
        rule = _parse_rule(line.strip())
        if rule is not None:
            rules.setdefault(rule.chain, []).append(rule)
    found: list[NatCapture] = []
    for chain in NatChain:
        for r in rules.get(chain.value, []):
            if r.proto not in (None, proto) or not any(a <= port <= b for a, b in r.dports):
                continue
            if not _matches_addr(r.dest, addr):
                continue
            if r.jump == "DNAT" and r.to:
                to_addr, to_port = _split_to(r.to)
            elif r.jump and r.jump not in ("RETURN", "ACCEPT"):
                to_addr, to_port = _follow(rules, r.jump)
            else:
                continue
            found.append(
                NatCapture(chain, proto, port, _ENGINE_OF_CHAIN[chain], to_addr, to_port, r.dest, r.comment)
            )
    return tuple(found)


def proxies_by_ip(captures: Iterable[NatCapture]) -> dict[IPAddress, NatCapture]:
    return {c.to_addr: c for c in captures if c.to_addr is not None}
