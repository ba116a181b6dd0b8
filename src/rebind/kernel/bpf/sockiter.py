"""The kernel's own bind state of some ports' sockets: the BPF tcp/udp socket iterators.

inet_diag shows a socket's addresses, state, uid and (LISTEN/CLOSE only) v6only, never the
flags bind() and connect() decide by. The iterators (``bpf_iter__tcp``/``bpf_iter__udp``,
Linux 5.9) hand a program every socket of one network namespace; :mod:`.sockprog`'s program
copies, for the sockets of the asked ports:

- ``skc_reuse`` / ``skc_reuseport`` (SO_REUSEADDR / SO_REUSEPORT; a TIME_WAIT's ``tw_reuse`` /
  ``tw_reuseport`` are the same bits, copied from the closing socket by inet_twsk_alloc),
  ``skc_ipv6only``, ``skc_bound_dev_if``: what inet_csk_bind_conflict / udp_lib_lport_inuse
  compare;
- ``sk_userlocks``: SOCK_BINDPORT_LOCK / SOCK_BINDADDR_LOCK say the port (address) came from
  bind(), not from connect()'s autobind (SOCK_CONNECT_BIND, Linux 6.18) -- what connect()'s
  port choice and __inet_hash_connect's reuse of a port depend on;
- ``sk_uid`` (SO_REUSEPORT compares it) and the iterator's uid;
- for TIME_WAIT: ``tw_substate``, ``tw_ts_recent`` / ``tw_ts_recent_stamp`` (tcp_twsk_unique
  reuses a TIME_WAIT for connect() by its own timestamps) and ``tw_connect_bind`` (6.18);
- for TCP, the port's ``struct inet_bind_bucket`` (``icsk_bind_hash``, a TIME_WAIT's
  ``tw_tb``): the fast-reuse cache (``fastreuse``, ``fastreuseport``, ``fastuid``,
  ``fast_rcv_saddr``, ``fast_v6_rcv_saddr``, ``fast_sk_family``, ``fast_ipv6_only``) that
  lets inet_csk_get_port skip the conflict walk, and so can allow a bind the owners' flags alone
  would refuse; on 6.18 also the (port, address) ``inet_bind2_bucket``'s own
  ``fastreuse``/``fastreuseport`` (``icsk_bind2_hash``, ``tw_tb2``; optional members);
- for UDP, the iterator's hash slot and the order of the sockets in it (the kernel's chain
  order; on 6.7+ the iterator walks ``udptable->hash2``, keyed by address and port).

The iterator runs in the network namespace of the thread that creates it (bpf_iter_init_seq_net
takes current's), and reports that namespace's sockets only (tested:
tests/kernel/test_sockiter.py). Needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), BTF and a
kernel allowing tracing programs (not lockdown "confidentiality"); ``REBIND_NO_BPF=1`` turns
it off, as for the owner scan. Anything missing gives
:class:`~rebind.model.sockstate.Unavailable` with the reason, never an exception: callers fall
back to inet_diag plus what they can infer, and mark the rest unknown.
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from rebind.errors import RebindError
from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.layoutcache import layout_cache
from rebind.kernel.bpf.sockprog import (
    ABSENT,
    CHAIN_UNKNOWN,
    COUNT_VALUE,
    KIND_REQUEST,
    KIND_TIMEWAIT,
    OPTIONAL_MEMBERS,
    RECORD,
    RECORD_FIELDS,
    RECORD_NAMES,
    SOCK_MEMBERS,
    SOCK_TARGETS,
    STOP_KEY,
    Maps,
    SockLayout,
    build_sock_program,
    check_layout,
    sock_layout_from_btf,
)
from rebind.kernel.bpf.syscall import (
    BPF_MAP_TYPE_HASH,
    BPFUnavailable,
    check_bpf_environment,
    iter_create,
    link_create,
    load_program,
    map_create,
    map_lookup,
    map_update,
    read_all,
)
from rebind.model.records import Endpoint, Family, Proto, State
from rebind.model.sockstate import (
    BindBucket,
    ChainPos,
    PortStateCounts,
    SockCommon,
    SockKind,
    SockState,
    SockStates,
    Unavailable,
)


def _check_caps() -> None:
    check_bpf_environment(honour_no_bpf=True)


def _decode_layout(lines: list[str]) -> SockLayout | None:
    attach: dict[str, int] = {}
    bits: dict[str, btfmod.Bits] = {}
    try:
        for line in lines:
            kind, name, *values = line.split()
            if kind == "attach":
                attach[name] = int(values[0])
            else:
                bits[name] = btfmod.Bits(int(values[0]), int(values[1]))
        lay = SockLayout(attach, bits)
        check_layout(lay)
    except (ValueError, IndexError, KeyError, btfmod.BTFError):
        return None
    required = {f"{s}.{m}" for s, m in SOCK_MEMBERS}
    if set(attach) != set(SOCK_TARGETS) or not required <= set(bits):
        return None
    return lay


def _encode_layout(lay: SockLayout) -> list[str]:
    return [
        *(f"attach {k} {v}" for k, v in sorted(lay.attach.items())),
        *(f"bits {k} {v.bit_offset} {v.bit_size}" for k, v in sorted(lay.bits.items())),
    ]


#: Reading the layout walks most of vmlinux BTF (~0.5 s on 6.18: bench/sockiter.py): cached per
#: boot like the owner scan's, one file per member list (kernel/bpf/layoutcache.py).
LAYOUT_CACHE = layout_cache(
    "bpf-sock-layout",
    3,
    (SOCK_MEMBERS, OPTIONAL_MEMBERS),
    build=sock_layout_from_btf,
    encode=_encode_layout,
    decode=_decode_layout,
)


def load_sock_layout(*, use_cache: bool = True) -> SockLayout:
    """This kernel's layout: from this process, the per-boot cache, or its BTF."""
    return LAYOUT_CACHE.load(use_cache=use_cache)


