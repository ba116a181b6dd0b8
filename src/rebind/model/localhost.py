"""Localhost split-brain: which server ``localhost:PORT`` reaches, and for whom. Pure.

``localhost`` has two loopback addresses, 127.0.0.1 and ::1. When their listeners on one port
belong to different processes (vite on ::1 and a Docker-published port on 0.0.0.0), or only one
family has a listener at all, what a client reaches depends on the client: the system resolver's
order (/etc/hosts, gai.conf), whether the client tries the next address after ECONNREFUSED, and
browsers' own happy-eyeballs handling of ``localhost``.

Which listener a connection reaches is the kernel's listener lookup (``__inet_lookup_listener``
in net/ipv4/inet_hashtables.c, ``inet6_lookup_listener`` in net/ipv6/inet6_hashtables.c): the
exact destination address first, then the wildcard; among IPv4 candidates ``compute_score``
prefers an AF_INET socket over a dual-stack AF_INET6 one, and a socket bound to the device. A
socket bound to a specific IPv6 address is always IPv6-only (``__inet6_bind`` sets
``sk_ipv6only``), so ``::1`` never answers 127.0.0.1.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import Family, Proto, SocketEntry, State, owner_label

V4_LOOPBACK = IPv4Address("127.0.0.1")
V6_LOOPBACK = IPv6Address("::1")


class SplitKind(enum.StrEnum):
    #: 127.0.0.1 and ::1 reach different processes.
    SPLIT = "split"
    #: Only 127.0.0.1 has a listener: ::1 gets ECONNREFUSED.
    V4_ONLY = "ipv4-only"
    #: Only ::1 has a listener: 127.0.0.1 gets ECONNREFUSED.
    V6_ONLY = "ipv6-only"

    @property
    def marker(self) -> str:
        """The short mark `ls` and `top` show next to the port."""
        return {SplitKind.SPLIT: "localhost-split", SplitKind.V4_ONLY: "lh:v4-only"}.get(self, "lh:v6-only")


@dataclass(frozen=True, slots=True)
class HostsLine:
    """A line of /etc/hosts that names ``localhost`` (as read, for the explanation)."""

    lineno: int
    addr: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LocalhostResolution:
    """How this host resolves ``localhost`` (kernel/resolver.py gathers it)."""

    #: Address families in the order getaddrinfo("localhost", PORT, SOCK_STREAM) returns them.
    order: tuple[Family, ...]
    #: /etc/hosts lines that name localhost, in file order.
    hosts: tuple[HostsLine, ...] = ()
    #: ::1 is configured on lo (net.ipv6 enabled): without it nothing answers on IPv6 anyway.
    ipv6_loopback: bool = True
    #: The loopback device's ifindex (a listener bound to another device never sees loopback).
    lo_ifindex: int = 1


@dataclass(frozen=True, slots=True)
class Reach:
    """Who answers a connection to one loopback address."""

    addr: IPv4Address | IPv6Address
    #: The listening sockets the kernel's lookup would pick (more than one: a SO_REUSEPORT group).
    listeners: tuple[SocketEntry, ...]

    @property
    def refused(self) -> bool:
        return not self.listeners

    @property
    def pids(self) -> frozenset[int]:
        return frozenset(o.pid for e in self.listeners for o in e.owners)

    @property
    def who(self) -> str:
        """``node[12] on [::]:5173`` (escaped labels); ``ECONNREFUSED`` when nobody listens."""
        if self.refused:
            return "nothing (ECONNREFUSED)"
        # Each label once, first seen first (a dict: a SO_REUSEPORT group of forked servers has
        # hundreds of owners per listener, and a list's membership test made this quadratic).
        labels = dict.fromkeys(owner_label(o) for e in self.listeners for o in e.owners)
        at = str(self.listeners[0].socket.local)
        return f"{', '.join(labels) or 'an unseen process'} on {at}"


@dataclass(frozen=True, slots=True)
class Audience:
    """One kind of client and the address it ends up on."""

    client: str
    reaches: Family | None  # None: connection refused

    def describe(self, v4: Reach, v6: Reach) -> str:
        if self.reaches is None:
            return f"{self.client}: connection refused"
        r = v4 if self.reaches is Family.INET else v6
        return f"{self.client}: {r.addr} → {r.who}"


@dataclass(frozen=True, slots=True)
class SplitBrain:
    port: int
    kind: SplitKind
    v4: Reach
    v6: Reach
    resolution: LocalhostResolution
    audiences: tuple[Audience, ...]

    @property
    def resolver_first(self) -> Family | None:
        return self.resolution.order[0] if self.resolution.order else None

    def headline(self) -> str:
        p = self.port
        if self.kind is SplitKind.SPLIT:
            return (
                f"localhost:{p} is split: 127.0.0.1 reaches {self.v4.who}, "
                f"::1 reaches {self.v6.who} -- which one a client gets depends on the client"
            )
        if self.kind is SplitKind.V6_ONLY:
            return (
                f"localhost:{p} reaches {self.v6.who} via IPv6 only; 127.0.0.1:{p} gets ECONNREFUSED "
                "(clients that take 127.0.0.1 first and do not fall back fail)"
            )
        return (
            f"localhost:{p} reaches {self.v4.who} via IPv4 only; [::1]:{p} gets ECONNREFUSED "
            "(clients that take ::1 first and do not fall back, such as Node 17-19, fail)"
        )

    def resolver_text(self) -> str:
        order = " then ".join("::1" if f is Family.INET6 else "127.0.0.1" for f in self.resolution.order)
        lines = "; ".join(f"line {h.lineno}: {h.addr} {' '.join(h.names)}" for h in self.resolution.hosts)
        src = f" (/etc/hosts {lines})" if lines else ""
        in_file = [Family.INET6 if ":" in h.addr else Family.INET for h in self.resolution.hosts]
        if in_file and self.resolution.order and in_file[0] != self.resolution.order[0]:
            src += "; the resolver sorts them by RFC 6724 (/etc/gai.conf), not by file order"
        return f"getaddrinfo('localhost') here returns {order or 'nothing'}{src}"

    def lines(self) -> tuple[str, ...]:
        """The note `why` prints: headline, resolver order, then who reaches what."""
        return (
            self.headline(),
            self.resolver_text(),
            *(a.describe(self.v4, self.v6) for a in self.audiences),
        )

    def commands(self) -> tuple[str, ...]:
        """For a split: stop one side, exactly (each line keeps the other server). A one-family
        server needs its own configuration changed: no command fits every server."""
        if self.kind is not SplitKind.SPLIT:
            return ()
        out = []
        for side, other in ((self.v4, self.v6), (self.v6, self.v4)):
            spec = shlex.quote(str(side.listeners[0].socket.local))
            out.append(f"rebind free {spec}   # keeps the server on {other.addr}")
        return tuple(out)

    def fix(self) -> str:
        p = self.port
        if self.kind is SplitKind.SPLIT:
            return (
                f"give each server its own port, or stop the one you did not mean to run; until then "
                f"connect to http://127.0.0.1:{p} or http://[::1]:{p} explicitly, never to localhost"
            )
        if self.kind is SplitKind.V6_ONLY:
            return (
                f"make the server listen on both families (bind '::' with IPV6_V6ONLY=0, e.g. "
                f"`--host ::`), or point clients at http://[::1]:{p} instead of localhost"
            )
        return (
            f"make the server listen on both families (bind '::' with IPV6_V6ONLY=0, e.g. `--host ::`), "
            f"or point clients at http://127.0.0.1:{p} instead of localhost; for Node 17-19 "
            "`node --dns-result-order=ipv4first`"
        )


# ---------------------------------------------------------------------------------------------
# The kernel's listener lookup, for the two loopback destinations


def _score(e: SocketEntry, dest: IPv4Address | IPv6Address, lo_ifindex: int) -> int:
    """compute_score for one listener and a loopback destination; -1: never picked.

    IPv4 destination (net/ipv4/inet_hashtables.c): the socket must not be IPv6-only, its
    ``sk_rcv_saddr`` (a v4-mapped IPv6 bind stores the IPv4 address) must be the destination or
    0; score 1, +1 bound to the device, +1 an AF_INET socket. IPv6 destination
    (net/ipv6/inet6_hashtables.c): AF_INET6 sockets only, address equal or ::.
    """
    r = e.socket
    if r.ifindex not in (0, lo_ifindex):
        return -1
    score = 2 if r.ifindex else 1
    a = r.local.addr
    if isinstance(dest, IPv4Address):
        if r.family is Family.INET:
            return score + 1 if a == dest or a.is_unspecified else -1
        assert isinstance(a, IPv6Address)
        if a.ipv4_mapped is not None:
            return score if a.ipv4_mapped == dest else -1
        # :: without IPV6_V6ONLY is dual-stack; v6only None (procfs) is the usual default, 0.
        return score if a.is_unspecified and r.v6only is not True else -1
    if r.family is not Family.INET6:
        return -1
    return score if a == dest or a.is_unspecified else -1


def reach(entries: Iterable[SocketEntry], dest: IPv4Address | IPv6Address, lo_ifindex: int = 1) -> Reach:
    """The listeners a connection to ``dest`` (a loopback address) reaches: an exact-address
    listener first (the lookup's first hash2 pass), else the best wildcard one."""
    listeners = [e for e in entries if e.socket.proto is Proto.TCP and e.socket.state is State.LISTEN]
    for exact in (True, False):
        scored = [
            (s, e)
            for e in listeners
            if (e.socket.local.addr.is_unspecified) is not exact and (s := _score(e, dest, lo_ifindex)) >= 0
        ]
        if scored:
            best = max(s for s, _ in scored)
            return Reach(dest, tuple(e for s, e in scored if s == best))
    return Reach(dest, ())


def _same_server(v4: Reach, v6: Reach) -> bool | None:
    """True: one server answers both; False: different processes; None: cannot tell."""
    if {e.socket.key for e in v4.listeners} & {e.socket.key for e in v6.listeners}:
        return True  # one dual-stack socket answers both
    if not v4.pids or not v6.pids:
        return None  # owners not visible: never accuse two processes we cannot see
    return bool(v4.pids & v6.pids)


def _first_listening(order: Sequence[Family], v4: Reach, v6: Reach) -> Family | None:
    for f in order:
        if not (v4 if f is Family.INET else v6).refused:
            return f
    return None


def audiences(res: LocalhostResolution, v4: Reach, v6: Reach) -> tuple[Audience, ...]:
    """Who reaches what through the name ``localhost``.

    * Clients that try each getaddrinfo result in order, moving on after ECONNREFUSED (curl,
      Python's socket.create_connection, Go's net.Dial, Node >= 20 with autoSelectFamily).
    * Clients that connect to the first result only: Node 17-19 (``verbatim`` order since Node
      17, nodejs/node#39987; no fallback before autoSelectFamily became the default in 20).
    * Browsers: Chrome and Firefox resolve ``localhost`` to loopback themselves and race ::1
      first (happy eyeballs, RFC 8305), falling back to 127.0.0.1 when ::1 refuses.
    """
    order = res.order if res.ipv6_loopback else tuple(f for f in res.order if f is Family.INET)
    first = order[0] if order else None
    first_only: Family | None = None
    if first is not None and not (v4 if first is Family.INET else v6).refused:
        first_only = first
    browser_order = (Family.INET6, Family.INET) if res.ipv6_loopback else (Family.INET,)
    return (
        Audience(
            "curl, Python, Go, Node >= 20 (resolver order, next address on refusal)",
            _first_listening(order, v4, v6),
        ),
        Audience("Node 17-19 (first resolver result only)", first_only),
        Audience("browsers (::1 first, then 127.0.0.1)", _first_listening(browser_order, v4, v6)),
    )


def find_split(port: int, entries: Iterable[SocketEntry], res: LocalhostResolution) -> SplitBrain | None:
    """A SplitBrain finding for TCP ``port``, or None when localhost reaches one server whatever
    the client (or nothing at all, or owners are not visible enough to tell)."""
    # reach() weighs listeners only: the state first (a port can have ten thousand TIME_WAITs)
    mine = [e for e in entries if e.socket.state is State.LISTEN and e.socket.port == port]
    v4 = reach(mine, V4_LOOPBACK, res.lo_ifindex)
    v6 = reach(mine, V6_LOOPBACK, res.lo_ifindex) if res.ipv6_loopback else Reach(V6_LOOPBACK, ())
    if v4.refused and v6.refused:
        return None
    if v4.refused or v6.refused:
        if not res.ipv6_loopback:
            return None  # no ::1 here: every client ends on 127.0.0.1
        kind = SplitKind.V6_ONLY if v4.refused else SplitKind.V4_ONLY
    elif _same_server(v4, v6) is False:
        kind = SplitKind.SPLIT
    else:
        return None
    return SplitBrain(port, kind, v4, v6, res, audiences(res, v4, v6))


def find_splits(entries: Sequence[SocketEntry], res: LocalhostResolution) -> dict[int, SplitBrain]:
    """Every TCP port in ``entries`` with a split-brain finding (for `ls` and `top`)."""
    by_port: dict[int, list[SocketEntry]] = {}
    for e in entries:  # one pass: `ls` on a big table has thousands of ports
        if e.socket.proto is Proto.TCP and e.socket.state is State.LISTEN:
            by_port.setdefault(e.socket.port, []).append(e)
    found = {p: find_split(p, group, res) for p, group in sorted(by_port.items())}
    return {p: f for p, f in found.items() if f is not None}


def loopback_only(f: SplitBrain) -> bool:
    """Worth a mark in `ls` and `top`: every split; a one-family server only when it is bound to
    the loopback address itself (a dev server on localhost, not sshd on 0.0.0.0) *and* some kind
    of client gets ECONNREFUSED through the name localhost here (resolver order first, e.g. Node
    17-19 with ::1 first). A 127.0.0.1-only server on a host whose localhost is 127.0.0.1 only
    reaches every client: `why` still describes it, the table stays quiet."""
    if f.kind is SplitKind.SPLIT:
        return True
    r = f.v4 if f.kind is SplitKind.V4_ONLY else f.v6
    bound = any(not e.socket.local.addr.is_unspecified for e in r.listeners)
    return bound and any(a.reaches is None for a in f.audiences)
