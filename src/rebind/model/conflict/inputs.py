"""What the conflict model is given: the sockets on the port, the kernel's settings, and the
port's own state (the TCP bind bucket's fast-reuse fields, the UDP chain order).

None anywhere here means "nobody could read it": the rules then answer DEPENDS where it decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import IPAddress, SocketRecord, State


@dataclass(frozen=True, slots=True)
class SockOpts:
    """SO_REUSEADDR / SO_REUSEPORT of an existing socket; None = unknown (inet_diag hides them)."""

    reuseaddr: bool | None = None
    reuseport: bool | None = None
    #: IPV6_V6ONLY when the record lacks it (inet_diag reports it for LISTEN/CLOSE only): a
    #: child of a dual-stack [::] listener keeps ipv6only=0 on its specific address.
    v6only: bool | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """An existing socket on the port, with whatever is known of its flags."""

    socket: SocketRecord
    opts: SockOpts = SockOpts()


class AddrFlag(enum.IntFlag):
    """IFA_F_* of an IPv6 address (include/uapi/linux/if_addr.h; /proc/net/if_inet6 shows the low 8)."""

    TEMPORARY = 0x01
    NODAD = 0x02
    OPTIMISTIC = 0x04
    DADFAILED = 0x08
    HOMEADDRESS = 0x10
    DEPRECATED = 0x20
    TENTATIVE = 0x40
    PERMANENT = 0x80


@dataclass(frozen=True, slots=True)
class AddrState:
    """One IPv6 address configured in this netns, on one interface, with its flags."""

    addr: IPv6Address
    ifindex: int
    flags: AddrFlag = AddrFlag.PERMANENT
    ifname: str = ""

    @property
    def usable(self) -> bool:
        """ipv6_chk_addr() bans IFA_F_TENTATIVE unless IFA_F_OPTIMISTIC (optimistic DAD)."""
        return not (self.flags & AddrFlag.TENTATIVE) or bool(self.flags & AddrFlag.OPTIMISTIC)


@dataclass(frozen=True, slots=True)
class KernelSettings:
    """The host's settings the bind rules depend on (sysctls, capabilities, addresses)."""

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
    #: IPv6 addresses with their interface and DAD state; None = unknown (use local_addresses).
    ipv6_addresses: tuple[AddrState, ...] | None = None
    #: IPv4 broadcast addresses of this netns (RTN_BROADCAST in the local table: bindable);
    #: None = unknown (then only 255.255.255.255 is known to be one).
    broadcast_addresses: frozenset[IPv4Address] | None = None
    #: udp_lib_lport_inuse() returns 0 at the first same-uid SO_REUSEPORT match (upstream), or
    #: checks every socket (some 6.18.44 builds). Calibrated per kernel build
    #: (kernel/calibrate.py); None = unknown: answers that hinge on it are DEPENDS.
    udp_first_match: bool | None = None


@dataclass(frozen=True, slots=True)
class ReuseportCache:
    """A TCP port bucket's ``tb->fastreuseport`` state when > 0 (inet_csk_update_fastreuse).

    On 6.8+ it is always FASTREUSEPORT_STRICT: the "bucket empty" test runs after the bhash2
    entry is linked, so the first reuseport socket also lands in the reset branch.
    """

    uid: int
    addr: IPAddress
    v6only: bool
    #: FASTREUSEPORT_STRICT (2) compares the address; FASTREUSEPORT_ANY (1, a bucket's first
    #: socket before 6.8) lets every same-uid SO_REUSEPORT socket through.
    strict: bool = True


FASTREUSEPORT_ANY = 1
FASTREUSEPORT_STRICT = 2


@dataclass(frozen=True, slots=True)
class BucketState:
    """A TCP port's ``inet_bind_bucket`` fast-reuse fields, as the kernel has them now.

    Read by the BPF socket iterator (``icsk_bind_hash``); a field None = that field unknown.
    ``fast_rcv_saddr`` is the cached socket's address in its own family's form
    (``::ffff:a.b.c.d`` for an AF_INET6 socket on an IPv4 address).
    """

    fastreuse: int | None = None
    fastreuseport: int | None = None
    fastuid: int | None = None
    fast_rcv_saddr: IPAddress | None = None
    fast_ipv6_only: bool | None = None

    @classmethod
    def of_cache(cls, cache: ReuseportCache | None) -> BucketState:
        """The fields for a known SO_REUSEPORT cache (None: tb->fastreuseport = 0)."""
        if cache is None:
            return cls(0, 0)
        level = FASTREUSEPORT_STRICT if cache.strict else FASTREUSEPORT_ANY
        return cls(0, level, cache.uid, cache.addr, cache.v6only)

    @property
    def cache(self) -> ReuseportCache | None:
        """The SO_REUSEPORT cache when it is on and fully known, else None."""
        if self.fastreuseport is None or self.fastreuseport <= 0:
            return None
        if self.fastuid is None or self.fast_rcv_saddr is None or self.fast_ipv6_only is None:
            return None
        strict = self.fastreuseport != FASTREUSEPORT_ANY
        return ReuseportCache(self.fastuid, self.fast_rcv_saddr, self.fast_ipv6_only, strict)


@dataclass(frozen=True, slots=True)
class PortState:
    """What the kernel keeps for the port besides its sockets; None = not read.

    Both come from the BPF socket iterator when it runs; without it the model never assumes
    the favourable value (an answer that hinges on them is DEPENDS).
    """

    #: TCP: the bind bucket's fast-reuse cache.
    bucket: BucketState | None = None
    #: UDP: the holders are given in the port's primary hash-chain order (sk_for_each order).
    udp_chain_order: bool = False


def is_timewait(e: SocketRecord) -> bool:
    """A timewait mini-socket: its sk_state is TCP_TIME_WAIT (substate FIN_WAIT2 included)."""
    return e.is_mini or e.state is State.TIME_WAIT