def current_netns() -> int:
    """The inode of this thread's network namespace (the one the iterators walk)."""
    return os.stat(f"/proc/self/task/{_gettid()}/ns/net").st_ino


def _gettid() -> int:
    return int(os.readlink("/proc/thread-self").rsplit("/", 1)[1])


# ---------------------------------------------------------------------------------------------
# running


def _ports_map(ports: Iterable[int], *, stop_key: bool = False) -> tuple[int, list[int]]:
    wanted = sorted({p for p in ports if 0 < p < 1 << 16})
    keys = wanted + ([STOP_KEY] if stop_key else [])
    fd = map_create(BPF_MAP_TYPE_HASH, 4, COUNT_VALUE.size, max(len(keys), 1))
    try:
        zero = bytes(COUNT_VALUE.size)
        for port in keys:
            map_update(fd, port.to_bytes(4, "little"), zero)
    except BaseException:
        os.close(fd)
        raise
    return fd, wanted


def _iterate(proto: Proto, ports_fd: int, *, count: bool, listeners_only: bool = False) -> bytes:
    lay = load_sock_layout()
    insns = build_sock_program(
        lay, Maps(ports=ports_fd), proto=proto.value, count=count, listeners_only=listeners_only
    )
    prog_fd = load_program(insns, lay.attach[f"bpf_iter_{proto.value}"])
    try:
        link_fd = link_create(prog_fd)
        try:
            iter_fd = iter_create(link_fd)  # the namespace is taken here: this thread's
            try:
                return read_all(iter_fd, _stopped(ports_fd) if listeners_only else None)
            finally:
                os.close(iter_fd)
        finally:
            os.close(link_fd)
    finally:
        os.close(prog_fd)


def _stopped(ports_fd: int) -> Callable[[], bool]:
    """After EAGAIN in a listeners-only read (build_sock_program's ``listeners_only``): the
    STOP_KEY counter says it was the program's stop, not bpf_seq_read's pause after a million
    objects without output (read again then). A walk without any connection ends by itself."""

    def stopped() -> bool:
        flag = map_lookup(ports_fd, STOP_KEY.to_bytes(4, "little"), COUNT_VALUE.size)
        return bool(COUNT_VALUE.unpack(flag)[0])

    return stopped


