"""The facts the model decides by: the sockets that may matter for a local port choice
(:class:`PortHolder`), the range's ports as the kernel's bind hash holds them
(:class:`RangeBuckets`) and the namespace's client-side sysctls (:class:`ConnectSettings`).
:mod:`rebind.kernel.connect_facts` gathers them."""

from __future__ import annotations

from dataclasses import dataclass, field

from rebind.model.records import Proto, SocketEntry, SocketRecord

#: TCP_TIMEWAIT_LEN (include/net/tcp.h): a time-wait entry lives 60 s from TIME_WAIT entry.
TIME_WAIT_MS = 60_000
#: The 6.14 default of net.ipv4.tcp_tw_reuse_delay (ms); before 6.14 the delay was a fixed ~1 s.
DEFAULT_TW_REUSE_DELAY_MS = 1000
DEFAULT_RANGE = (32768, 60999)


@dataclass(frozen=True, slots=True)
class PortHolder:
    """A socket that may matter for a local port choice.

    ``explicit``: the port came from bind() (True), from connect()'s own choice (False), or
    inet_diag cannot say (None: a client socket inside the range; connect-rules §8).
    ``timestamps``: for a time-wait entry, whether the old connection used TCP timestamps
    (not exported by inet_diag: None = assume the namespace's ``tcp_timestamps``).

    Per-socket kernel facts, when a reader (the BPF socket iterator) has them; None = unknown:

    * ``bind_port_locked``: ``sk_userlocks & SOCK_BINDPORT_LOCK``, set by a bind() with a non-zero
      port (__inet_bind). True proves bind(); False does *not* prove connect(): bind(ip, 0),
      listen()'s autobind and accepted children leave it clear.
    * ``connect_bind``: ``sk_userlocks & SOCK_CONNECT_BIND`` (tw_connect_bind for a time-wait
      entry), 6.18+ only: True = connect()'s own choice, False = the port came from bind() in some
      form. Leave it None on older kernels, where the flag does not exist.
    * ``bucket_connect_only``: the port's bind bucket has ``fastreuse < 0 and fastreuseport < 0``
      -- the very test __inet_hash_connect makes (C6) -- so it decides for every socket on the
      port, on any kernel.

    Unknown origin never makes the answer optimistic: see :attr:`port_from_bind` and
    ``PortUse.UNKNOWN_ORIGIN``.
    """

    entry: SocketEntry
    explicit: bool | None = None
    timestamps: bool | None = None
    reuseaddr: bool | None = None
    reuseport: bool | None = None
    bind_port_locked: bool | None = None
    connect_bind: bool | None = None
    bucket_connect_only: bool | None = None

    @property
    def socket(self) -> SocketRecord:
        return self.entry.socket

    @property
    def port_from_bind(self) -> bool | None:
        """Did bind() give this socket its port (its bucket is then not connect-only, C6)?
        Kernel facts first, then the table's inference; None when nothing can tell."""
        if self.bucket_connect_only is not None:
            return not self.bucket_connect_only
        if self.connect_bind is not None:
            return not self.connect_bind
        if self.bind_port_locked:
            return True
        return self.explicit


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    """The per-netns sysctls of the client side (all per network namespace)."""

    port_range: tuple[int, int] = DEFAULT_RANGE
    reserved: frozenset[int] = field(default_factory=frozenset)
    tw_reuse: int = 2
    tw_reuse_delay_ms: int = DEFAULT_TW_REUSE_DELAY_MS
    tcp_timestamps: int = 1
    autobind_reuse: bool = False
    kernel_version: tuple[int, int] = (6, 18)
    #: net.ipv4.ip_unprivileged_port_start: ip_local_port_range's low end may not go below it
    #: (ipv4_local_port_range() refuses the write with EINVAL).
    unprivileged_port_start: int = 1024


@dataclass(frozen=True, slots=True)
class RangeBuckets:
    """Every TCP port of the effective range as the kernel's bind hash holds it: one
    ``inet_bind_bucket`` per (netns, port), read straight from the hash (kernel/bpf/bindhash.py),
    so what connect()'s own choice decides by (C6) is known for every port without a socket
    being read. With it the holders need only be the sockets the answer names
    (:func:`summary_suffices` says for which requests; :func:`rebind.model.connect.evaluate_connect`
    lists them).

    ``held``: ports with a bucket (some TCP socket of any state, a TIME_WAIT included, holds the
    port). ``bind_made``: those whose bucket is not connect()-made (``fastreuse >= 0 ||
    fastreuseport >= 0``, the test __inet_hash_connect makes): connect() skips them for every
    4-tuple. Every other held port is connect()-made: shared unless its 4-tuple to the
    destination is taken, which the holders to the destination tell."""

    held: frozenset[int]
    bind_made: frozenset[int]


def summary_suffices(proto: Proto, *, own_choice: bool, fixed_port: bool) -> bool:
    """Can the answer come from :class:`RangeBuckets` plus the named holders? TCP connect()'s own
    choice and a fixed port yes (the bucket and the 4-tuple decide, C4-C6, C17); bind(ip, 0)
    without IP_BIND_ADDRESS_NO_PORT no (inet_csk_find_open_port compares every owner's address
    on each port, C13), nor UDP (no buckets: udp_lib_get_port, C20)."""
    return proto is Proto.TCP and (own_choice or fixed_port)
