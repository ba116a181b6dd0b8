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

import operator
import os
from typing import TYPE_CHECKING

from rebind.model.records import SocketEntry
from rebind.model.sockstate import Unavailable
from rebind.slotted import twin

if TYPE_CHECKING:
    from rebind.model.advice import Diagnosis, Facts
    from rebind.model.conflict import KernelSettings
    from rebind.model.records import SocketRecord, SocketTable
    from rebind.model.request import BindRequest
    from rebind.model.sockstate import SockStates
    from rebind.model.trace import TraceEvent

_INODE = operator.attrgetter("entry.socket.inode")
_EntrySlots = twin(SocketEntry)
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
    from rebind.gcpause import gc_paused

    # a few objects a socket, none in a cycle: ten thousand TIME_WAITs' would otherwise run
    # the cyclic collector over and over (~4 ms of a 10k-TIME_WAIT port's decoding)
    with gc_paused():
        return _diagnose(ev, req, settings, owners)


def _diagnose(ev: TraceEvent, req: BindRequest, settings: KernelSettings, owners: bool) -> Diagnosis | None:
    from rebind.kernel.bindhash_table import port_records
    from rebind.model.advice import advise

    # the failing socket itself (a listen() fails on a socket bound to the port) is no blocker
    got = port_records(req.port, LIMIT, ev.inode)
    if isinstance(got, Unavailable):
        return None
    records, kernel = got
    first = advise(_facts(ev, req, settings, _table(records, owners), kernel, owners))
    named = set(map(_INODE, first.blockers)) - {None, 0}
    if named and _certificates_installed():
        certified = _with_births(records, named, req.port)
        if certified is None:
            return None
        if certified != records:
            records = certified
            if not owners:
                return advise(_facts(ev, req, settings, _table(records, owners), kernel, owners))
    if not owners or not named:
        return first
    table = _owned_table(records, named)
    return advise(_facts(ev, req, settings, table, kernel, owners))


def _certificates_installed() -> bool:
    from rebind.kernel.birth_pins import open_map

    fd = open_map()
    if fd is None:
        return False
    os.close(fd)
    return True


def _with_births(records: list[SocketRecord], named: set[int], port: int) -> list[SocketRecord] | None:
    """The records, the named blockers with their birth certificates (``rebind trace
    --install``), which live in each socket's sk_storage: the bind hash's records carry none,
    inet_diag returns them. The named full sockets are listeners here nearly always, and a
    LISTEN-only dump of the port walks the listening hash alone (inet_diag_dump_icsk skips the
    established hash when no other state is asked), so this costs no table walk. A named
    connection holding the port sends the snapshot to the dumps (None): never a blocker shown
    without the name its certificate gives. Nothing is missed for the others: a TIME_WAIT has no
    storage (inet_twsk_alloc copies none), and inet_diag returns none for a bound-inactive
    socket either (inet_sk_diag_fill leaves before the storage when it has no icsk, as for
    the bhash2 walk's sockets)."""
    from dataclasses import replace

    from rebind.errors import RebindError
    from rebind.kernel.walk import walk
    from rebind.model.query import SocketQuery
    from rebind.model.records import Proto, State

    if any(r.inode in named and r.state not in (State.LISTEN, State.BOUND_INACTIVE) for r in records):
        return None
    query = SocketQuery.create(ports=[port], protos=[Proto.TCP], states=[State.LISTEN])
    try:
        listeners = walk(query, netlink_only=True).records
    except (OSError, RebindError):
        return None
    births = {r.inode: r.birth for r in listeners if r.inode in named and r.birth is not None}
    return [replace(r, birth=births[r.inode]) if r.inode in births else r for r in records]


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
    from rebind.model.records import SocketTable

    # SocketEntry(r) for each, built in a plain class of its slots (rebind/slotted.py)
    entries = []
    for r in records:
        e = _EntrySlots()
        e.socket, e.owners, e.netns_name = r, (), None
        e.__class__ = SocketEntry
        entries.append(e)
    return SocketTable(tuple(entries), source=SOURCE, owners_scanned=owners)


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
