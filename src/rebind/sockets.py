"""The socket table with owners (public API): netlink when possible, /proc/net as a declared
fallback. A thin front over the one walker (kernel/walk.py) and the one query
(model/query.py: ``SocketQuery.create`` validates every filter)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from rebind.kernel.walk import table, table_of, walk
from rebind.model.query import SocketQuery
from rebind.model.records import Family, Proto, SocketRecord, SocketTable, State

__all__ = ["SocketQuery", "iter_records", "socket_table", "table_of"]


def iter_records(
    *,
    ports: Iterable[int] | None = None,
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[Family] = (Family.INET, Family.INET6),
    states: Iterable[State] | None = None,
) -> tuple[Iterator[SocketRecord], str, tuple[str, ...]]:
    """Stream socket records; returns (records, source, warnings).

    Without ports the default is every listening or bound socket (bound-inactive included);
    with ports, every socket whose *local* port matches, in any state.
    """
    w = walk(SocketQuery.create(ports=ports, protos=protos, families=families, states=states))
    return w.records, w.source, w.warnings


def socket_table(
    *,
    ports: Iterable[int] | None = None,
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[Family] = (Family.INET, Family.INET6),
    states: Iterable[State] | None = None,
    owners: bool = True,
) -> SocketTable:
    """Every socket matching the filters, with every process holding each one.

    Bad filters (a port outside 1-65535, an unknown protocol, family or state) raise
    :class:`rebind.errors.UsageError`. Protocols, families and states may be given as the
    enums or their names (``"tcp"``, ``"ipv6"``, ``"time-wait"``).
    """
    query = SocketQuery.create(ports=ports, protos=protos, families=families, states=states)
    return table(query, owners=owners)