def read_socket_states(
    ports: Iterable[int],
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    *,
    netns: int | None = None,
    listeners_only: bool = False,
) -> SockStates | Unavailable:
    """Every socket of these local ports in this thread's network namespace, as the kernel holds it.

    ``netns``: the namespace the caller means (an inode); if this thread is elsewhere, the
    answer would be another namespace's, so it is Unavailable instead.

    ``listeners_only``: TCP listening sockets only (with their bind bucket), read by walking the
    listening hash and stopping where the established hash begins: a few milliseconds where the
    whole walk takes over a hundred (bench/whyperf.py). UDP is walked whole either way.
    """
    try:
        here = current_netns()
        if netns is not None and netns != here:
            return Unavailable(f"the iterator walks this thread's network namespace ({here}), not {netns}")
        _check_caps()
        fd, wanted = _ports_map(ports, stop_key=listeners_only)
        try:
            if not wanted:
                return SockStates(here, ())
            out: list[SockState] = []
            faulted = 0
            for proto in dict.fromkeys(protos):
                only = listeners_only and proto is Proto.TCP
                got, bad = decode_records(proto, _iterate(proto, fd, count=False, listeners_only=only))
                out.extend(got)
                faulted += bad
        finally:
            os.close(fd)
    except (OSError, RebindError) as exc:  # BPFUnavailable included: never an exception
        return Unavailable(_reason(exc))
    return SockStates(here, tuple(out), faulted, listeners_only=listeners_only)


def prepare(netns: int | None = None) -> int | Unavailable:
    """This thread's network namespace if the BPF socket programs can run here for ``netns``
    (the namespace meant; capabilities, REBIND_NO_BPF, the BTF layout), else why not."""
    try:
        here = current_netns()
        if netns is not None and netns != here:
            return Unavailable(f"the BPF programs read this thread's network namespace ({here}), not {netns}")
        _check_caps()
        load_sock_layout()
    except (BPFUnavailable, OSError) as exc:
        return Unavailable(_reason(exc))
    return here


def count_socket_states(
    ports: Iterable[int], protos: Iterable[Proto] = (Proto.TCP, Proto.UDP)
) -> PortStateCounts | Unavailable:
    """Sockets per (proto, port, state), counted in the kernel: nothing per socket crosses."""
    try:
        here = current_netns()
        _check_caps()
        counts: list[tuple[Proto, int, State, int]] = []
        for proto in dict.fromkeys(protos):
            fd, wanted = _ports_map(ports)  # a fresh map per protocol: counters start at 0
            try:
                if not wanted:
                    continue
                _iterate(proto, fd, count=True)
                for port in wanted:
                    values = COUNT_VALUE.unpack(map_lookup(fd, port.to_bytes(4, "little"), COUNT_VALUE.size))
                    counts += [(proto, port, State(s), n) for s, n in enumerate(values) if n and s in _STATES]
            finally:
                os.close(fd)
    except (OSError, RebindError) as exc:  # BPFUnavailable included: never an exception
        return Unavailable(_reason(exc))
    return PortStateCounts(here, tuple(counts))


_STATES = frozenset(s.value for s in State)


def _reason(exc: BaseException) -> str:
    """One line: an errno's words, or the first line of our error (a verifier's log follows it)."""
    if isinstance(exc, OSError) and not isinstance(exc, BPFUnavailable):
        return f"BPF socket iterator: {exc.strerror or exc}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# the record codec


def decode_records(proto: Proto, data: bytes) -> tuple[list[SockState], int]:
    """Records -> SockState, in the iterator's order; (states, records left out for faults)."""
    if len(data) % RECORD.size:
        raise BPFUnavailable(f"iterator output of {len(data)} bytes is not whole records")
    rows = list(RECORD.iter_unpack(data))
    kept = [r for r in rows if not r[_I["faults"]]]
    port_index = _port_chain_index(kept) if proto is Proto.UDP else {}
    memo = _Memo()
    out: list[SockState] = []
    per_bucket: dict[int, int] = {}
    for r in kept:
        chain = None
        if proto is Proto.UDP:
            slot = r[_I["bucket"]]
            index = per_bucket.get(slot, 0)
            per_bucket[slot] = index + 1
            chain = ChainPos(slot, index, port_index.get(r[_I["cookie"]]))
        out.append(decode_one(proto, r, chain, memo))
    return out, len(rows) - len(kept)


#: Record field -> index in the unpacked tuple (RECORD's order).
_I = {name: i for i, name in enumerate(RECORD_NAMES)}


def _port_chain_index(rows: list[tuple[Any, ...]]) -> dict[int, int]:
    """cookie -> position among its port's sockets in the port chain: the more sockets follow
    it, the nearer the head. A port with a socket past the followed length gets none."""
    by_port: dict[int, list[tuple[Any, ...]]] = {}
    for r in rows:
        by_port.setdefault(r[_I["lport"]], []).append(r)
    out: dict[int, int] = {}
    after, cookie = _I["chain_after"], _I["cookie"]
    for group in by_port.values():
        if any(r[after] == CHAIN_UNKNOWN for r in group):
            continue
        for i, r in enumerate(sorted(group, key=lambda r: -r[after])):
            out[r[cookie]] = i
    return out


