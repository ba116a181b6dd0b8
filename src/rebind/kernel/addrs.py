"""IPv6 addresses of this network namespace with their interface and DAD flags.

/proc/net/if_inet6 (net/ipv6/addrconf.c, if6_seq_show) prints one line per address:
``ADDR32HEX IFINDEX PREFIXLEN SCOPE FLAGS IFNAME``, all hex, FLAGS as ``(u8) ifp->flags`` --
the low byte holds every flag bind() cares about (IFA_F_TENTATIVE 0x40, IFA_F_DADFAILED 0x08,
IFA_F_OPTIMISTIC 0x04), so no RTM_GETADDR dump is needed.
"""

from __future__ import annotations

import socket
from ipaddress import IPv6Address

from rebind.model.conflict import AddrFlag, AddrState


def parse_if_inet6(text: str) -> tuple[AddrState, ...]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or len(parts[0]) != 32:
            continue  # a malformed line is skipped, never guessed
        try:
            addr = IPv6Address(int(parts[0], 16))
            out.append(AddrState(addr, int(parts[1], 16), AddrFlag(int(parts[4], 16) & 0xFF), parts[5]))
        except ValueError:
            continue
    return tuple(out)


def ipv6_addresses(root: str = "/proc") -> tuple[AddrState, ...] | None:
    """None when IPv6 is off or /proc/net/if_inet6 is unreadable (the model then skips the check)."""
    try:
        with open(f"{root}/net/if_inet6") as f:
            return parse_if_inet6(f.read())
    except OSError:
        return None


def ifindex_of(name: str) -> int | None:
    """An interface name (or decimal index) in this netns to its ifindex; None if absent."""
    if name.isascii() and name.isdigit():
        index = int(name)
        try:
            socket.if_indextoname(index)
        except (OSError, OverflowError):
            return None
        return index
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None
