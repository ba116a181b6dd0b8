"""Can this be bound now? One pure answer for `why`, the exporter and `top` (issue 17 item 4).

Input: a request, the sockets on its port with whatever is known of their flags (and how it is
known), and the kernel settings. Output: a :class:`Judgement` -- BINDABLE, BUSY, REFUSED or
UNKNOWN, with the sockets that block and, when UNKNOWN, the facts that are missing. The rules
themselves are ``model.conflict`` (``evaluate``); this module only turns its outcome into the
one answer every caller shares, so a fact that nobody could read never becomes an optimistic yes.

Nothing here does I/O or binds: callers gather the facts (``kernel/facts.py`` for `why`,
``exporter/gather.py``, ``top/sampler.py``) and pass them in.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rebind.model.conflict import (
    Blocker,
    BucketState,
    Flag,
    Holder,
    KernelSettings,
    Outcome,
    PortState,
    SockOpts,
    Verdict,
    evaluate,
)
from rebind.model.records import Family, Proto, SocketEntry, SocketRecord
from rebind.model.request import BindRequest
from rebind.model.sockstate import BindBucket, SockKind, SockState

AF_INET6 = 10  # socket.AF_INET6 on Linux (this module does no I/O and imports no socket)


class Provenance(enum.StrEnum):
    """Where a socket's SO_REUSEADDR / SO_REUSEPORT (/ IPV6_V6ONLY) came from."""

    #: Read from the kernel's own socket (a BPF socket iterator: sk_reuse, tw_reuse, ...). Exact,
    #: for every socket, TIME_WAIT and sockets of invisible owners included.
    KERNEL = "kernel"
    READ = "read"  # pidfd_getfd + getsockopt on the socket itself
    INFERRED_LISTENER = "inferred-listener"  # a child or its TIME_WAIT copies its listener's flags
    INFERRED_TRIAL = "inferred-trial"  # the only values consistent with the kernel's trial binds
    #: A stated assumption of the caller, never a fact: the exporter's "an unread server sets
    #: SO_REUSEADDR", applied alike to the restart and to the live listener's own children.
    ASSUMED = "assumed"
    UNKNOWN = "unknown"

    @property
    def exact(self) -> bool:
        """Facts the answer may rest on without a caveat."""
        return self in (Provenance.KERNEL, Provenance.READ, Provenance.INFERRED_LISTENER)


@dataclass(frozen=True, slots=True)
class HolderFacts:
    """One socket on the port with what is known of its flags, and how it is known."""

    entry: SocketEntry
    opts: SockOpts = field(default_factory=SockOpts)
    provenance: Provenance = Provenance.UNKNOWN
    #: The socket as the kernel holds it (BPF iterator): userlocks, bind bucket cache, chain.
    kernel: SockState | None = None

    @property
    def holder(self) -> Holder:
        return Holder(self.entry.socket, self.opts)


class BindNow(enum.StrEnum):
    """The answer, one word."""

    BINDABLE = "bindable"  # bind() works now (and listen(), when asked)
    BUSY = "busy"  # EADDRINUSE at bind() or listen(): sockets hold the port
    REFUSED = "refused"  # no socket involved: EACCES, EADDRNOTAVAIL, EINVAL
    UNKNOWN = "unknown"  # depends on facts nobody could read (``Judgement.missing``)


@dataclass(frozen=True, slots=True)
class Judgement:
    """Bindable now, busy, refused or unknown, with the outcome that says why."""

    request: BindRequest
    now: BindNow
    #: The conflict model's outcome (stage, errno, every blocker with its reason).
    outcome: Outcome
    #: When UNKNOWN, the facts that decide it (SO_REUSEADDR of a TIME_WAIT, ...); else empty.
    missing: tuple[Flag, ...] = ()

    @property
    def bindable(self) -> bool:
        """True only for a certain yes: UNKNOWN is not bindable."""
        return self.now is BindNow.BINDABLE

    @property
    def blockers(self) -> tuple[Blocker, ...]:
        """The sockets that block (certain) or may block (uncertain, when UNKNOWN)."""
        return self.outcome.blockers


