"""The scrape's facts of the host, not of a socket table: the ephemeral range and the bind
settings (sysctls, kernel version, this build's calibrated UDP rule), and a live socket's
flags read through its owner (exporter/gather.py asks each)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from rebind.exporter.facts import EphemeralRange
from rebind.kernel.sysctl import HostSettings, host_settings
from rebind.model.conflict import KernelSettings, SockOpts
from rebind.model.records import SocketRecord


def read_ephemeral(host: HostSettings | None = None) -> EphemeralRange | None:
    """The ephemeral range and its reservations (kernel/sysctl.py); None when unreadable."""
    h = host or host_settings()
    if h.port_range is None or h.reserved_ports is None:
        return None
    return EphemeralRange(*h.port_range, h.reserved_ports)


def read_settings(rng: EphemeralRange | None, host: HostSettings | None = None) -> KernelSettings:
    """The bind settings a scrape needs: no capabilities or addresses; this build's calibrated
    UDP rule (as `why` has it)."""
    from rebind.kernel.sysctl import kernel_version

    h = host or host_settings()
    base = KernelSettings(
        unprivileged_port_start=h.unprivileged_port_start,
        bindv6only=h.bindv6only,
        kernel_version=kernel_version(),
        udp_first_match=_udp_rule(),
    )
    if rng is None:
        return base
    return replace(base, ip_local_port_range=(rng.lo, rng.hi), ip_local_reserved_ports=rng.reserved)


def _udp_rule() -> bool | None:
    """This build's UDP rule, as `why` has it (kernel/calibrate.py: cached per build, run once
    in a throwaway network namespace; None when it cannot run). Memoized by calibration()."""
    from rebind.kernel.calibrate import calibration

    return calibration().udp_first_match


#: Reads a live socket's (SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY); None when not permitted.
FlagReader = Callable[[SocketRecord], SockOpts | None]


def read_socket_flags(r: SocketRecord) -> SockOpts | None:
    """The flags of one live socket, through its owner (an owner scan for this one inode, then
    pidfd_getfd + getsockopt). None when no owner is visible or access is denied (unprivileged)."""
    from rebind.errors import RebindError
    from rebind.kernel.owners import find_owners
    from rebind.kernel.pidfd import socket_flags

    if not r.inode:
        return None
    try:
        owners, _report = find_owners([r])
        for o in owners.get(r.inode, ()):
            got = socket_flags(o.pid, o.fd, o.start_ticks)
            if got is not None:
                return SockOpts(*got)
    except (OSError, RebindError):
        return None
    return None
