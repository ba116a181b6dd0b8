"""Which NAT rule captures a port: ``iptables-save -t nat`` output (iptables-nft included),
followed through the engines' per-service chains.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_network

from rebind.model.containers.names import Engine, IPAddress, ip_or_none, port_or_none


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
        a, b = port_or_none(lo), port_or_none(hi) if hi else port_or_none(lo)
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
    return ip_or_none(host), port_or_none(port)


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
