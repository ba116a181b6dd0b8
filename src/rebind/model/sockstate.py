"""What the kernel itself holds about each bound socket, as read by the BPF socket iterator.

Pure vocabulary (no I/O): :mod:`rebind.kernel.bpf.sockiter` fills it; the why gatherer
(kernel/facts.py) puts it beside each holder; the conflict model may use the bind bucket's
fast-reuse cache and the UDP chain order. Everything here has provenance ``kernel``: it is the
kernel's own field, not an inference.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.model.records import Endpoint, Family, Proto, State

# include/net/sock.h: sk_userlocks bits
SOCK_SNDBUF_LOCK = 1
SOCK_RCVBUF_LOCK = 2
SOCK_BINDADDR_LOCK = 4  # bind() to a specific address (inet_bind_sk)
SOCK_BINDPORT_LOCK = 8  # bind() to a port, explicit or chosen by bind(ip, 0)
SOCK_CONNECT_BIND = 16  # Linux 6.18: the port was chosen by connect() (__inet_hash_connect)

# include/net/sock.h: sk_reuse values
SK_NO_REUSE, SK_CAN_REUSE, SK_FORCE_REUSE = 0, 1, 2

# include/net/inet_hashtables.h: inet_bind_bucket.fastreuseport values
FASTREUSEPORT_ANY, FASTREUSEPORT_STRICT = 1, 2


class SockKind(enum.StrEnum):
    """What the iterated object is: the iterators hand out struct sock_common for all three."""

    FULL = "full"  # struct sock: listening, connected, bound
    TIMEWAIT = "timewait"  # struct inet_timewait_sock (TIME_WAIT, or FIN_WAIT2 kept as one)
    REQUEST = "request"  # struct request_sock (NEW_SYN_RECV): no flags of its own


@dataclass(frozen=True, slots=True)
class BindBucket:
    """A TCP port's ``struct inet_bind_bucket`` (net/ipv4/inet_connection_sock.c): the cache
    inet_csk_bind_conflict is skipped by (``inet_csk_bind_conflict`` runs only when
    ``sk_reuseport_match``/``fastreuse`` do not already allow the bind)."""

    port: int
    #: -1: a bucket made by connect() (6.18: not shared with bind()); 0: no; 1: every owner
    #: had SO_REUSEADDR and none listens.
    fastreuse: int
    #: 0, FASTREUSEPORT_ANY (1), FASTREUSEPORT_STRICT (2), or -1 (connect()-made, 6.18)
    fastreuseport: int
    #: The SO_REUSEPORT owner the cache was made for. The kernel writes these only when it sets
    #: fastreuseport > 0 and reads them only then (sk_reuseport_match): None otherwise, as the
    #: bucket's memory holds leftovers there.
    fastuid: int | None
    fast_rcv_saddr: IPv4Address | None
    fast_v6_rcv_saddr: IPv6Address | None
    fast_sk_family: int | None
    fast_ipv6_only: bool | None
    #: The socket's (port, address) ``inet_bind2_bucket`` cache (6.18 keeps one per bhash2
    #: bucket; inet_bind_bucket_destroy derives the port's from them): None where not read.
    bind2_fastreuse: int | None = None
    bind2_fastreuseport: int | None = None

    @property
    def connect_made(self) -> bool:
        return connect_made(self.fastreuse, self.fastreuseport)


def connect_made(fastreuse: int, fastreuseport: int) -> bool:
    """Did __inet_hash_connect make the bucket (fastreuse and fastreuseport both -1)? Only such a
    port may be shared by another connect(); any other bucket was made by bind(), and connect()
    skips its port for every destination (connect-rules.md C6)."""
    return fastreuse < 0 and fastreuseport < 0


@dataclass(frozen=True, slots=True)
class PortBucket:
    """A TCP port's bind bucket(s) of one network namespace, read from the kernel's bind hash
    (kernel/bpf/bindhash.py), not through a socket: whether the port is held at all, and by what
    kind of bucket. One object may serve many ports (it holds no port: equal buckets share it).

    ``buckets``: how many ``inet_bind_bucket``s of the namespace match the port (0: nobody holds
    it, so bind() or connect() would create it; more than 1 only with l3mdev/VRF binds). The
    other fields are the first matched bucket's (the chain's newest), None where none matched."""

    buckets: int
    #: -1 (connect()-made, 6.18), 0, 1 -- as BindBucket.fastreuse
    fastreuse: int | None = None
    fastreuseport: int | None = None
    #: the fast-reuse cache (sk_reuseport_match): read only where fastreuseport > 0, else None
    fastuid: int | None = None
    fast_rcv_saddr: IPv4Address | None = None
    fast_v6_rcv_saddr: IPv6Address | None = None
    fast_sk_family: int | None = None
    fast_ipv6_only: bool | None = None
    l3mdev: int | None = None
    #: bind2 buckets (one per bound address) of the first matched bucket, counted up to a bound
    bind2: int = 0
    #: sockets (full and TIME_WAIT) in those bind2 buckets, counted up to a bound per bucket;
    #: None where not asked for (read_port_buckets(owners=True))
    owners: int | None = None
    #: the walk stopped at a bound: a bucket may lie further on (``chain``: then even
    #: ``buckets`` == 0 is not "free"), or ``bind2``/``owners`` are lower bounds
    chain_truncated: bool = False
    counts_truncated: bool = False
    #: a copy faulted, or a bind2 bucket of another port was met (freed mid-walk): unknown
    faulted: bool = False

    @property
    def known(self) -> bool:
        """Whether ``buckets`` can be trusted (no fault, the chain walked to its end)."""
        return not (self.faulted or self.chain_truncated)

    @property
    def exists(self) -> bool:
        return self.buckets > 0

    @property
    def connect_made(self) -> bool:
        return (
            self.fastreuse is not None
            and self.fastreuseport is not None
            and connect_made(self.fastreuse, self.fastreuseport)
        )

    def bind_bucket(self, port: int) -> BindBucket | None:
        """The first matched bucket as the socket readers give it (BindBucket)."""
        if not self.buckets or self.fastreuse is None or self.fastreuseport is None:
            return None
        return BindBucket(
            port, self.fastreuse, self.fastreuseport, self.fastuid, self.fast_rcv_saddr,
            self.fast_v6_rcv_saddr, self.fast_sk_family, self.fast_ipv6_only,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PortOwners:
    """Every socket of a TCP port's bind buckets in one network namespace, walked from the bind
    hash (kernel/bpf/bindhash.py: read_port_owners): all its l3mdev buckets, all their bind2
    buckets (addresses), all their owners (full sockets and TIME_WAITs)."""

    netns: int
    port: int
    sockets: tuple[SockState, ...]
    #: matched buckets and the bind2 buckets walked
    buckets: int = 0
    bind2: int = 0
    #: more owners than ``limit``: the rest were not read
    truncated: bool = False
    #: records left out: a copy faulted, or a socket of another port or namespace was met
    #: (freed and reused mid-walk); non-zero means "not seen" is not "not there"
    faulted: int = 0
    #: the walk stopped on an inconsistency (a bind2 bucket or socket of another port/namespace)
    inconsistent: bool = False


@dataclass(frozen=True, slots=True)
class ChainPos:
    """Where a UDP socket sits in the kernel's hash chains (their order decides, see below).

    ``port_index``: position, from 0, among the port's sockets in its ``udptable->hash`` chain
    (keyed by port; ``sk_node``), the chain udp_lib_lport_inuse walks for bind() while the slot
    holds at most 10 sockets -- and where it may stop at the first SO_REUSEPORT match. None when
    the chain was longer than the program follows. Newer sockets are added at the head.

    ``bucket``/``index``: the slot the iterator walked and the position among the reported
    sockets in it (6.7+: a ``udptable->hash2`` slot, keyed by address and port: the chain
    udp4_lib_lookup2 scores for delivery, and lport_inuse2 for bind() in big slots)."""

    bucket: int
    index: int
    port_index: int | None = None


@dataclass(frozen=True, slots=True)
class SockCommon:
    """What a socket shares with others like it: a port's ten thousand TIME_WAITs differ only in
    their peer, cookie and timestamps. Decoded once per distinct value (kernel/bpf/sockdecode.py):
    building a 22-field SockState per socket was most of reading a port's TIME_WAITs
    (bench/whyperf.py, docs/benchmarks.md). Read through :class:`SockState`'s properties."""

    proto: Proto
    family: Family
    state: State
    kind: SockKind
    local: Endpoint
    netns: int
    #: The owner uid as /proc and inet_diag show it (None for TIME_WAIT: it has no owner).
    uid: int | None
    #: sk_uid, the kuid SO_REUSEPORT compares (full sockets only).
    sk_uid: int | None
    bound_dev_if: int
    #: skc_reuse: SK_NO_REUSE / SK_CAN_REUSE (SO_REUSEADDR) / SK_FORCE_REUSE
    reuse: int
    reuseport: bool
    ipv6only: bool
    #: sk_userlocks (full sockets): SOCK_BINDPORT_LOCK etc.; None for TIME_WAIT and requests.
    userlocks: int | None
    tw_substate: State | None = None
    #: inet_timewait_sock.tw_connect_bind (6.18); None elsewhere or where the kernel lacks it
    tw_connect_bind: bool | None = None
    bucket: BindBucket | None = None