_STATE_OF = {s.value: s for s in State}
_FAMILY_OF = {f.value: f for f in Family}
_KIND_OF = {KIND_TIMEWAIT: SockKind.TIMEWAIT, KIND_REQUEST: SockKind.REQUEST}
#: The record fields of the bind buckets: many sockets share one (a key of _Memo.buckets).
_BUCKET_KEY_FIELDS = tuple(
    _I[k]
    for k in (
        "has_bucket",
        "tb_port",
        "fastreuse",
        "fastreuseport",
        "fastuid",
        "fast_rcv_saddr",
        "fast_v6_rcv_saddr",
        "fast_sk_family",
        "fast_ipv6_only",
        "tb2_fastreuse",
        "tb2_fastreuseport",
    )
)
_BUCKET_KEY = operator.itemgetter(*_BUCKET_KEY_FIELDS)


class _Memo:
    """What many records of one read share (a port's ten thousand TIME_WAITs have one bucket, a
    handful of addresses and one :class:`SockCommon`): decoded once. Decoding is the larger part
    of reading a port's TIME_WAITs, larger than the kernel's walk (bench/whyperf.py)."""

    __slots__ = ("addrs", "buckets", "commons", "endpoints")

    def __init__(self) -> None:
        self.addrs: dict[tuple[int, bytes], IPv4Address | IPv6Address] = {}
        self.endpoints: dict[tuple[int, bytes, int], Endpoint] = {}
        self.buckets: dict[tuple[Any, ...], BindBucket | None] = {}
        self.commons: dict[tuple[Any, ...], SockCommon] = {}

    def endpoint(self, family: int, v4: bytes, v6: bytes, port: int) -> Endpoint:
        raw = v4 if family == Family.INET else v6
        got = self.endpoints.get((family, raw, port))
        if got is None:
            got = self.endpoints[family, raw, port] = Endpoint(self.addr(family, raw), port)
        return got

    def addr(self, family: int, raw: bytes) -> IPv4Address | IPv6Address:
        got = self.addrs.get((family, raw))
        if got is None:
            got = self.addrs[family, raw] = IPv4Address(raw) if family == Family.INET else IPv6Address(raw)
        return got

    def bucket(self, r: tuple[Any, ...]) -> BindBucket | None:
        key = _BUCKET_KEY(r)
        if key not in self.buckets:
            self.buckets[key] = _bucket(r)
        return self.buckets[key]

    def common(self, proto: Proto, r: tuple[Any, ...], uid: int) -> SockCommon:
        # the local address of the socket's own family: the other field is whatever the memory
        # held (a TIME_WAIT's skc_v6_rcv_saddr on IPv4 differs from one to the next)
        local = r[_RCV] if r[_FAMILY] == Family.INET else r[_RCV6]
        key = (proto, uid, local, *_COMMON_KEY(r))
        got = self.commons.get(key)
        if got is None:
            got = self.commons[key] = _common(proto, r, uid, self)
        return got


def _bucket(r: tuple[Any, ...]) -> BindBucket | None:
    has = r[_I["has_bucket"]]
    if not has & 1:
        return None
    cached = r[_I["fastreuseport"]] > 0  # else the fast_* fields are stale memory
    return BindBucket(
        port=r[_I["tb_port"]],
        fastreuse=r[_I["fastreuse"]],
        fastreuseport=r[_I["fastreuseport"]],
        fastuid=r[_I["fastuid"]] if cached else None,
        fast_rcv_saddr=IPv4Address(r[_I["fast_rcv_saddr"]]) if cached else None,
        fast_v6_rcv_saddr=IPv6Address(r[_I["fast_v6_rcv_saddr"]]) if cached else None,
        fast_sk_family=r[_I["fast_sk_family"]] if cached else None,
        fast_ipv6_only=bool(r[_I["fast_ipv6_only"]]) if cached else None,
        bind2_fastreuse=r[_I["tb2_fastreuse"]] if has & 2 else None,
        bind2_fastreuseport=r[_I["tb2_fastreuseport"]] if has & 2 else None,
    )


