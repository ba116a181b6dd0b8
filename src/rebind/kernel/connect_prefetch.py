"""Start `rebind why --connect ADDR:PORT`'s walk of the socket table while the CLI is importing
(as :mod:`rebind.kernel.prefetch` does for `ls PORT`): the first dump of the bind-hash path
(kernel/connect_dump.py) needs the request alone, and is mostly kernel time with the GIL released
(~75-130 ms on 211k sockets, whatever the filter), so it overlaps the imports instead of following
them. The rest of the gathering (settings, the bind hash, owners, all Python between short
syscalls) runs in the CLI's thread once it has imported: run in this thread too it only shared
the GIL with the imports, and the handing over cost ~20 ms of CPU (docs/benchmarks.md,
2026-12-06).

Only a plain request is prefetched: a literal address (a name is resolved by the CLI, once), and
no option but --from, --reuseaddr, --bind-before-connect, --udp, --json. The CLI then takes the
dump only if the request it built is equal (:func:`take`); anything else -- a failure in the
thread included -- and it gathers as usual, reporting errors itself. This module imports
nothing heavy: the worker thread imports the reader.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rebind.kernel.connect_dump import FirstDump
    from rebind.model.connect import ConnectRequest

_FLAGS = frozenset({"--json", "--reuseaddr", "--bind-before-connect", "--udp"})


def plain_request(argv: list[str]) -> tuple[str, str | None, frozenset[str]] | None:
    """(target, source, flags) of a plain ``why --connect TARGET [--from SOURCE] [flags]``,
    None for anything else."""
    if not argv or argv[0] != "why":
        return None
    target: str | None = None
    source: str | None = None
    flags: set[str] = set()
    rest = iter(argv[1:])
    for a in rest:
        opt, eq, val = a.partition("=")
        if opt in ("--connect", "--from"):
            value = val if eq else next(rest, None)
            if value is None:
                return None
            if opt == "--connect":
                target = value
            else:
                source = value
        elif a in _FLAGS:
            flags.add(a)
        else:
            return None
    return None if target is None else (target, source, frozenset(flags))


class _Job:
    def __init__(self, target: str, source: str | None, flags: frozenset[str]) -> None:
        self.args = (target, source, flags)
        self.request: ConnectRequest | None = None
        self.first: FirstDump | None = None
        self.thread = threading.Thread(target=self._run, name="rebind-connect-prefetch", daemon=True)

    def _run(self) -> None:
        try:
            from ipaddress import ip_address

            from rebind.model.addr import parse_source, parse_target, unbracket
            from rebind.model.connect.request import ConnectRequest

            target, source, flags = self.args
            host, port = parse_target(target)
            dst = ip_address(unbracket(host))  # a name: the CLI resolves it (ValueError here)
            src, local_port = parse_source(source) if source else (None, None)
            udp = "--udp" in flags
            req = ConnectRequest.create(
                dst,
                port,
                src=src,
                proto="udp" if udp else "tcp",
                bind_before_connect="--bind-before-connect" in flags,
                local_port=local_port,
                reuseaddr="--reuseaddr" in flags,
            )
            from rebind.kernel.connect_dump import FirstDump, worth_starting
            from rebind.kernel.hz import known_hz

            # with HZ known the gathering names its sockets by lookups (kernel/connect_lookup.py):
            # a walk of the table started now would be thrown away
            if worth_starting(req) and known_hz() is None:
                self.first = FirstDump(req)
            self.request = req
        except BaseException:  # the CLI gathers again and reports properly
            self.first = self.request = None


_job: _Job | None = None


def start(argv: list[str]) -> None:
    """Start the first dump of a plain `why --connect` from a background thread (see the module
    docstring)."""
    global _job
    if _job is not None or os.environ.get("REBIND_FORCE_PROCFS"):
        return
    got = plain_request(argv)
    if got is None:
        return
    _job = _Job(*got)
    _job.thread.start()


def take(req: ConnectRequest) -> FirstDump | None:
    """The first dump started for exactly ``req`` (used once), else None."""
    global _job
    job = _job
    if job is None:
        return None
    _job = None
    job.thread.join()
    return job.first if job.request == req else None
