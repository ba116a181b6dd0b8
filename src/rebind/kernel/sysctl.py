"""Kernel settings that change bind() outcomes, read from /proc/sys of this netns."""

from __future__ import annotations

import os
import platform
from ipaddress import IPv4Address, IPv6Address, ip_address

from rebind.model.conflict import KernelSettings


def _read(path: str, root: str = "/proc") -> str | None:
    try:
        with open(f"{root}/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return None


def _int(path: str, default: int, root: str = "/proc") -> int:
    v = _read(path, root)
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def _ports(text: str | None) -> frozenset[int]:
    """Parse ip_local_reserved_ports syntax: "8080,9000-9010"."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def kernel_version() -> tuple[int, int]:
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


def kernel_settings() -> KernelSettings:
    lo, _, hi = (_read("net/ipv4/ip_local_port_range") or "32768 60999").partition("\t")
    rng = (int(lo), int(hi.strip() or 60999)) if lo.strip().isdigit() else (32768, 60999)
    return KernelSettings(
        unprivileged_port_start=_int("net/ipv4/ip_unprivileged_port_start", 1024),
        bindv6only=_int("net/ipv6/bindv6only", 0) == 1,
        cap_net_bind_service=has_cap(CAP_NET_BIND_SERVICE),
        local_addresses=local_addresses(),
        ip_nonlocal_bind=_int("net/ipv4/ip_nonlocal_bind", 0) == 1,
        ipv6_nonlocal_bind=_int("net/ipv6/ip_nonlocal_bind", 0) == 1,
        ip_local_port_range=rng,
        ip_local_reserved_ports=_ports(_read("net/ipv4/ip_local_reserved_ports")),
        kernel_version=kernel_version(),
        broadcast_addresses=broadcast_addresses(),
        udp_first_match=_calibrated_udp_rule(),
    )


def _calibrated_udp_rule() -> bool | None:
    """kernel/calibrate.py: this build's UDP rule (cached per build; None when unknown)."""
    from rebind.kernel.calibrate import calibration

    return calibration().udp_first_match


# ---------------------------------------------------------------------------------------------
# The client side (docs/connect-rules.md): all per network namespace.


def local_port_range(root: str = "/proc") -> tuple[int, int]:
    """net.ipv4.ip_local_port_range (tab-separated in /proc: see parse_port_range)."""
    from rebind.model.ephemeral import parse_port_range

    return parse_port_range(_read("net/ipv4/ip_local_port_range", root))


def reserved_ports(root: str = "/proc") -> frozenset[int]:
    """net.ipv4.ip_local_reserved_ports ("8080,9000-9010"; empty when none)."""
    from rebind.model.ephemeral import parse_reserved

    return parse_reserved(_read("net/ipv4/ip_local_reserved_ports", root))


def unprivileged_port_start(root: str = "/proc") -> int:
    return _int("net/ipv4/ip_unprivileged_port_start", 1024, root)


def tcp_tw_reuse(root: str = "/proc") -> int:
    """0 off, 1 on, 2 loopback only (the default since 2018, 79e9fed46038)."""
    return _int("net/ipv4/tcp_tw_reuse", 2, root)


def tcp_tw_reuse_delay_ms(root: str = "/proc") -> int:
    """net.ipv4.tcp_tw_reuse_delay (6.14+, ms); older kernels use a fixed ~1 s."""
    return _int("net/ipv4/tcp_tw_reuse_delay", 1000, root)


def tcp_timestamps(root: str = "/proc") -> int:
    return _int("net/ipv4/tcp_timestamps", 1, root)


def ip_autobind_reuse(root: str = "/proc") -> bool:
    return _int("net/ipv4/ip_autobind_reuse", 0, root) == 1
