"""The blockers behind one traced failure, read at once in the failing socket's namespace.

For a bind or listen this is `rebind why`'s pipeline, observer-free (``gather(...,
trials=False)``: nothing is bound, so watching never changes what it watches) then
``advise``; for a connect, the client-port model (``kernel/connect_facts.gather`` then
``evaluate_connect``). The failing socket itself is left out of the table: a listen() fails on a
socket that is already bound to the port, and it must not be named as its own blocker.

The namespace is entered on the *calling* thread and left again (``setns`` back to the one we
came from), not on a worker thread as kernel/namespaces.py does: the gatherers read
``/proc/net/*`` (IPv4 local addresses from fib_trie, IPv6 from if_inet6), and ``/proc/net`` is
``/proc/self/net``, the namespace of the thread-group *leader*. A worker thread in the event's
namespace would judge EADDRNOTAVAIL with the addresses of ours. `rebind trace` reads its ring
on that one thread, so nothing else runs meanwhile.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from rebind.errors import EnvironmentProblem, RebindError
from rebind.model.records import Proto, SocketTable
from rebind.model.request import BindRequest, TrialResult
from rebind.model.trace import Kind, Snapshot, TraceEvent, from_connect, from_diagnosis, unavailable

if TYPE_CHECKING:
    from rebind.model.advice import Facts


def _open_netns(ev: TraceEvent) -> int:
    """An fd of the event's namespace: the failing thread's, else any process's or mount's."""
    for path in (f"/proc/{ev.pid}/task/{ev.tid}/ns/net", f"/proc/{ev.pid}/ns/net"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_ino == ev.netns:
            return fd
        os.close(fd)  # a reused pid, or the thread moved meanwhile
    from rebind.kernel.namespaces import list_namespaces

    for ns in list_namespaces().namespaces:
        if ns.inode == ev.netns:
            fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_ino == ev.netns:
                return fd
            os.close(fd)
    raise FileNotFoundError(f"network namespace net:[{ev.netns}] is gone")


@contextmanager
def in_netns(ev: TraceEvent) -> Iterator[None]:
    """Run the body in the event's network namespace (this thread), then come back."""
    from rebind.kernel.netns import setns_net

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(home).st_ino == ev.netns:
            yield
            return
        fd = _open_netns(ev)
        try:
            setns_net(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            setns_net(home)
    finally:
        os.close(home)


def bind_request(ev: TraceEvent) -> BindRequest | None:
    """What the failing bind() or listen() asked, as `why` asks it; None when not TCP/UDP."""
    if ev.proto is None or ev.addr is None:
        return None
    addr = ev.addr
    # A v4-mapped address on an AF_INET6 socket binds the IPv4 address (__inet6_bind).
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return BindRequest(
        proto=ev.proto,
        addr=addr,
        port=ev.port,
        reuseaddr=ev.reuseaddr,
        reuseport=ev.reuseport,
        v6only=ev.v6only if addr.version == 6 else None,
        ifindex=ev.bound_dev_if or ev.scope_id,
        uid=ev.uid,
        listen=ev.kind is Kind.LISTEN,
    )


def _without(table: SocketTable, inode: int) -> SocketTable:
    if not inode:
        return table
    return replace(table, entries=tuple(e for e in table.entries if e.socket.inode != inode))


def _bind_snapshot(ev: TraceEvent, owners: bool, bindhash: bool = True) -> Snapshot:
    from rebind.kernel.addrs import ipv6_addresses
    from rebind.kernel.facts import gather
    from rebind.kernel.sysctl import kernel_settings
    from rebind.kernel.walk import table as socket_table
    from rebind.model.advice import advise
    from rebind.model.query import SocketQuery

    req = bind_request(ev)
    if req is None:
        return unavailable("not a TCP or UDP socket")
    if req.port == 0:
        return unavailable("bind() to port 0: no port of the ephemeral range was free")
    # The privilege is the caller's, not ours: __inet_bind checks the address (EADDRNOTAVAIL),
    # then the port's privilege (EACCES: no CAP_NET_BIND_SERVICE over the netns), then conflicts
    # (EADDRINUSE). So EACCES says the caller lacked it; any other errno: judge as if it had it.
    settings = replace(
        kernel_settings(), ipv6_addresses=ipv6_addresses(), cap_net_bind_service=ev.errno != errno.EACCES
    )
    if bindhash and req.proto is Proto.TCP:
        # TCP: the port's sockets from its bind buckets (kernel/trace_bindhash.py), not from
        # inet_diag's dumps, which walk the whole namespace; None: that read could not vouch
        # for the port, and the dumps answer. UDP has no bind hash: always the dumps.
        from rebind.kernel.trace_bindhash import diagnose

        got = diagnose(ev, req, settings, owners)
        if got is not None:
            return from_diagnosis(got)
    query = SocketQuery.create(ports=[req.port], protos=[req.proto])
    table = _without(socket_table(query, owners=owners), ev.inode)
    facts = gather(req, owners=owners, table=table, trials=False, settings=settings)
    return from_diagnosis(advise(with_event_trial(ev, req, facts)))


def with_event_trial(ev: TraceEvent, req: BindRequest, facts: Facts) -> Facts:
    """For a bind(): the failed bind() *is* the kernel's answer to this very request, given a
    moment ago: the model uses it as `why` uses its trial bind (to settle flags nobody could
    read, e.g. a TIME_WAIT's SO_REUSEADDR once its server is gone). Nothing is bound by us."""
    if ev.kind is not Kind.BIND:
        return facts
    return replace(facts, trials={replace(req, listen=False): TrialResult(ok=False, errno=ev.errno)})


def prepare() -> str | None:
    """At the tracer's start: load the bind-hash owners program and calibrate HZ, so that the
    first snapshot pays neither (kernel/trace_bindhash.py). None when ready, else why not (the
    snapshots then take inet_diag's dumps)."""
    import importlib

    from rebind.kernel.trace_bindhash import prepare as prepare_bindhash

    # what a snapshot imports on its first use (the model, the owner scan and psutil, the
    # container attribution: ~60 ms of a first snapshot's ~75 ms), imported now instead
    for name in _FIRST_USE:
        importlib.import_module(name)
    return prepare_bindhash()


_FIRST_USE = (
    "rebind.kernel.addrs",
    "rebind.kernel.sysctl",
    "rebind.kernel.facts",
    "rebind.kernel.walk",
    "rebind.kernel.owners",
    "rebind.kernel.bpf.scan",
    "rebind.kernel.containers",
    "rebind.model.advice",
    "rebind.kernel.connect_facts",
    "rebind.model.connect",
    "psutil",
)


def _connect_snapshot(ev: TraceEvent, owners: bool) -> Snapshot:
    from rebind.kernel.connect_facts import gather
    from rebind.model.connect import ConnectRequest

    if ev.proto is None or ev.addr is None or ev.port == 0:
        return unavailable("not a TCP or UDP connect() to an inet address")
    dst = ev.addr
    if dst.version == 6 and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    src = ev.local_addr if ev.local_addr is not None and not ev.local_addr.is_unspecified else None
    if src is not None and src.version != dst.version:
        src = None
    req = ConnectRequest.create(
        dst,
        ev.port,
        src=src,
        proto=ev.proto,
        bind_before_connect=src is not None or bool(ev.local_port),
        bind_address_no_port=src is not None and not ev.local_port,
        local_port=ev.local_port or None,
        reuseaddr=ev.reuseaddr,
    )
    # the range from the bind hash, the named sockets by lookups, where they can be
    facts = gather(req, owners=owners, summary=True, lookups=True)
    return from_connect(facts.evaluate(req))


def snapshot(ev: TraceEvent, *, owners: bool = True, bindhash: bool = True) -> Snapshot:
    """The model's answer for the event's request, now, in its namespace; never raises for
    what another process did meanwhile (namespace gone, socket closed): says so instead.
    ``bindhash=False``: a TCP bind/listen's sockets from inet_diag's dumps, as before the
    bind-hash read (tests compare the two)."""
    try:
        with in_netns(ev):
            if ev.kind is Kind.CONNECT:
                snap = _connect_snapshot(ev, owners)
            else:
                snap = _bind_snapshot(ev, owners, bindhash)
    except (OSError, RebindError, ValueError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, EnvironmentProblem):
            text = str(exc)
        return unavailable(text)
    after = (time.monotonic_ns() - ev.mono_ns) / 1e6 if ev.mono_ns else None
    return replace(snap, after_ms=after)
