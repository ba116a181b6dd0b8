"""The socket table with owners: netlink when possible, /proc/net as a declared fallback."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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
)


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
    from rebind.kernel import diag

    plist = sorted(set(ports)) if ports is not None else None
    chosen = frozenset(states) if states is not None else (frozenset(State) if plist else LISTENING_STATES)
    protos, families = tuple(protos), tuple(families)
    from rebind.kernel import prefetch

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
    """Every socket matching the filters, with every process holding each one."""
    recs, source, warnings = iter_records(ports=ports, protos=protos, families=families, states=states)
    records = sorted(recs, key=_order)
    report = OwnerScanReport()
    by_inode: dict[int, tuple[Owner, ...]] = {}
    if owners:
        from rebind.kernel.owners import find_owners

        found, report = find_owners(records)
        by_inode = dict(found)
        if report.inaccessible:
            from os import geteuid

            from rebind.kernel.owners import inaccessible_warning

            warnings = (*warnings, inaccessible_warning(report.inaccessible, geteuid()))
    entries = tuple(SocketEntry(r, by_inode.get(r.inode, ()) if r.inode else ()) for r in records)
    return SocketTable(entries, source=source, owners_scanned=owners, scan=report, warnings=warnings)


def _order(r: SocketRecord) -> tuple[int, str, int, int, str, str]:
    return (
        r.local.port,
        r.proto.value,
        r.family.value,
        -int(r.state is State.LISTEN),
        str(r.local),
        str(r.remote),
    )