@dataclass(frozen=True, slots=True)
class SockState:
    """One socket as the kernel holds it: what it shares with others (:class:`SockCommon`, its
    fields are properties here) and what is its own. Fields not meaningful for a kind are None."""

    common: SockCommon
    remote: Endpoint
    cookie: int
    #: tcp_timewait_sock: what tcp_twsk_unique compares (None unless TIME_WAIT)
    tw_ts_recent: int | None = None
    tw_ts_recent_stamp: int | None = None
    chain: ChainPos | None = None
    #: the iterator's visiting order (bpf_iter_meta.seq_num)
    seq: int = 0

    @classmethod
    def make(
        cls,
        *,
        proto: Proto,
        family: Family,
        state: State,
        kind: SockKind,
        local: Endpoint,
        remote: Endpoint,
        cookie: int,
        netns: int,
        uid: int | None,
        sk_uid: int | None,
        bound_dev_if: int,
        reuse: int,
        reuseport: bool,
        ipv6only: bool,
        userlocks: int | None,
        tw_substate: State | None = None,
        tw_ts_recent: int | None = None,
        tw_ts_recent_stamp: int | None = None,
        tw_connect_bind: bool | None = None,
        bucket: BindBucket | None = None,
        chain: ChainPos | None = None,
        seq: int = 0,
    ) -> SockState:
        """One socket from every field by name (a hand-built state: tests, callers without a
        record); the decoders share the SockCommon instead."""
        common = SockCommon(
            proto, family, state, kind, local, netns, uid, sk_uid, bound_dev_if, reuse, reuseport,
            ipv6only, userlocks, tw_substate, tw_connect_bind, bucket,
        )  # fmt: skip
        return cls(common, remote, cookie, tw_ts_recent, tw_ts_recent_stamp, chain, seq)

    @property
    def proto(self) -> Proto:
        return self.common.proto

    @property
    def family(self) -> Family:
        return self.common.family

    @property
    def state(self) -> State:
        return self.common.state

    @property
    def kind(self) -> SockKind:
        return self.common.kind

    @property
    def local(self) -> Endpoint:
        return self.common.local

    @property
    def netns(self) -> int:
        return self.common.netns

    @property
    def uid(self) -> int | None:
        return self.common.uid

    @property
    def sk_uid(self) -> int | None:
        return self.common.sk_uid

    @property
    def bound_dev_if(self) -> int:
        return self.common.bound_dev_if

    @property
    def reuse(self) -> int:
        return self.common.reuse

    @property
    def reuseport(self) -> bool:
        return self.common.reuseport

    @property
    def ipv6only(self) -> bool:
        return self.common.ipv6only

    @property
    def userlocks(self) -> int | None:
        return self.common.userlocks

    @property
    def tw_substate(self) -> State | None:
        return self.common.tw_substate

    @property
    def tw_connect_bind(self) -> bool | None:
        return self.common.tw_connect_bind

    @property
    def bucket(self) -> BindBucket | None:
        return self.common.bucket

    @property
    def reuseaddr(self) -> bool:
        return self.common.reuse != SK_NO_REUSE

    @property
    def port_locked(self) -> bool | None:
        """SOCK_BINDPORT_LOCK: bind() named the port (inet_bind_sk sets it for a non-zero port
        only: bind(ip, 0) sets SOCK_BINDADDR_LOCK alone, and connect()'s autobind neither);
        None where the kernel keeps no such bit (TIME_WAIT, request)."""
        locks = self.common.userlocks
        return None if locks is None else bool(locks & SOCK_BINDPORT_LOCK)

    @property
    def addr_locked(self) -> bool | None:
        locks = self.common.userlocks
        return None if locks is None else bool(locks & SOCK_BINDADDR_LOCK)


@dataclass(frozen=True, slots=True)
class SockStates:
    """The iterator's answer for some ports in one network namespace."""

    netns: int
    sockets: tuple[SockState, ...]
    #: Records whose copies faulted (a socket freed mid-read): left out, so "not seen" is not
    #: "not there" when this is non-zero.
    faulted: int = 0
    #: TCP listening sockets only (the walk stopped where the established hash begins): a TCP
    #: socket of another state missing here was not looked for.
    listeners_only: bool = False

    def by_cookie(self) -> dict[int, SockState]:
        return {s.cookie: s for s in self.sockets}


@dataclass(frozen=True, slots=True)
class PortStateCounts:
    """Count mode: sockets per (proto, port, state), counted in the kernel."""

    netns: int
    counts: tuple[tuple[Proto, int, State, int], ...]

    def get(self, proto: Proto, port: int, state: State) -> int:
        return sum(n for p, q, s, n in self.counts if (p, q, s) == (proto, port, state))


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The iterator cannot run here; the caller falls back and marks what it could not read."""

    reason: str
