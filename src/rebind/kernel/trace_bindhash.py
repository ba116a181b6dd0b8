"""`rebind trace`'s snapshot of a failing TCP bind() or listen(), from the port's bind buckets.

The sockets are those inet_csk_bind_conflict walks, read in one hash chain (kernel/
bindhash_table.py) instead of inet_diag's dumps (each a walk of the whole namespace: ~100 ms at
211k sockets); each with its kernel state, so ``facts.gather(states=...)`` reads no flag again.
The model is `why`'s, observer-free, as kernel/trace_snapshot.py's other path.

Owners (processes) are looked for only for the sockets the answer names: a first answer
without owners gives the blockers (who holds a socket never decides whether it conflicts: the
conflict rules read flags, addresses, devices and uids, all the kernel's), then the owner scan
(kernel/owners.py) runs for their inodes alone and the model answers again with them (the
owners decide the words: a process, a leftover, its parent...). A port whose blockers are all
TIME_WAITs (no inode) needs no scan at all.

Every doubt -- BPF unavailable, HZ not calibrated, a fault, a truncated or inconsistent walk
-- returns None: the caller takes the dumps, never a less exact answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rebind.model.sockstate import SockStates, Unavailable

if TYPE_CHECKING:
    from rebind.model.advice import Diagnosis, Facts
    from rebind.model.conflict import KernelSettings
    from rebind.model.records import SocketRecord, SocketTable
    from rebind.model.request import BindRequest
    from rebind.model.trace import TraceEvent

#: The most sockets one snapshot reads from a port's buckets (the records map: 144 bytes a
#: record, ~9.4 MB); a port with more takes inet_diag's dumps.
LIMIT = 1 << 16


def prepare() -> str | None:
    """Load the owners program for LIMIT records and calibrate HZ (~0.1 s, once): None when
    ready, else why the snapshots will take the dumps."""
    from rebind.kernel.bindhash_table import calibrate_hz
    from rebind.kernel.bpf.bindhash import prepare_port_owners

    got = prepare_port_owners(LIMIT)
    if got is not None:
        return got.reason
    if calibrate_hz() is None:
        return "HZ could not be calibrated"
    return None


def diagnose(ev: TraceEvent, req: BindRequest, settings: KernelSettings, owners: bool) -> Diagnosis | None:
    """The model's answer for ``req`` from the port's bind buckets, in this thread's namespace;
    None where that read cannot stand for the port (the caller takes inet_diag's dumps)."""
    from rebind.kernel.bindhash_table import port_table, table_order
    from rebind.model.advice import advise

    got = port_table(req.port, LIMIT)
    if isinstance(got, Unavailable):
        return None
    pairs, states = got
    # the failing socket itself (a listen() fails on a socket bound to the port) is no blocker
    pairs = table_order([p for p in pairs if not ev.inode or p[0].inode != ev.inode])
    records = [r for r, _ in pairs]
    kernel = SockStates(states.netns, tuple(st for _, st in pairs))
    first = advise(_facts(ev, req, settings, _table(records, owners), kernel, owners))
    named = {b.entry.socket.inode for b in first.blockers if b.entry.socket.inode}
    if not owners or not named:
        return first
    table = _owned_table(records, named)
    return advise(_facts(ev, req, settings, table, kernel, owners))


def _facts(
    ev: TraceEvent,
    req: BindRequest,
    settings: KernelSettings,
    table: SocketTable,
    kernel: SockStates,
    owners: bool,
) -> Facts:
    from rebind.kernel.facts import gather
    from rebind.kernel.trace_snapshot import with_event_trial

    facts = gather(req, owners=owners, table=table, trials=False, settings=settings, states=kernel)
    return with_event_trial(ev, req, facts)


def _table(records: list[SocketRecord], owners: bool) -> SocketTable:
    """The records, no owner looked for yet (``owners``: the scan is to come, for the blockers)."""
    from rebind.model.records import SocketEntry, SocketTable

    return SocketTable(tuple(SocketEntry(r) for r in records), source=SOURCE, owners_scanned=owners)


def _owned_table(records: list[SocketRecord], inodes: set[int]) -> SocketTable:
    """The records, with the owners of ``inodes`` (the scan, its containers and units, for
    those sockets alone: kernel/walk.table_of)."""
    from dataclasses import replace

    from rebind.kernel.walk import table_of
    from rebind.model.records import SocketEntry

    scanned = table_of([r for r in records if r.inode in inodes], SOURCE, (), owners=True)
    found = {e.socket.inode: e.owners for e in scanned.entries if e.owners}
    entries = tuple(SocketEntry(r, found.get(r.inode, ()) if r.inode else ()) for r in records)
    return replace(scanned, entries=entries)


#: SocketTable.source of these tables (only "procfs" changes what the model says).
SOURCE = "bindhash"
