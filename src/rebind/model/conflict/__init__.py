"""The Linux bind()/listen() conflict model (pure). Spec: docs/bind-rules.md.

The decision procedure of bind-rules.md §0: for each existing socket on the same port and
protocol, do the devices overlap, do the addresses overlap, and does an exemption apply? Plus
what the doc leaves out and the kernel oracle (tests/kernel/test_oracle.py) showed on 6.18:

* TCP ``tb->fastreuseport`` cache (``sk_reuseport_match``): a SO_REUSEPORT socket whose uid and
  address match the cache skips every conflict check (``check_bind_conflict = false`` in
  inet_csk_get_port, the address-any buckets included). Pass it in ``PortState.bucket`` if known.
* UDP ``udp_lib_lport_inuse``: upstream returns at the *first* relevant socket in hash-chain
  order (a same-uid SO_REUSEPORT socket there lets the bind through even if a later one would
  conflict); some builds of the same version check every socket. Which one runs here is
  ``KernelSettings.udp_first_match``, decided by a calibration experiment (kernel/calibrate.py);
  None = not calibrated, and an answer that hinges on it is DEPENDS. With the early stop the
  chain order matters: ``PortState.udp_chain_order`` says the holders are given in it
  (``udp_chain_order`` rebuilds it from bind order: newest first, except IPv6 SO_REUSEPORT
  sockets, appended at the tail); unknown order where it matters is DEPENDS too.
* The TCP bucket's fast-reuse fields are an input (``BucketState``, read by a BPF iterator);
  unknown means the SO_REUSEPORT fast path may or may not apply: never an optimistic answer.

Rooms: ``inputs`` (holders, kernel settings, the port's state), ``outcome`` (verdict, rules,
blockers), ``addresses`` (inet_rcv_saddr_equal, which holders are compared), ``precheck``
(EACCES / EADDRNOTAVAIL / EINVAL before get_port), ``unknowns`` (facts nobody could read),
``tcp`` (inet_bind_conflict per holder, the bhash2 search), ``bucket`` (the TCP bucket's
fast-reuse cache and ``probe_is_harmless``), ``udp`` (udp_lib_lport_inuse), ``words``. This
module puts them together: ``evaluate`` (bind(), then listen()), ``check_listen``,
``alternatives``; every public name is importable from here.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

from rebind.model.conflict import tcp, udp
from rebind.model.conflict.addresses import effective_v6only as effective_v6only
from rebind.model.conflict.addresses import overlap as overlap
from rebind.model.conflict.addresses import relevant
from rebind.model.conflict.bucket import bucket_after as bucket_after
from rebind.model.conflict.bucket import fast_path as fast_path
from rebind.model.conflict.bucket import probe_is_harmless as probe_is_harmless
from rebind.model.conflict.bucket import reuseport_cache_after as reuseport_cache_after
from rebind.model.conflict.inputs import FASTREUSEPORT_ANY as FASTREUSEPORT_ANY
from rebind.model.conflict.inputs import FASTREUSEPORT_STRICT as FASTREUSEPORT_STRICT
from rebind.model.conflict.inputs import AddrFlag as AddrFlag
from rebind.model.conflict.inputs import AddrState as AddrState
from rebind.model.conflict.inputs import BucketState as BucketState
from rebind.model.conflict.inputs import Holder as Holder
from rebind.model.conflict.inputs import KernelSettings as KernelSettings
from rebind.model.conflict.inputs import PortState as PortState
from rebind.model.conflict.inputs import ReuseportCache as ReuseportCache
from rebind.model.conflict.inputs import SockOpts as SockOpts
from rebind.model.conflict.outcome import Alternative as Alternative
from rebind.model.conflict.outcome import Blocker as Blocker
from rebind.model.conflict.outcome import Check
from rebind.model.conflict.outcome import Flag as Flag
from rebind.model.conflict.outcome import Outcome as Outcome
from rebind.model.conflict.outcome import Rule as Rule
from rebind.model.conflict.outcome import Stage as Stage
from rebind.model.conflict.outcome import Verdict as Verdict
from rebind.model.conflict.precheck import pre_checks
from rebind.model.conflict.udp import udp_chain_order as udp_chain_order
from rebind.model.conflict.words import race_note, unknown_notes
from rebind.model.records import IPAddress, Proto, State
from rebind.model.request import BindRequest as BindRequest  # re-exported: its old home


def _check(
    req: BindRequest, holders: Sequence[Holder], settings: KernelSettings, port: PortState, stage: Stage
) -> Check:
    if req.proto is Proto.UDP:
        return udp.check(req, holders, settings, port.udp_chain_order)
    return tcp.check(req, holders, settings, port.bucket, stage)


def _race_notes(req: BindRequest, holders: Sequence[Holder], settings: KernelSettings) -> list[str]:
    """Bound-inactive SO_REUSEADDR peers: whoever calls listen() first wins (C3, D7)."""
    if req.proto is not Proto.TCP or not req.reuseaddr:
        return []
    return [
        race_note(h)
        for h, _ in relevant(req, holders, settings)
        if h.socket.state is State.BOUND_INACTIVE and h.opts.reuseaddr is not False
    ]


def _as_outcome(c: Check, stage: Stage, notes: list[str]) -> Outcome:
    # bind() and listen() both run get_port's checks: a note both stages make (the SO_REUSEPORT
    # fast path, an unknown flag's "depends") is said once, in the order first made.
    all_notes = tuple(dict.fromkeys(notes + list(c.notes) + unknown_notes(c.blockers)))
    if c.verdict is Verdict.OK:
        return Outcome(Verdict.OK, notes=all_notes)
    return Outcome(c.verdict, errno.EADDRINUSE, stage, c.blockers, all_notes)


def evaluate(
    req: BindRequest, holders: Iterable[Holder], settings: KernelSettings, *, port: PortState | None = None
) -> Outcome:
    """Predict bind() (and, for TCP with ``req.listen``, listen()) against the sockets on the port.

    ``holders``: the sockets in this netns (others are ignored: other port/protocol). ``port``:
    what the kernel keeps beside them (the TCP bucket's fast-reuse fields, whether the UDP
    holders are in hash-chain order); not given = unknown, and an answer that hinges on it is
    DEPENDS. A known SO_REUSEPORT cache, as the kernel oracle tracks it, is
    ``PortState(BucketState.of_cache(cache))``.
    """
    hs = list(holders)
    ps = port if port is not None else PortState()
    pre = pre_checks(req, settings)
    if pre is not None:
        return pre
    if req.port == 0:
        return Outcome(Verdict.OK, notes=("port 0: the kernel picks a free port (inet_csk_find_open_port)",))
    bound = _check(req, hs, settings, ps, Stage.BIND)
    if bound.verdict is not Verdict.OK or req.proto is not Proto.TCP or not req.listen:
        return _as_outcome(bound, Stage.BIND, _race_notes(req, hs, settings))
    # listen(): inet_csk_listen_start() runs get_port again, now that our bind joined the bucket.
    after = replace(ps, bucket=bucket_after(ps.bucket, req, settings))
    listened = _check(req, hs, settings, after, Stage.LISTEN)
    notes = list(bound.notes) + _race_notes(req, hs, settings)
    return _as_outcome(listened, Stage.LISTEN, notes)


def check_listen(
    req: BindRequest, holders: Iterable[Holder], settings: KernelSettings, *, port: PortState | None = None
) -> Outcome:
    """Predict listen() for a TCP socket that is already bound as ``req`` describes.

    ``holders`` must not include the socket itself. ``port`` is the bucket state now (after the
    socket's own bind and whatever joined since).
    """
    if req.proto is not Proto.TCP:
        raise ValueError("listen() is TCP only")
    check = _check(req, list(holders), settings, port if port is not None else PortState(), Stage.LISTEN)
    return _as_outcome(check, Stage.LISTEN, [])


def other_addresses(req: BindRequest, settings: KernelSettings) -> list[tuple[IPAddress, bool | None]]:
    """Addresses worth offering: leftovers hold only their own concrete address (A3)."""
    cands: list[tuple[IPAddress, bool | None]] = [
        (IPv4Address("127.0.0.1"), None),
        (IPv4Address("127.0.0.2"), None),
        (IPv4Address("127.0.0.3"), None),
        (IPv6Address("::1"), None),
    ]
    if req.addr.version == 4 and req.addr.is_unspecified:
        cands.append((IPv6Address("::"), True))
    out = []
    for a, v6 in cands:
        if a == req.addr:
            continue
        if settings.local_addresses is not None and not a.is_loopback and a not in settings.local_addresses:
            continue
        out.append((a, v6))
    return out


def alternative_requests(req: BindRequest, settings: KernelSettings) -> list[BindRequest]:
    """The same bind on the other addresses worth offering (in the order they are tried)."""
    return [
        replace(req, addr=a, v6only=v6 if a.version == 6 else None)
        for a, v6 in other_addresses(req, settings)
    ]


def alternatives(
    req: BindRequest,
    holders: Iterable[Holder],
    settings: KernelSettings,
    *,
    port: PortState | None = None,
    works: Callable[[Alternative], bool] | None = None,
) -> tuple[Alternative, ...]:
    """What else could be bound now: plain / SO_REUSEADDR / SO_REUSEPORT / another address.

    Every variant is returned with its prediction (check ``.works``); at most one of the other
    addresses (the first that works) is included. ``works`` overrides what "works" means for
    that choice (`why` passes the kernel's trial where one ran).
    """
    hs = list(holders)
    ps = port if port is not None else PortState()
    flag_variants = [
        ("as asked", req),
        ("plain bind()", replace(req, reuseaddr=False, reuseport=False)),
        ("with SO_REUSEADDR", replace(req, reuseaddr=True, reuseport=False)),
        ("with SO_REUSEPORT", replace(req, reuseaddr=False, reuseport=True)),
        ("with SO_REUSEADDR and SO_REUSEPORT", replace(req, reuseaddr=True, reuseport=True)),
    ]
    out: list[Alternative] = []
    seen: set[BindRequest] = set()
    for label, r in flag_variants:
        if r not in seen:
            seen.add(r)
            out.append(Alternative(label, r, evaluate(r, hs, settings, port=ps)))
    for r in alternative_requests(req, settings):
        a, v6 = r.addr, r.v6only
        shown = f"[{a}]" if a.version == 6 else str(a)
        alt = Alternative(
            f"on {shown}" + (" (IPV6_V6ONLY)" if v6 else ""), r, evaluate(r, hs, settings, port=ps)
        )
        if works(alt) if works is not None else alt.works:
            out.append(alt)
            break
    return tuple(out)
