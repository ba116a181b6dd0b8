"""Which sockets a question reads: one frozen :class:`SocketQuery`, validated once. Pure.

ss's filter idea (``ss state listening sport = :80``) as a value: every walker of the socket
table (``kernel/walk.py: walk(query)``) takes one, whichever reader answers it (netlink
inet_diag with the ports as kernel bytecode, or /proc/net as a declared fallback). Bad filters
raise :class:`rebind.errors.UsageError` here, so no reader sees a port outside 0-65535
(``struct.error`` from the bytecode) or an unknown protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from rebind.errors import UsageError
from rebind.model.addr import IPAddress, parse_ip
from rebind.model.records import LISTENING_STATES, Family, Proto, SocketRecord, State, parse_state
from rebind.model.validate import parse_port

E = TypeVar("E", Proto, Family)

ALL_PROTOS = (Proto.TCP, Proto.UDP)
ALL_FAMILIES = (Family.INET, Family.INET6)


@dataclass(frozen=True, slots=True)
class SocketQuery:
    """The sockets to read: local ports (None: every port), protocols, families, states, local
    addresses (None: any) and the network namespace by inode (None: the calling thread's).
    Build it with :meth:`create` from user input."""

    ports: tuple[int, ...] | None = None
    protos: tuple[Proto, ...] = ALL_PROTOS
    families: tuple[Family, ...] = ALL_FAMILIES
    states: frozenset[State] = frozenset(State)
    addrs: frozenset[IPAddress] | None = None
    netns: int | None = None
    #: A contiguous range of local ports instead of a list (filtered in the kernel too).
    port_range: tuple[int, int] | None = None

    @classmethod
    def create(
        cls,
        *,
        ports: Any = None,
        protos: Any = ALL_PROTOS,
        families: Any = ALL_FAMILIES,
        states: Any = None,
        addrs: Any = None,
        netns: int | None = None,
        port_range: tuple[int, int] | None = None,
    ) -> SocketQuery:
        """The one validating constructor. Protocols, families and states may be the enums or
        their names (``"tcp"``, ``"ipv6"``, ``"time-wait"``). Without states: every state when
        ports are given, else the listening and bound sockets (bound-inactive included)."""
        plist = _ports(ports)
        given = _states(states)
        chosen = given if given is not None else (frozenset(State) if plist else LISTENING_STATES)
        if port_range is not None:
            lo, hi = (parse_port(p, what="port range", allow_zero=True) for p in port_range)
            if lo > hi:
                raise UsageError(f"port range {lo}-{hi}: low > high")
            port_range = (lo, hi)
        if netns is not None and (isinstance(netns, bool) or not isinstance(netns, int) or netns <= 0):
            raise UsageError(f"netns must be a namespace inode (net:[INODE]), not {netns!r}")
        return cls(
            ports=plist,
            protos=_protos(protos),
            families=_families(families),
            states=chosen,
            addrs=None if addrs is None else frozenset(parse_ip(a) for a in _items(addrs, "addrs")),
            netns=netns,
            port_range=port_range,
        )

    def matches(self, r: SocketRecord) -> bool:
        """The filters a reader may not apply itself (every one, for the /proc fallback)."""
        return (
            r.proto in self.protos
            and r.family in self.families
            and (self.ports is None or r.local.port in self.ports)
            and (self.port_range is None or self.port_range[0] <= r.local.port <= self.port_range[1])
            and (self.addrs is None or r.local.addr in self.addrs)
        )


def _items(value: Any, what: str) -> list[Any]:
    """A list from an iterable argument; a lone str/int is a mistake worth a clear message."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise UsageError(f"{what} must be a list, not {value!r}")
    return list(value)


def _ports(ports: Any) -> tuple[int, ...] | None:
    # parse_port, so that 70000 is a UsageError rather than struct.error from the bytecode.
    return None if ports is None else tuple(sorted({parse_port(p) for p in _items(ports, "ports")}))


def _enum(values: Any, kind: type[E], what: str, one: str, names: dict[str, E]) -> tuple[E, ...]:
    by_value = {int(e): e for e in names.values() if isinstance(e, int)}
    out: list[E] = []
    for v in _items(values, what):
        if isinstance(v, kind):
            out.append(v)
        elif isinstance(v, str) and v.strip().lower() in names:
            out.append(names[v.strip().lower()])
        elif isinstance(v, int) and not isinstance(v, bool) and v in by_value:
            out.append(by_value[v])  # e.g. socket.AF_INET6 for Family.INET6
        else:
            raise UsageError(f"unknown {one} {v!r} (one of: {', '.join(names)})")
    if not out:
        raise UsageError(f"{what} must not be empty")
    return tuple(dict.fromkeys(out))


def _protos(protos: Any) -> tuple[Proto, ...]:
    return _enum(protos, Proto, "protos", "protocol", {p.value: p for p in Proto})


def _families(families: Any) -> tuple[Family, ...]:
    names = {"ipv4": Family.INET, "inet": Family.INET, "ipv6": Family.INET6, "inet6": Family.INET6}
    return _enum(families, Family, "families", "address family", names)


def _states(states: Any) -> frozenset[State] | None:
    if states is None:
        return None
    out: set[State] = set()
    for v in _items(states, "states"):
        if isinstance(v, State):
            out.add(v)
        elif isinstance(v, str):
            try:
                out.add(parse_state(v))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        else:
            raise UsageError(f"unknown state {v!r} (a rebind.model.records.State or its name)")
    return frozenset(out)