def judge(
    request: BindRequest,
    holders: Iterable[Holder | HolderFacts],
    settings: KernelSettings,
    *,
    port: PortState | None = None,
) -> Judgement:
    """The one "can this be bound now?" answer (no trial bind: nothing is bound).

    ``holders``: the sockets on the port (UDP: in hash-chain order, see
    ``conflict.udp_chain_order``), with unknown flags as ``None`` in their ``SockOpts``: the
    conflict model reports DEPENDS where such a flag decides, and that is UNKNOWN here, with the
    flags named in ``missing``.
    """
    hs = [h.holder if isinstance(h, HolderFacts) else h for h in holders]
    # port: the bucket's fast-reuse state (tb->fastreuse*) when read; not given = unknown, and an
    # answer that hinges on it becomes UNKNOWN (never an optimistic BINDABLE).
    outcome = evaluate(request, hs, settings, port=port)
    return judgement_of(request, outcome)


def judgement_of(request: BindRequest, outcome: Outcome) -> Judgement:
    """The answer for an outcome ``conflict.evaluate`` gave (callers that already ran it)."""
    if outcome.verdict is Verdict.OK:
        return Judgement(request, BindNow.BINDABLE, outcome)
    if outcome.verdict is Verdict.DEPENDS:
        flags = {f for b in outcome.blockers if not b.certain for f in b.decided_by}
        return Judgement(request, BindNow.UNKNOWN, outcome, tuple(f for f in Flag if f in flags))
    if outcome.errno == errno.EADDRINUSE:
        return Judgement(request, BindNow.BUSY, outcome)
    return Judgement(request, BindNow.REFUSED, outcome)


def port_state(
    req: BindRequest, holders: tuple[HolderFacts, ...]
) -> tuple[tuple[HolderFacts, ...], PortState | None]:
    """The port's kernel state for the model, from what the socket iterator read beside each
    holder (``HolderFacts.kernel``): the TCP bind bucket's fast-reuse fields (one bucket per port
    and netns: every socket's icsk_bind_hash points at it), and the UDP holders put in the order
    of the chain udp_lib_lport_inuse walks (None unless every UDP holder's place was read).
    The one derivation for `why` (kernel/facts.py), the exporter and `top`."""
    if not holders:
        return holders, None
    if req.proto is Proto.UDP:
        if any(h.kernel is None for h in holders):
            return holders, None
        pos = [h.kernel.chain.port_index if h.kernel and h.kernel.chain else None for h in holders]
        if any(p is None for p in pos):
            return holders, None
        ordered = tuple(h for _, h in sorted(zip(pos, holders, strict=True), key=lambda x: x[0] or 0))
        return ordered, PortState(udp_chain_order=True)
    # Each distinct SockCommon once (records alike share one): hashing a BindBucket per holder
    # was most of this for ten thousand TIME_WAITs.
    commons = {id(h.kernel.common): h.kernel.common for h in holders if h.kernel is not None}
    # the port's inet_bind_bucket as each socket's copy shows it; a BindBucket also carries its
    # address's bind2 bucket (tb2), one per address: sockets on two addresses differ there
    # while sharing the port's one bucket, so compare the port-level fields alone
    buckets = {bucket_state(c.bucket) for c in commons.values() if c.bucket is not None}
    if len(buckets) != 1:
        return holders, None  # none read, or several (VRFs: one bucket per l3mdev)
    return holders, PortState(bucket=buckets.pop())


def bucket_state(b: BindBucket) -> BucketState:
    """sockstate.BindBucket -> the model's BucketState (the cached socket's address in its own
    family's form: sk_v6_rcv_saddr for an AF_INET6 socket, v4-mapped when on IPv4)."""
    addr = b.fast_v6_rcv_saddr if b.fast_sk_family == AF_INET6 else b.fast_rcv_saddr
    return BucketState(b.fastreuse, b.fastreuseport, b.fastuid, addr, b.fast_ipv6_only)


def kernel_state_of(r: SocketRecord, kernel: Mapping[int, SockState] | None) -> SockState | None:
    """The BPF iterator's / lookup's record of that very socket, joined by inet_diag's cookie;
    None for a request sock (it has no flags of its own: they are not its listener's)."""
    if not kernel or r.cookie is None:
        return None
    st = kernel.get(r.cookie)
    if st is None or st.kind is SockKind.REQUEST or st.proto is not r.proto or st.local.port != r.local.port:
        return None
    return st


def kernel_holder(entry: SocketEntry, st: SockState) -> HolderFacts:
    """A holder whose flags are the kernel's own sk_reuse / sk_reuseport / ipv6only (a TIME_WAIT's
    tw_* copies), whoever owns it (provenance ``kernel``), with its state attached."""
    v6 = st.ipv6only if st.family is Family.INET6 else None
    return HolderFacts(entry, SockOpts(st.reuseaddr, st.reuseport, v6), Provenance.KERNEL, st)
