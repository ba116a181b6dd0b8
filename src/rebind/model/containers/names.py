"""What a container is called, and the command that stops it: the engines, a container
reference, and the only shapes of engine-supplied text rebind accepts (a 64-hex id, a container
name, a login name, an IP address, a port number); anything else is dropped, never echoed raw.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

IPAddress = IPv4Address | IPv6Address

#: A full container id, as the engines name it.
HEX64 = re.compile(r"[0-9a-f]{64}")
#: A container name as the engines accept it (docker's and podman's ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``),
#: and the only shape of engine-supplied name rebind shows or puts in a command: every other
#: string (from an engine's API, a state file or a command line) is dropped.
NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: A login name as useradd accepts it (Debian's default NAME_REGEX, without the trailing "$").
_USER_OK = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def valid_name(name: object) -> bool:
    """Is this an engine-supplied container name rebind may show and quote into a command?"""
    return isinstance(name, str) and NAME_OK.fullmatch(name) is not None


def valid_id(cid: object) -> bool:
    """A full container id: exactly 64 lowercase hex digits."""
    return isinstance(cid, str) and HEX64.fullmatch(cid) is not None


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


def ip_or_none(text: str | None) -> IPAddress | None:
    """An address from a command line or a NAT rule, or None unless it is exactly one."""
    try:
        return ip_address(text) if text else None
    except ValueError:
        return None


def port_or_none(text: str | None) -> int | None:
    """A port number (1-65535, ASCII digits only) from another process's text, else None."""
    if text and text.isascii() and text.isdigit() and 0 < int(text) <= 65535:
        return int(text)
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
