"""The one walker of the socket table: ``walk(query)`` and ``table(query)`` (with owners).

The reader is chosen here, once per walk: a record prefetched while the CLI imported
(kernel/prefetch.py), netlink inet_diag (ports as kernel bytecode: kernel/diag.py), or
/proc/net as a declared fallback with its limitations as a warning (kernel/procnet.py). The
per-socket kernel state the BPF socket iterator reads (kernel/bpf/sockiter.py) is a different
record, joined to these by the socket cookie in kernel/facts.py.

Lives in kernel/ so that the gatherers (kernel/facts.py, kernel/trace_snapshot.py) and the
public ``rebind.sockets`` reach it without an import running back up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rebind.model.query import SocketQuery
from rebind.model.records import Owner, OwnerScanReport, SocketEntry, SocketRecord, SocketTable, State

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Walk:
    """The records of one walk (a stream), which reader gave them, and what it cannot see."""

    records: Iterator[SocketRecord]
    source: str  # "netlink" or "procfs"
    warnings: tuple[str, ...] = ()


def walk(query: SocketQuery, *, netlink_only: bool = False) -> Walk:
    """Stream the sockets ``query`` asks for, in its network namespace.

    ``netlink_only``: inet_diag in the calling *thread's* namespace, or the error it raises
    (EnvironmentProblem, KernelError, OSError) -- for a worker thread that entered another
    namespace (kernel/namespaces.py: ``records_per_netns``), where neither the records
    prefetched in the process's namespace nor /proc/net (the thread group leader's namespace,
    not the thread's) may stand in for it. Such a query names no namespace (ValueError)."""
    if netlink_only:
        if query.netns is not None:
            raise ValueError("a netlink-only walk reads the calling thread's namespace: no netns")
        return _walk_netlink(query)
    if query.netns is not None:
        from rebind.kernel.diag import current_netns

        if current_netns() != query.netns:
            w = _in_netns(query.netns, lambda: _materialised(query))
            return Walk(iter(w[0]), w[1], w[2])
    return _walk_here(query)


def records(query: SocketQuery) -> list[SocketRecord]:
    """:func:`walk`'s records as a list (for callers that do not need the source)."""
    return list(walk(query).records)


def _materialised(query: SocketQuery) -> tuple[list[SocketRecord], str, tuple[str, ...]]:
    w = _walk_here(query)
    return list(w.records), w.source, w.warnings


def _walk_here(query: SocketQuery) -> Walk:
    from rebind.kernel import prefetch

    plist = list(query.ports) if query.ports is not None else None
    if query.port_range is None:
        early = prefetch.take(plist, query.protos, query.families, query.states)
        if early is not None:
            return Walk(_filtered(iter(early), query), "netlink")
    if _netlink():
        return _walk_netlink(query)
    from rebind.kernel import procnet

    recs = procnet.iter_sockets(
        protos=query.protos, families=query.families, states=query.states, ports=plist
    )
    return Walk(_filtered(recs, query), "procfs", (procnet.LIMITATIONS,))


def _walk_netlink(query: SocketQuery) -> Walk:
    from rebind.kernel import diag

    recs = diag.iter_sockets(
        protos=query.protos,
        families=query.families,
        states=query.states,
        ports=list(query.ports) if query.ports is not None else None,
        port_range=query.port_range,
    )
    return Walk(_filtered(recs, query), "netlink")


_NETLINK: dict[tuple[int | None, bool], bool] = {}


def _netlink() -> bool:
    """Whether inet_diag answers here: asked once per namespace (and REBIND_FORCE_PROCFS)."""
    import os

    from rebind.kernel import diag

    key = (diag.current_netns(), bool(os.environ.get("REBIND_FORCE_PROCFS")))
    if key not in _NETLINK:
        _NETLINK[key] = diag.netlink_available()
    return _NETLINK[key]


def _filtered(recs: Iterator[SocketRecord], query: SocketQuery) -> Iterator[SocketRecord]:
    """What a reader does not filter itself: local addresses, and a port range in /proc."""
    if query.addrs is None and query.port_range is None:
        return recs
    return (r for r in recs if query.matches(r))


def _in_netns(inode: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread inside the namespace net:[inode] (FileNotFoundError: gone)."""
    from rebind.kernel.namespaces import list_namespaces, run_in

    with list_namespaces(sockets=False) as scan:
        for ns in scan.namespaces:
            if ns.inode == inode:
                return run_in(ns, fn)
    raise FileNotFoundError(f"network namespace net:[{inode}] is gone")


def table(query: SocketQuery, *, owners: bool = True) -> SocketTable:
    """Every socket ``query`` asks for (sorted), with every process holding each one."""
    w = walk(query)
    return table_of(sorted(w.records, key=_order), w.source, w.warnings, owners=owners)


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
    result = SocketTable(entries, source=source, owners_scanned=owners, scan=report, warnings=warnings)
    if not owners or not by_inode:
        return result
    # Each owner's container, unit and proxy role: one /proc/PID/cgroup read per owner, and an
    # engine's API only when an owner is a container's process or a port proxy.
    from rebind.kernel.containers import annotate

    return annotate(result)


def _order(r: SocketRecord) -> tuple[int, str, int, int, str, str]:
    return (
        r.local.port,
        r.proto.value,
        r.family.value,
        -int(r.state is State.LISTEN),
        str(r.local),
        str(r.remote),
    )
