"""The socket programs' record, decoded into :mod:`rebind.model.sockstate` values (pure: no I/O).

One fixed-size :data:`~.socklayout.RECORD` per socket, written by the iterator programs
(:mod:`.sockiter`) or by the lookup program (:mod:`.socklookup`): :func:`decode_records` turns an
iterator's output into SockStates (with UDP's chain positions), :func:`decode_one` one unpacked
record, and :class:`BulkDecoder` a lookup's many records at once, sharing what sockets alike
share (a port's ten thousand TIME_WAITs: one :class:`~rebind.model.sockstate.SockCommon`).
What each field means to bind() and connect() is in :mod:`.sockiter`'s docstring.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from rebind.kernel.bpf.socklayout import (
    ABSENT,
    CHAIN_UNKNOWN,
    KIND_REQUEST,
    KIND_TIMEWAIT,
    RECORD,
    RECORD_FIELDS,
    RECORD_NAMES,
)
from rebind.kernel.bpf.syscall import BPFUnavailable
from rebind.model.records import Endpoint, Family, Proto, State
from rebind.model.sockstate import (
    BindBucket,
    ChainPos,
    SockCommon,
    SockKind,
    SockState,
)

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
        # a socket's own in the bind-hash owners' records (bindowners.EXTRA_*: inode, jiffies
        # left), 0 in TCP's others: never part of what sockets share
        "bucket", "chain_after",
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
        self.cookie, self.uid = at["cookie"], at["uid"]  # a record's own (bindhash's owners)
        self.bucket, self.chain_after = at["bucket"], at["chain_after"]
        self._runs = operator.itemgetter(*(base + i for i in _RUNS_AT))

    def rows(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[Any, ...]]:
        return self.struct.iter_unpack(data)

    def new_common(
        self, key: tuple[Any, ...], data: bytes | bytearray | memoryview, index: int, uid: int
    ) -> SockCommon:
        """The SockCommon of the ``index``-th record, decoded and kept in :attr:`commons` under
        ``key``: ``(uid, the local address of its own family, fam, the shared runs' bytes)``, as
        :meth:`decode` looks it up (kernel/bindhash_table.decode_port too)."""
        r = RECORD.unpack_from(data, index * self.struct.size + self.lead)
        common = self.commons[key] = _common(self.proto, r, uid, self.memo)
        return common

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
            common = self.new_common(key, data, index, uid)
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