# Indexes of the fields decode_one reads for every socket.
(
    _FAMILY, _KIND, _STATE, _RCV, _RCV6, _LPORT, _DADDR, _DADDR6, _DPORT, _COOKIE, _NETNS, _UID,
    _SK_UID, _DEV, _REUSE, _REUSEPORT, _V6ONLY, _LOCKS, _TW_SUB, _TS, _TS_STAMP, _CONNECT_BIND, _SEQ,
) = (
    _I[k]
    for k in (
        "family", "kind", "state", "rcv_saddr", "v6_rcv_saddr", "lport", "daddr", "v6_daddr",
        "dport", "cookie", "netns", "uid", "sk_uid", "bound_dev_if", "reuse", "reuseport",
        "ipv6only", "userlocks", "tw_substate", "tw_ts_recent", "tw_ts_recent_stamp",
        "tw_connect_bind", "seq_num",
    )
)  # fmt: skip
#: The record fields a SockCommon is made of (the uid and local address apart, see _Memo.common).
_COMMON_KEY = operator.itemgetter(
    _FAMILY, _KIND, _STATE, _LPORT, _NETNS, _SK_UID, _DEV, _REUSE, _REUSEPORT, _V6ONLY,
    _LOCKS, _TW_SUB, _CONNECT_BIND, *_BUCKET_KEY_FIELDS,
)  # fmt: skip
#: Slot setters: a frozen dataclass's __init__ goes through object.__setattr__ per field, twice
#: the cost of setting the slots; one SockState per socket, ten thousand per TIME_WAIT port.
_NEW = object.__new__
_SET_STATE = tuple(getattr(SockState, f).__set__ for f in SockState.__dataclass_fields__)


def _common(proto: Proto, r: tuple[Any, ...], uid: int, m: _Memo) -> SockCommon:
    fam = r[_FAMILY]
    kind = _KIND_OF.get(r[_KIND], SockKind.FULL)
    full, tw = kind is SockKind.FULL, kind is SockKind.TIMEWAIT
    connect_bind = r[_CONNECT_BIND]
    return SockCommon(
        proto=proto,
        family=_FAMILY_OF.get(fam) or Family(fam),
        state=_STATE_OF.get(r[_STATE]) or State(r[_STATE]),
        kind=kind,
        local=m.endpoint(fam, r[_RCV], r[_RCV6], r[_LPORT]),
        netns=r[_NETNS],
        uid=None if tw else uid,
        sk_uid=r[_SK_UID] if full else None,
        bound_dev_if=r[_DEV],
        reuse=r[_REUSE],
        reuseport=bool(r[_REUSEPORT]),
        ipv6only=bool(r[_V6ONLY]),
        userlocks=r[_LOCKS] if full else None,
        tw_substate=State(r[_TW_SUB]) if tw else None,
        tw_connect_bind=bool(connect_bind) if tw and connect_bind != ABSENT else None,
        bucket=m.bucket(r),
    )


def decode_one(
    proto: Proto,
    r: tuple[Any, ...],
    chain: ChainPos | None = None,
    memo: _Memo | None = None,
    *,
    cookie: int | None = None,
    uid: int | None = None,
) -> SockState:
    """One unpacked RECORD (its types are fixed by RECORD's format: ints, bytes for "Ns").
    ``cookie``/``uid``: the caller's own for this socket, instead of the record's (a lookup's
    program has neither: inet_diag's are given)."""
    m = memo if memo is not None else _Memo()
    common = m.common(proto, r, r[_UID] if uid is None else uid)
    tcp_tw = proto is Proto.TCP and common.kind is SockKind.TIMEWAIT
    fam = r[_FAMILY]
    values = (
        common,
        m.endpoint(fam, r[_DADDR], r[_DADDR6], int.from_bytes(r[_DPORT], "big")),
        r[_COOKIE] if cookie is None else cookie,
        r[_TS] if tcp_tw else None,
        r[_TS_STAMP] if tcp_tw else None,
        chain,
        r[_SEQ],
    )
    st: SockState = _NEW(SockState)
    for put, value in zip(_SET_STATE, values, strict=True):
        put(st, value)
    return st


# ---------------------------------------------------------------------------------------------
# bulk decoding: a port's ten thousand TIME_WAITs (kernel/bpf/socklookup.py)

