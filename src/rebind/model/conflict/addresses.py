"""Do two sockets' addresses overlap? A literal transcription of inet_rcv_saddr_equal /
ipv{4,6}_rcv_saddr_equal (bind-rules.md §1.2), the TCP bhash2 bucket search, and which holders
the kernel compares with a new bind at all (``relevant``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.model.conflict.inputs import Holder, KernelSettings
from rebind.model.records import IPAddress, Proto, SocketRecord
from rebind.model.request import BindRequest

_LOOPBACK4_IPV6 = 0x7F000006  # sk_rcv_saddr of an IPv6 socket on a non-mapped address
_ANY, _MAPPED, _OTHER = 0, 1, 2


@dataclass(frozen=True, slots=True)
class KAddr:
    """What the kernel compares: sk_v6_rcv_saddr (None for AF_INET), sk_rcv_saddr, ipv6only."""

    v6: IPv6Address | None
    v4: int
    ipv6only: bool


def _kaddr(a: IPAddress, ipv6only: bool) -> KAddr:
    """A socket on ``a`` whose sk_ipv6only is ``ipv6only`` (ignored where IPv4 reaches it)."""
    if isinstance(a, IPv4Address):
        return KAddr(None, int(a), False)
    mapped = a.ipv4_mapped
    if mapped is not None:
        return KAddr(a, int(mapped), False)
    if a.is_unspecified:
        return KAddr(a, 0, ipv6only)
    # A specific non-mapped address: sk_rcv_saddr is LOOPBACK4_IPV6 (127.0.0.6) however the
    # socket got there -- bind() (__inet6_bind, which also forces ipv6only on), or connect() /
    # accept() leaving ipv6only 0 (tcp_v6_connect, ip6_datagram_connect, tcp_v6_syn_recv_sock).
    # With ipv6only 0, ipv4_rcv_saddr_equal() then matches an IPv4 wildcard and 127.0.0.6 itself,
    # not every IPv4 address (a dual-stack UDP client autobound by connect() to [::1]:P leaves
    # bind(127.0.0.1, P) free: tests/kernel/test_oracle.py).
    return KAddr(a, _LOOPBACK4_IPV6, ipv6only)


def bound_kaddr(addr: IPAddress, v6only: bool) -> KAddr:
    """A socket that bind() put on ``addr``: __inet6_bind forces sk_ipv6only = 1 on a specific
    non-mapped IPv6 address (E12)."""
    return _kaddr(addr, v6only or not addr.is_unspecified)


def _v6type(a: IPv6Address | None) -> int:
    if a is None:  # inet6_rcv_saddr() of an AF_INET socket: treated as mapped
        return _MAPPED
    if a.is_unspecified:
        return _ANY
    return _MAPPED if a.ipv4_mapped is not None else _OTHER


def _ipv4_equal(a1: int, a2: int, sk2_ipv6only: bool, w1: bool, w2: bool) -> bool:
    """ipv4_rcv_saddr_equal()."""
    if sk2_ipv6only:
        return False
    return a1 == a2 or (w1 and a1 == 0) or (w2 and a2 == 0)


def _ipv6_equal(sk1: KAddr, sk2: KAddr, w1: bool, w2: bool) -> bool:
    """ipv6_rcv_saddr_equal()."""
    t1, t2 = _v6type(sk1.v6), _v6type(sk2.v6)
    if t1 == _MAPPED and t2 == _MAPPED:
        return _ipv4_equal(sk1.v4, sk2.v4, sk2.ipv6only, w1, w2)
    if t1 == _ANY and t2 == _ANY:
        return True
    if t2 == _ANY and w2 and not (sk2.ipv6only and t1 == _MAPPED):
        return True
    if t1 == _ANY and w1 and not (sk1.ipv6only and t2 == _MAPPED):
        return True
    return sk2.v6 is not None and sk1.v6 == sk2.v6


def rcv_saddr_equal(sk1: KAddr, sk2: KAddr, w1: bool = True, w2: bool = True) -> bool:
    """inet_rcv_saddr_equal(): dispatch on sk1's family."""
    if sk1.v6 is not None:
        return _ipv6_equal(sk1, sk2, w1, w2)
    return _ipv4_equal(sk1.v4, sk2.v4, sk2.ipv6only, w1, w2)


