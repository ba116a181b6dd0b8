"""The socket table with owners: netlink when possible, /proc/net as a declared fallback."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from rebind.errors import UsageError
from rebind.model.records import (
    LISTENING_STATES,
    Family,
    Owner,
    OwnerScanReport,
    Proto,
    SocketEntry,
    SocketRecord,
    SocketTable,
    State,
    parse_state,
)
from rebind.model.validate import parse_port

E = TypeVar("E", Proto, Family)


def _items(value: Any, what: str) -> list[Any]:
    """A list from an iterable argument; a lone str/int is a mistake worth a clear message."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise UsageError(f"{what} must be a list, not {value!r}")
    return list(value)


def _ports(ports: Any) -> list[int] | None:
    # parse_port, so that 70000 is a UsageError rather than struct.error from the bytecode.
    return None if ports is None else sorted({parse_port(p) for p in _items(ports, "ports")})


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
    from rebind.kernel import diag, prefetch

    plist = _ports(ports)
    given = _states(states)
    chosen = given if given is not None else (frozenset(State) if plist else LISTENING_STATES)
    protos, families = _protos(protos), _families(families)

    early = prefetch.take(plist, protos, families, chosen)
    if early is not None:
        return iter(early), "netlink", ()
    if diag.netlink_available():
        return (
            diag.iter_sockets(protos=protos, families=families, states=chosen, ports=plist),
            "netlink",
            (),
        )
    from rebind.kernel import procnet

    recs = procnet.iter_sockets(protos=protos, families=families, states=chosen, ports=plist)
    return recs, "procfs", (procnet.LIMITATIONS,)


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
    recs, source, warnings = iter_records(ports=ports, protos=protos, families=families, states=states)
    return table_of(sorted(recs, key=_order), source, warnings, owners=owners)


def table_of(
    records: Sequence[SocketRecord],
    source: str,
    warnings: tuple[str, ...],
    *,
    owners: bool = True,
    netns_names: Mapping[int, str | None] | None = None,
) -> SocketTable:
    """The table of these (sorted) records: every owner found, with its container, unit and
    proxy role, and a warning for what could not be inspected. Shared by ``ls`` and
    ``ls --all-netns`` (``netns_names``: the name of each record's namespace)."""
    report = OwnerScanReport()
    by_inode: dict[int, tuple[Owner, ...]] = {}
    if owners and records:
        from rebind.kernel.owners import find_owners

        found, report = find_owners(records)
        by_inode = dict(found)
        if report.inaccessible:
            from os import geteuid

            from rebind.model.records import inaccessible_warning

            warnings = (*warnings, inaccessible_warning(report.inaccessible, geteuid()))
    names = netns_names or {}
    entries = tuple(
        SocketEntry(r, by_inode.get(r.inode, ()) if r.inode else (), names.get(r.netns or 0)) for r in records
    )
    table = SocketTable(entries, source=source, owners_scanned=owners, scan=report, warnings=warnings)
    if not owners or not by_inode:
        return table
    # Each owner's container, unit and proxy role: one /proc/PID/cgroup read per owner, and an
    # engine's API only when an owner is a container's process or a port proxy.
    from rebind.kernel.containers import annotate

    return annotate(table)


def _order(r: SocketRecord) -> tuple[int, str, int, int, str, str]:
    return (
        r.local.port,
        r.proto.value,
        r.family.value,
        -int(r.state is State.LISTEN),
        str(r.local),
        str(r.remote),
    )
