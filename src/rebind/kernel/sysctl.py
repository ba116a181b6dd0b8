"""The host settings of this network namespace: the one sysctl reader (/proc/sys), and the
bind(), connect() and ephemeral-range settings projected from what it reads.

``host_settings(root)`` reads every sysctl rebind's models use, once, into a frozen
:class:`HostSettings`; ``kernel_settings()`` (bind: model/conflict/),
``kernel/connect_facts.connect_settings()`` (connect: model/connect/facts.py) and the exporter's
``read_ephemeral``/``read_settings`` are projections of it. The text formats are parsed in one
place each (model/ephemeral.py: the port range and the reserved-ports list).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING

from rebind.model.ephemeral import DEFAULT_RANGE, parse_reserved, read_port_range

if TYPE_CHECKING:
    from rebind.model.conflict import KernelSettings


def read(path: str, root: str = "/proc") -> str | None:
    """One sysctl's text (``net/ipv4/tcp_tw_reuse``), stripped; None when it cannot be read
    (absent on this kernel, or no /proc)."""
    try:
        with open(f"{root}/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return None


def read_int(path: str, root: str = "/proc") -> int | None:
    """One integer sysctl; None when it cannot be read or is not an integer."""
    v = read(path, root)
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _int(path: str, default: int, root: str = "/proc") -> int:
    v = read_int(path, root)
    return default if v is None else v


@dataclass(frozen=True, slots=True)
class HostSettings:
    """What this namespace's sysctls say (read once); the defaults stand for an unreadable one.

    ``port_range`` and ``reserved_ports`` are None when unreadable: the exporter reports that
    rather than assume the default; the models take :data:`DEFAULT_RANGE` and no reservations.
    """

    port_range: tuple[int, int] | None
    reserved_ports: frozenset[int] | None
    unprivileged_port_start: int = 1024
    bindv6only: bool = False
    ip_nonlocal_bind: bool = False
    ipv6_nonlocal_bind: bool = False
    #: 0 off, 1 on, 2 loopback only (the default since 2018, 79e9fed46038).
    tcp_tw_reuse: int = 2
    #: net.ipv4.tcp_tw_reuse_delay (6.14+, ms); older kernels use a fixed ~1 s.
    tcp_tw_reuse_delay_ms: int = 1000
    tcp_timestamps: int = 1
    ip_autobind_reuse: bool = False

    @property
    def range_or_default(self) -> tuple[int, int]:
        return self.port_range or DEFAULT_RANGE

    @property
    def reserved_or_none(self) -> frozenset[int]:
        return self.reserved_ports or frozenset()


def host_settings(root: str = "/proc") -> HostSettings:
    """The one reader: every sysctl the bind, connect and ephemeral models use."""
    reserved = read("net/ipv4/ip_local_reserved_ports", root)
    return HostSettings(
        port_range=read_port_range(read("net/ipv4/ip_local_port_range", root)),
        reserved_ports=None if reserved is None else parse_reserved(reserved),
        unprivileged_port_start=_int("net/ipv4/ip_unprivileged_port_start", 1024, root),
        bindv6only=_int("net/ipv6/bindv6only", 0, root) == 1,
        ip_nonlocal_bind=_int("net/ipv4/ip_nonlocal_bind", 0, root) == 1,
        ipv6_nonlocal_bind=_int("net/ipv6/ip_nonlocal_bind", 0, root) == 1,
        tcp_tw_reuse=_int("net/ipv4/tcp_tw_reuse", 2, root),
        tcp_tw_reuse_delay_ms=_int("net/ipv4/tcp_tw_reuse_delay", 1000, root),
        tcp_timestamps=_int("net/ipv4/tcp_timestamps", 1, root),
        ip_autobind_reuse=_int("net/ipv4/ip_autobind_reuse", 0, root) == 1,
    )


def kernel_version() -> tuple[int, int]:
    import platform  # lazily: `ls` imports this module for one sysctl read

    rel = platform.release().split(".")
    try:
        return int(rel[0]), int("".join(ch for ch in rel[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def has_cap(cap: int) -> bool:
    """Is capability ``cap`` in this process's effective set (/proc/self/status CapEff)?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0


CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12


def local_addresses() -> frozenset[IPv4Address | IPv6Address]:
    """Addresses configured in this netns (any 127/8 address counts as local: bind-rules N5)."""
    out: set[IPv4Address | IPv6Address] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                h = line.split()[0]
                out.add(ip_address(":".join(h[i : i + 4] for i in range(0, 32, 4))))
    except OSError:
        pass
    out.update(_ipv4_addresses())
    return frozenset(out)


def _ipv4_addresses(kind: str = "LOCAL") -> set[IPv4Address | IPv6Address]:
    """IPv4 addresses via /proc/net/fib_trie's ``/32 ... LOCAL`` (or BROADCAST) entries (no
    netlink route code needed)."""
    out: set[IPv4Address | IPv6Address] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    last = None
    want = "/32 host LOCAL" if kind == "LOCAL" else f"/32 link {kind}"
    for line in lines:
        s = line.strip()
        if s.startswith(("|--", "+--")):
            last = s[3:].split()[0]
        elif want in s and last:
            try:
                out.add(ip_address(last))
            except ValueError:
                pass
    return out


def broadcast_addresses() -> frozenset[IPv4Address]:
    """RTN_BROADCAST addresses of this netns (subnet broadcasts): bind() accepts them."""
    return frozenset(a for a in _ipv4_addresses("BROADCAST") if isinstance(a, IPv4Address))


def kernel_settings(host: HostSettings | None = None) -> KernelSettings:
    """The bind() settings (model/conflict/) of this namespace: projected from the host
    settings, plus capabilities, local addresses and the calibrated UDP rule."""
    from rebind.model.conflict import KernelSettings

    h = host or host_settings()
    return KernelSettings(
        unprivileged_port_start=h.unprivileged_port_start,
        bindv6only=h.bindv6only,
        cap_net_bind_service=has_cap(CAP_NET_BIND_SERVICE),
        local_addresses=local_addresses(),
        ip_nonlocal_bind=h.ip_nonlocal_bind,
        ipv6_nonlocal_bind=h.ipv6_nonlocal_bind,
        ip_local_port_range=h.range_or_default,
        ip_local_reserved_ports=h.reserved_or_none,
        kernel_version=kernel_version(),
        broadcast_addresses=broadcast_addresses(),
        udp_first_match=_calibrated_udp_rule(),
    )


def _calibrated_udp_rule() -> bool | None:
    """kernel/calibrate.py: this build's UDP rule (cached per build; None when unknown)."""
    from rebind.kernel.calibrate import calibration

    return calibration().udp_first_match