#: The record fields a socket has of its own (and those SockCommon's key picks by family); the
#: others, in runs of raw bytes, key _Memo.commons without being decoded each time.
_OWN_FIELDS = frozenset(
    {
        "cookie", "seq_num", "tw_ts_recent_stamp", "uid", "faults", "tw_ts_recent", "rcv_saddr",
        "daddr", "v6_rcv_saddr", "v6_daddr", "family", "lport", "dport",
    }
)  # fmt: skip


def _split_format() -> tuple[str, dict[str, int], tuple[int, ...]]:
    """RECORD's format with the shared fields merged into "Ns" runs: (format, index of each own
    field, indexes of the runs) in the unpacked tuple."""
    parts: list[str] = []
    own: dict[str, int] = {}
    runs: list[int] = []
    run = 0
    for name, fmt in RECORD_FIELDS:
        if name not in _OWN_FIELDS:
            run += struct.calcsize("<" + fmt)
            continue
        if run:
            runs.append(len(parts))
            parts.append(f"{run}s")
            run = 0
        own[name] = len(parts)
        parts.append(fmt)
    if run:
        runs.append(len(parts))
        parts.append(f"{run}s")
    return "".join(parts), own, tuple(runs)


_SPLIT_FMT, _OWN_AT, _RUNS_AT = _split_format()


class BulkDecoder:
    """Records at a fixed stride in one buffer (``lead``: struct format of what precedes each
    record, ``trail``: bytes after it), unpacked at once with struct.iter_unpack and decoded
    into SockStates that share their SockCommon: its fields are decoded once per distinct raw
    value, the rest per socket (decode_one's answer, at ~1 us a socket instead of ~8)."""

    def __init__(self, proto: Proto, lead: str = "", trail: int = 0) -> None:
        self.proto = proto
        self.memo = _Memo()
        self.commons: dict[tuple[Any, ...], SockCommon] = {}
        self.struct = struct.Struct(f"<{lead}{_SPLIT_FMT}{trail}x" if trail else f"<{lead}{_SPLIT_FMT}")
        self.lead = struct.calcsize("<" + lead)
        base = len(struct.Struct("<" + lead).unpack(bytes(self.lead))) if lead else 0
        at = {name: base + i for name, i in _OWN_AT.items()}
        self.family, self.lport, self.dport = at["family"], at["lport"], at["dport"]
        self.rcv, self.rcv6, self.daddr, self.daddr6 = (
            at["rcv_saddr"], at["v6_rcv_saddr"], at["daddr"], at["v6_daddr"],
        )  # fmt: skip
        self.faults, self.seq, self.ts, self.stamp = (
            at["faults"], at["seq_num"], at["tw_ts_recent"], at["tw_ts_recent_stamp"],
        )  # fmt: skip
        self._runs = operator.itemgetter(*(base + i for i in _RUNS_AT))

    def rows(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[Any, ...]]:
        return self.struct.iter_unpack(data)

    def decode(
        self,
        v: tuple[Any, ...],
        data: bytes | bytearray | memoryview,
        index: int,
        cookie: int,
        uid: int,
        remote: Endpoint | None = None,
    ) -> SockState:
        """Row ``v`` (the ``index``-th of ``data``), with the caller's cookie and uid, and its
        remote end where the caller has checked it against the record (else decoded)."""
        fam = v[self.family]
        inet = fam == Family.INET
        key = (uid, v[self.rcv] if inet else v[self.rcv6], fam, self._runs(v))
        common = self.commons.get(key)
        if common is None:
            r = RECORD.unpack_from(data, index * self.struct.size + self.lead)
            common = self.commons[key] = _common(self.proto, r, uid, self.memo)
        if remote is None:
            port = int.from_bytes(v[self.dport], "big")
            remote = self.memo.endpoint(fam, v[self.daddr], v[self.daddr6], port)
        tcp_tw = self.proto is Proto.TCP and common.kind is SockKind.TIMEWAIT
        st: SockState = _NEW(SockState)
        _PUT_COMMON(st, common)
        _PUT_REMOTE(st, remote)
        _PUT_COOKIE(st, cookie)
        _PUT_TS(st, v[self.ts] if tcp_tw else None)
        _PUT_STAMP(st, v[self.stamp] if tcp_tw else None)
        _PUT_CHAIN(st, None)
        _PUT_SEQ(st, v[self.seq])
        return st


(_PUT_COMMON, _PUT_REMOTE, _PUT_COOKIE, _PUT_TS, _PUT_STAMP, _PUT_CHAIN, _PUT_SEQ) = _SET_STATE
