"""Checks that no socket causes: __inet_bind / __inet6_bind before get_port. EACCES (a port
below ip_unprivileged_port_start without CAP_NET_BIND_SERVICE), EADDRNOTAVAIL (not an address
of this netns, or a tentative IPv6 one), EINVAL (v4-mapped on v6only, multicast TCP, scope)."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv6Address

from rebind.model.conflict.inputs import AddrFlag, AddrState, Holder, KernelSettings
from rebind.model.conflict.outcome import Blocker, Outcome, Rule, Stage, Verdict
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State
from rebind.model.request import BindRequest

# A placeholder holder for errors that no socket causes (EACCES, EADDRNOTAVAIL, EINVAL).
_NO_SOCKET = SocketRecord(
    Proto.TCP,
    Family.INET,
    State.CLOSE,
    Endpoint(IPv4Address(0), 0),
    Endpoint(IPv4Address(0), 0),
    None,
    None,
)


def _plain(rule: Rule, text: str) -> Blocker:
    return Blocker(Holder(_NO_SOCKET), Stage.BIND, rule, True, text)


def _address_error(req: BindRequest, settings: KernelSettings) -> Blocker | None:
    """EADDRNOTAVAIL: inet_addr_valid_or_nonlocal (IPv4, v4-mapped) / ipv6_chk_addr (IPv6)."""
    if settings.local_addresses is None or req.freebind:
        return None
    a = req.addr
    v4 = a if isinstance(a, IPv4Address) else a.ipv4_mapped
    if v4 is not None:
        # RTN_LOCAL (all of 127/8: N5), RTN_MULTICAST, RTN_BROADCAST (0.0.0.0, 255.255.255.255).
        if settings.ip_nonlocal_bind or v4.is_unspecified or v4.is_loopback or v4.is_multicast:
            return None
        if v4 in settings.local_addresses or v4 == IPv4Address("255.255.255.255"):
            return None
        # A subnet broadcast (10.9.0.255 beside 10.9.0.1/24) is RTN_BROADCAST in the local
        # table: inet_addr_valid_or_nonlocal accepts it like a local address.
        if settings.broadcast_addresses is not None and v4 in settings.broadcast_addresses:
            return None
    elif settings.ipv6_nonlocal_bind or a.is_unspecified or a.is_multicast:
        return None
    elif settings.ipv6_addresses is not None:
        return _ipv6_address_error(req, IPv6Address(a), settings.ipv6_addresses)
    elif a in settings.local_addresses:
        return None
    return _plain(Rule.ADDRESS_NOT_LOCAL, f"{a} is not an address of this host (network namespace)")


def _ipv6_address_error(req: BindRequest, a: IPv6Address, states: tuple[AddrState, ...]) -> Blocker | None:
    """ipv6_chk_addr(net, addr, dev, 0): a link-local address must be on the bound device; a
    tentative one (DAD running, or failed: IFA_F_DADFAILED keeps IFA_F_TENTATIVE) is refused."""
    scoped = a.is_link_local
    found = [s for s in states if s.addr == a and (not scoped or s.ifindex == req.ifindex)]
    if any(s.usable for s in found):
        return None
    if not found:
        on = " on that interface" if scoped else ""
        return _plain(Rule.ADDRESS_NOT_LOCAL, f"{a} is not an address of this host{on} (network namespace)")
    s = found[0]
    dev = f" on {s.ifname}" if s.ifname else ""
    if s.flags & AddrFlag.DADFAILED:
        why = "failed duplicate address detection (IFA_F_DADFAILED): another host on the link uses it"
    else:
        why = (
            "is tentative: duplicate address detection is still running (IFA_F_TENTATIVE); "
            "bind() works once it ends (net.ipv6.conf.IFACE.dad_transmits probes, about 1 s each, "
            "once the link has carrier)"
        )
    return _plain(Rule.ADDRESS_TENTATIVE, f"{a}{dev} {why}")


def _privilege_error(req: BindRequest, settings: KernelSettings) -> Blocker | None:
    """EACCES: inet_port_requires_bind_service() without CAP_NET_BIND_SERVICE (ns_capable)."""
    if 0 < req.port < settings.unprivileged_port_start and not settings.cap_net_bind_service:
        return _plain(
            Rule.PRIVILEGED_PORT,
            f"ports below {settings.unprivileged_port_start} (net.ipv4.ip_unprivileged_port_start) "
            "need CAP_NET_BIND_SERVICE",
        )
    return None


def _v6_invalid(req: BindRequest, settings: KernelSettings, early: bool) -> Blocker | None:
    """__inet6_bind EINVAL: multicast on TCP (early); v4-mapped on v6only, scope without device."""
    a = req.addr
    if not isinstance(a, IPv6Address):
        return None
    if early:
        if a.is_multicast and req.proto is Proto.TCP:
            return _plain(Rule.INVALID_ADDRESS, f"{a} is a multicast address; TCP cannot bind it")
        return None
    mapped = a.ipv4_mapped is not None
    if mapped and (req.v6only if req.v6only is not None else settings.bindv6only):
        return _plain(Rule.INVALID_ADDRESS, f"{a} is v4-mapped but the socket is IPV6_V6ONLY")
    if a.is_link_local and not req.ifindex:
        return _plain(Rule.INVALID_ADDRESS, f"{a} is link-local: it needs a scope id or a bound device")
    return None


def pre_checks(req: BindRequest, settings: KernelSettings) -> Outcome | None:
    """The kernel's order (bind-rules §3): IPv4 address, privilege; IPv6 privilege, address."""
    if req.addr.version == 4:
        steps = [
            (_address_error(req, settings), errno.EADDRNOTAVAIL),
            (_privilege_error(req, settings), errno.EACCES),
        ]
    else:
        steps = [
            (_v6_invalid(req, settings, early=True), errno.EINVAL),
            (_privilege_error(req, settings), errno.EACCES),
            (_v6_invalid(req, settings, early=False), errno.EINVAL),
            (_address_error(req, settings), errno.EADDRNOTAVAIL),
        ]
    for b, err in steps:
        if b is not None:
            return Outcome(Verdict.FAIL, err, Stage.BIND, (b,))
    return None