def overlap(a: IPAddress, a_v6only: bool, b: IPAddress, b_v6only: bool) -> bool:
    """Do two bound addresses overlap (inet_rcv_saddr_equal with wildcards, bind-rules §1.2)?"""
    return rcv_saddr_equal(bound_kaddr(a, a_v6only), bound_kaddr(b, b_v6only))


def effective_v6only(addr: IPAddress, v6only: bool | None, settings: KernelSettings) -> bool:
    """sk_ipv6only after bind: IPv4 never; specific non-mapped IPv6 forced on (__inet6_bind)."""
    if isinstance(addr, IPv4Address):
        return False
    if addr.ipv4_mapped is not None:
        return False
    if not addr.is_unspecified:
        return True
    return settings.bindv6only if v6only is None else v6only


def request_kaddr(req: BindRequest, settings: KernelSettings) -> KAddr:
    """The new socket N as the kernel compares it, once bound."""
    return bound_kaddr(req.addr, effective_v6only(req.addr, req.v6only, settings))


def _v6only_choices(h: Holder) -> tuple[bool, ...]:
    """The holder's possible sk_ipv6only: from the record, else the opts, else both."""
    e = h.socket
    a = e.local.addr
    if isinstance(a, IPv4Address) or a.ipv4_mapped is not None:
        return (False,)
    known = e.v6only if e.v6only is not None else h.opts.v6only
    return (known,) if known is not None else (False, True)


def _norm(a: IPAddress) -> IPAddress:
    return a.ipv4_mapped or a if isinstance(a, IPv6Address) else a


def _overlaps(req: BindRequest, n: KAddr, h: Holder, tcp: bool) -> set[bool]:
    """Whether the holder is checked at all, for each of its possible ipv6only values."""
    e = h.socket
    out = set()
    for v6only in _v6only_choices(h):
        if tcp and _use_bhash2(n):
            # inet_bhash2_addr_any_conflict + __inet_bhash2_conflict, then N's own bucket.
            if _is_addr_any_bucket(e, n):
                hit = not (v6only and _v6type(n.v6) == _MAPPED)
            else:
                hit = _norm(e.local.addr) == _norm(req.addr)
        else:
            hit = rcv_saddr_equal(n, _kaddr(e.local.addr, v6only))
        out.add(hit)
    return out


def _is_addr_any_bucket(e: SocketRecord, n: KAddr) -> bool:
    """inet_bind2_bucket_match_addr_any(): [::] always; 0.0.0.0 / [::ffff:0.0.0.0] for v4 N."""
    a = e.local.addr
    if isinstance(a, IPv6Address) and a.is_unspecified:
        return True
    v4 = a if isinstance(a, IPv4Address) else a.ipv4_mapped
    return v4 is not None and v4.is_unspecified and _v6type(n.v6) == _MAPPED


def _use_bhash2(n: KAddr) -> bool:
    """inet_use_bhash2_on_bind(): any specific address (v4-mapped ones included)."""
    if n.v6 is not None and _v6type(n.v6) == _OTHER:
        return True
    return n.v4 != 0


def relevant(
    req: BindRequest, holders: Iterable[Holder], settings: KernelSettings
) -> list[tuple[Holder, bool]]:
    """Holders the kernel compares with N, and whether that is certain (False: v6only unknown).

    Same protocol table and port; both devices pinned and different means no conflict.
    """
    n = request_kaddr(req, settings)
    out = []
    for h in holders:
        e = h.socket
        if e.proto is not req.proto or e.local.port != req.port:
            continue  # TCP and UDP never conflict; other ports are other buckets
        if req.ifindex and e.ifindex and req.ifindex != e.ifindex:
            continue
        hits = _overlaps(req, n, h, req.proto is Proto.TCP)
        if True in hits:
            out.append((h, len(hits) == 1))
    return out
