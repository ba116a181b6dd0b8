"""`rebind ls --all-netns`: the socket table of every network namespace on the host, with owners
found across namespaces and each owner's container, unit and proxy role.

The facts gatherer for the question "who holds port X, in any namespace or container?"; the
renderers in rebind.cli show what it returns. Without ``--all-netns`` nothing here runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace

from rebind.errors import EnvironmentProblem, UsageError
from rebind.kernel.containers import EngineState, engine_state, iptables_nat, read_context
from rebind.kernel.namespaces import NetnsScan, list_namespaces, records_per_netns, run_in
from rebind.kernel.walk import table_of  # one table
from rebind.model.containers import Engine, ProxyKind, nat_captures
from rebind.model.query import SocketQuery  # one validation
from rebind.model.records import (
    Family,
    Proto,
    SocketEntry,
    SocketRecord,
    SocketTable,
    State,
)


def _netns_names(scan: NetnsScan, proc: str) -> dict[int, str | None]:
    """A namespace's name: its /run/netns name, else the container its first process runs in."""
    names: dict[int, str | None] = {}
    for ns in scan.namespaces:
        name = ns.name
        if ns.pid is not None and (name is None or name.startswith("docker:")):
            ctx = read_context(ns.pid, proc)
            if ctx.container is not None:
                name = ctx.container.label
        names[ns.inode] = name
    return names


def socket_table_all_netns(
    *,
    ports: Iterable[int] | None = None,
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[Family] = (Family.INET, Family.INET6),
    states: Iterable[State] | None = None,
    owners: bool = True,
    proc: str = "/proc",
) -> SocketTable:
    """Every socket of every namespace matching the filters, with owners and their context."""
    query = SocketQuery.create(ports=ports, protos=protos, families=families, states=states)
    if not isinstance(proc, str) or not os.path.isdir(proc):
        raise UsageError(f"proc={proc!r} is not a directory (the proc filesystem, normally /proc)")
    try:
        scan = list_namespaces(proc)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot list the processes in {proc}: {exc.strerror}") from exc
    with scan:
        return _table(scan, query, owners, proc)


def _table(
    scan: NetnsScan,
    query: SocketQuery,
    owners: bool,
    proc: str,
) -> SocketTable:
    records: list[SocketRecord] = []
    warnings: list[str] = []
    if scan.unreadable:
        # Even root is refused /proc/PID/ns/net of a process it may not ptrace (seen here: PID 1,
        # the VM's process_api), so "not root" is only one possible reason.
        why = "even as root (ptrace access denied)" if os.geteuid() == 0 else "(not root?)"
        warnings.append(
            f"{scan.unreadable} process(es) could not be inspected {why}: "
            "their network namespaces may be missing"
        )
    sources = set()
    parts = records_per_netns(scan, query, proc=proc)
    for part in parts:
        records.extend(part.records)
        warnings.extend(part.warnings)
        sources.add(part.source)
    records.sort(key=lambda r: (r.local.port, r.proto.value, r.netns or 0, r.family.value, str(r.local)))
    source = "netlink" if sources <= {"netlink"} else "mixed"
    table = table_of(records, source, tuple(warnings), owners=owners, netns_names=_netns_names(scan, proc))
    if owners:
        table = _owners_across_namespaces(table, scan)
    if not any(o.proxy is ProxyKind.DOCKERD and o.container is None for e in table.entries for o in e.owners):
        return table
    return resolve_reservations(table, scan, engine_state(proc))


def _owners_across_namespaces(table: SocketTable, scan: NetnsScan) -> SocketTable:
    """Owners of the sockets of namespaces found only through a socket: their holders live in
    another namespace, which the owner scan (it looks in the socket's own namespace) skips."""
    hidden = {ns.inode for ns in scan.namespaces if ns.via_socket}
    lost = [e.socket for e in table.entries if e.socket.netns in hidden and not e.owners and e.socket.inode]
    if not lost:
        return table
    from rebind.kernel.containers import annotate
    from rebind.kernel.owners import find_owners

    found, _report = find_owners(replace(r, netns=None) for r in lost)
    by_inode = dict(found)
    entries = tuple(SocketEntry(r, by_inode.get(r.inode or 0, ())) for r in lost)
    extra = annotate(replace(table, entries=entries, warnings=()))
    owners_of = {e.socket.inode: e.owners for e in extra.entries}
    merged = tuple(
        replace(e, owners=owners_of[e.socket.inode]) if e.socket.inode in owners_of and not e.owners else e
        for e in table.entries
    )
    return replace(table, entries=merged, warnings=(*table.warnings, *extra.warnings))


def resolve_reservations(table: SocketTable, scan: NetnsScan, engines: EngineState) -> SocketTable:
    """Reservation sockets (dockerd --userland-proxy=false, conmon without a name) serve nothing:
    the NAT rule of the socket's namespace says which container gets the traffic."""
    by_ino = {ns.inode: ns for ns in scan.namespaces}
    nat_text: dict[int, str | None] = {}
    entries = []
    for e in table.entries:
        if not any(o.proxy is ProxyKind.DOCKERD and o.container is None for o in e.owners):
            entries.append(e)
            continue
        ino = e.socket.netns or 0
        if ino not in nat_text:
            ns = by_ino.get(ino)
            try:
                nat_text[ino] = iptables_nat() if ns is None or ino == scan.own else run_in(ns, iptables_nat)
            except (OSError, EnvironmentProblem):
                nat_text[ino] = None
        text = nat_text[ino]
        caps = (
            nat_captures(text, e.socket.local.port, e.socket.proto.value, e.socket.local.addr) if text else ()
        )
        cid = next((engines.by_ip.get(c.to_addr) for c in caps if c.to_addr is not None), None)
        if cid is None:
            entries.append(e)
            continue
        ref = engines.ref(cid, Engine.DOCKER)
        owners = tuple(replace(o, container=ref) if o.proxy is ProxyKind.DOCKERD else o for o in e.owners)
        entries.append(replace(e, owners=owners))
    return replace(table, entries=tuple(entries))
