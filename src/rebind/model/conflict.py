"""The Linux bind()/listen() conflict model (pure). Spec: ../shared/docs/bind-rules.md.

INTERFACE SKELETON -- the types below are the contract other layers use; `evaluate` is being
implemented (see the issue for `rebind why`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rebind.model.records import IPAddress, Proto, SocketRecord


@dataclass(frozen=True, slots=True)
class SockOpts:
    """SO_REUSEADDR / SO_REUSEPORT of an existing socket; None = unknown (inet_diag hides them)."""

    reuseaddr: bool | None = None
    reuseport: bool | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """An existing socket on the port, with whatever is known of its flags."""

    socket: SocketRecord
    opts: SockOpts = SockOpts()


@dataclass(frozen=True, slots=True)
class BindRequest:
    proto: Proto
    addr: IPAddress
    port: int
    reuseaddr: bool = False
    reuseport: bool = False
    #: None: the sysctl default (net.ipv6.bindv6only); ignored for IPv4.
    v6only: bool | None = None
    ifindex: int = 0
    #: The socket's uid (sk_uid, fixed at socket() time): what the SO_REUSEPORT check compares.
    uid: int = 0
    #: TCP: whether listen() will follow (the kernel checks conflicts again there).
    listen: bool = True
    freebind: bool = False


@dataclass(frozen=True, slots=True)
class KernelSettings:
    unprivileged_port_start: int = 1024
    bindv6only: bool = False
    cap_net_bind_service: bool = True
    #: Addresses configured on this host (netns); None = unknown, skip the EADDRNOTAVAIL check.
    local_addresses: frozenset[IPAddress] | None = None
    ip_nonlocal_bind: bool = False
    ipv6_nonlocal_bind: bool = False
    ip_local_port_range: tuple[int, int] = (32768, 60999)
    ip_local_reserved_ports: frozenset[int] = field(default_factory=frozenset)
    kernel_version: tuple[int, int] = (6, 18)


class Stage(enum.StrEnum):
    BIND = "bind"
    LISTEN = "listen"


class Verdict(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    #: Depends on a flag nobody could read (Holder.opts has None); both outcomes are reported.
    DEPENDS = "depends"
