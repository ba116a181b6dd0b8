"""One pause of the cyclic garbage collector, for the gatherers that build a table of many
small objects at once (kernel/facts.py for `why`, kernel/connect_facts.py for `why --connect`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection while the body runs; the collector's state restored after.

    A gatherer allocates a few objects per socket (records, entries, owners, holders, kernel
    states: 10k on a TIME_WAIT port, 100k in a busy ephemeral range), none in a cycle, and
    frees almost none, so each generation-0 collection triggers the next and the full
    collections walk the whole growing table (one full collection cost `why 9000` more than
    the kernel read; ~20% of `why --connect`: docs/benchmarks.md). Reference counting still
    frees what is dropped; a cycle made meanwhile waits for the next collection. The switch is
    process-wide: other threads run without the cyclic GC meanwhile too, and a caller that had
    it off (or a concurrent pause that found it off) keeps it off. The API is called from
    long-running processes (top, exporter), hence the restore.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
