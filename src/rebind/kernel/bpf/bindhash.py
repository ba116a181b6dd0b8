"""A TCP port's bind bucket, read straight from the kernel's bind hash: no walk of the sockets.

bind() and connect() decide by the port's bind bucket (inet_csk_get_port, __inet_hash_connect),
found by hashing the port (inet_bhashfn: ``(port + net->hash_mix) & (bhash_size - 1)``) and
matching (inet_bind_bucket_match: same ``net``, same port; l3mdev may make more than one). Every
other reader of rebind walks a socket table for it: inet_diag's dump (~20-100 ms on a 211k-socket
namespace) or the BPF tcp iterator (~130 ms). Here the programs do what the kernel does: one
hash chain per port (:mod:`.bindhashlayout`: the structures, offsets from BTF, and the entry).

- :func:`read_port_buckets`: per port, how many buckets of the caller's namespace hold it, the
  first one's ``fastreuse``/``fastreuseport`` (connect()-made: both -1 on 6.18) and fast-reuse
  cache, its bind2 buckets (and owners, if asked) counted, as
  :class:`~rebind.model.sockstate.PortBucket` (:mod:`.bindprog`: one test-run repetition a port);
  :func:`read_port_bucket_groups`: the same, each distinct bucket once with its ports;
- :func:`read_port_owners`: every socket of a port's buckets, as the iterator's SockStates
  (:mod:`.bindowners`: one repetition, one bpf_loop).

The programs are ``BPF_PROG_TYPE_SCHED_CLS`` run by ``BPF_PROG_TEST_RUN`` (as
:mod:`.socklookup`'s), with mmapable array maps written and read in one copy each; they find the
caller's namespace themselves (``bpf_get_current_task()->nsproxy->net_ns``: the test run runs in
the caller's task; helper 35 is allowed in networking programs with CAP_PERFMON,
bpf_base_func_proto). Both are kept loaded between calls (:class:`_Loaded`).

Races: nothing is locked (the kernel walks a chain under its bucket's spinlock). Every copy goes
through bpf_probe_read_kernel (a fault is flagged, never a crash); inet_bind_bucket is freed by
kfree_rcu (the test run holds rcu_read_lock) but inet_bind2_bucket by a plain kmem_cache_free,
so each bind2 bucket (and each owner) is re-checked -- its port and net -- before it is counted or
followed, every walk is bounded, and what went wrong is flagged (``faulted``,
``chain_truncated``, ``inconsistent``) for the caller to treat the port as unknown. A bucket
made or freed while its chain is read may or may not be seen, as with any snapshot.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

from rebind.errors import RebindError
from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.bindhashlayout import (
    BIND2_TRUNCATED,
    CHAIN_HOPS,
    CHAIN_TRUNCATED,
    ENT,
    ENTRY,
    ENTRY_NAMES,
    FAULTED,
    INCONSISTENT,
    MEMBERS,
    OWNERS_TRUNCATED,
    RAN,
    SIZED,
    BindHashLayout,
    decode_layout,
    encode_layout,
    layout_from_btf,
)
from rebind.kernel.bpf.bindprog import NetState, build_bucket_program
from rebind.kernel.bpf.layoutcache import layout_cache
from rebind.kernel.bpf.socklookup import _test_run
from rebind.kernel.bpf.syscall import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    SOCKET_LOOKUP,
    BPFUnavailable,
    check_bpf_environment,
    load_program,
    map_create,
)
from rebind.model.records import Proto
from rebind.model.sockstate import PortBucket, PortOwners, SockState, Unavailable

if TYPE_CHECKING:
    from rebind.kernel.bpf.sockdecode import BulkDecoder
    from rebind.kernel.bpf.socklayout import SockLayout

# The owners program's modules (bindowners, sockiter, socklayout: the socket record and its
# decoder) are imported where they are used: a reader of the buckets alone (`why --connect`'s
# range, kernel/connect_range.py) does not need them (docs/benchmarks.md, 2026-12-06).

#: Reading the layout walks most of vmlinux BTF (task_struct, net): cached per boot.
LAYOUT_CACHE = layout_cache(
    "bpf-bindhash-layout",
    2,
    (MEMBERS, SIZED),
    build=layout_from_btf,
    encode=encode_layout,
    decode=decode_layout,
)


def load_layout(*, use_cache: bool = True) -> BindHashLayout:
    return LAYOUT_CACHE.load(use_cache=use_cache)


# ---------------------------------------------------------------------------------------------
# running and decoding


class _Loaded:
    """Maps and a loaded program, kept for the next call: loading (the verifier following the
    bucket program's bounded loops hop by hop) and allocating a large map cost more than a run
    (docs/benchmarks.md) -- the exporter asks for the whole ephemeral range each scrape,
    ``rebind trace`` wants a blocker snapshot at once. ``key`` says what it was made for
    (layouts, variant), ``capacity`` how many entries its main map holds; one caller at a time
    (_LOCK): the state map is the run's cursor."""

    def __init__(
        self,
        key: tuple[object, ...],
        capacity: int,
        sizes: list[tuple[int, int]],
        build: Callable[[list[int]], _Built],
        global_funcs: frozenset[str] = frozenset(),
    ) -> None:
        self.key, self.capacity = key, capacity
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        try:
            for value_size, n in sizes:  # ARRAY maps, mmapable: written and read in one copy
                fd = map_create(BPF_MAP_TYPE_ARRAY, 4, value_size, n, BPF_F_MMAPABLE)
                self.fds.append(fd)
                size = (value_size * n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
                self.maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            insns, funcs = build(list(self.fds))
            self.prog = load_program(insns, funcs=funcs, prog=SOCKET_LOOKUP, global_funcs=global_funcs)
            self.fds.append(self.prog)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)
        self.maps, self.fds = [], []


_Built = tuple[bytes, tuple[tuple[str, int, int], ...]]
_LOCK = threading.Lock()
_LOADED: dict[str, _Loaded] = {}


def _loaded(
    name: str,
    key: tuple[object, ...],
    n: int,
    sizes: Callable[[int], list[tuple[int, int]]],
    build: Callable[[list[int]], _Built],
    global_funcs: frozenset[str] = frozenset(),
) -> _Loaded:
    """The kept program ``name`` if made for ``key`` with room for ``n`` entries, else a new one
    (the old one closed). Called with _LOCK held."""
    got = _LOADED.get(name)
    if got is not None and got.key == key and got.capacity >= n:
        return got
    if got is not None:
        del _LOADED[name]
        got.close()
    cap = max(1024, 1 << (n - 1).bit_length())
    got = _LOADED[name] = _Loaded(key, cap, sizes(cap), build, global_funcs)
    return got


def _forget(name: str) -> None:
    """After a failed run: the next call loads afresh."""
    got = _LOADED.pop(name, None)
    if got is not None:
        got.close()


def _run_buckets(lay: BindHashLayout, ports: list[int], owners: bool = False) -> bytes:
    """One test run, one repetition per port: the entries as the program left them."""
    n = len(ports)
    with _LOCK:
        run = _loaded(
            "buckets",
            (lay, owners),
            n,
            lambda cap: [(NetState.SIZE, 1), (ENTRY.size, cap)],
            lambda fds: (build_bucket_program(lay, fds[0], fds[1], owners=owners), ()),
        )
        try:
            state, entries = run.maps
            # the cursor at 0 and the namespace unknown: this thread may have changed namespace
            state[: NetState.SIZE] = bytes(NetState.SIZE)
            entries[: ENTRY.size * n] = _inputs_for(ports)
            _test_run(run.prog, n)
            return entries[: ENTRY.size * n]
        except BaseException:
            _forget("buckets")
            raise


def _inputs_for(ports: list[int]) -> bytes:
    """_inputs, kept for the next calls with the same ports (the exporter asks for the same
    range every scrape, a failing connect's snapshot for its range and the ports outside it:
    ~1 ms of packing saved, against ~0.1 ms comparing the lists). The last two are kept."""
    global _LAST_INPUTS, _OLDER_INPUTS
    if _LAST_INPUTS[0] == ports:
        return _LAST_INPUTS[1]
    if _OLDER_INPUTS[0] == ports:
        _LAST_INPUTS, _OLDER_INPUTS = _OLDER_INPUTS, _LAST_INPUTS
        return _LAST_INPUTS[1]
    _LAST_INPUTS, _OLDER_INPUTS = (list(ports), _inputs(ports)), _LAST_INPUTS
    return _LAST_INPUTS[1]


_LAST_INPUTS: tuple[list[int], bytes] = ([], b"")
_OLDER_INPUTS: tuple[list[int], bytes] = ([], b"")


def _inputs(ports: list[int]) -> bytes:
    """The map's contents before the run: each entry's port (u16, little-endian), the rest zero."""
    buf = bytearray(ENTRY.size * len(ports))
    raw = struct.pack(f"<{len(ports)}H", *ports)
    buf[0 :: ENTRY.size] = raw[0::2]
    buf[1 :: ENTRY.size] = raw[1::2]
    return bytes(buf)


def decode_buckets(ports: list[int], data: bytes, owners: bool = False) -> dict[int, PortBucket]:
    """The entries, one per port asked, as PortBuckets: equal entries (but for the port, which
    the program never writes) share one object, decoded once -- the ports of a client host hold
    a handful of distinct buckets, and decoding is most of a 28k-port read."""
    memo: dict[bytes, PortBucket] = {}
    get = memo.get
    found: list[PortBucket] = []
    keep = found.append
    for (rest,) in _REST.iter_unpack(data):
        got = get(rest)
        if got is None:
            got = memo[rest] = decode_entry(ENTRY.unpack(bytes(2) + rest), owners)
        keep(got)
    return dict(zip(ports, found, strict=True))


#: An entry but its port, as bytes (the memo's key).
_REST = struct.Struct(f"<2x{ENTRY.size - 2}s")
_I = {name: i for i, name in enumerate(ENTRY_NAMES)}
(_MATCHED, _FLAGS, _REUSE, _REUSEPORT, _BIND2, _UID, _L3MDEV, _OWNERS, _FAMILY, _V6ONLY, _RCV, _RCV6) = (
    _I[k]
    for k in (
        "matched", "flags", "fastreuse", "fastreuseport", "bind2", "fastuid", "l3mdev", "owners",
        "fast_sk_family", "fast_ipv6_only", "fast_rcv_saddr", "fast_v6_rcv_saddr",
    )
)  # fmt: skip


def decode_entry(v: tuple[Any, ...], owners: bool = False) -> PortBucket:
    """One unpacked ENTRY (``owners``: whether the program counted them)."""
    flags, matched = v[_FLAGS], v[_MATCHED]
    bad = not flags & RAN or bool(flags & (FAULTED | INCONSISTENT))
    trunc = bool(flags & CHAIN_TRUNCATED)
    if not matched:
        return PortBucket(0, chain_truncated=trunc, faulted=bad)
    cached = v[_REUSEPORT] > 0  # else the kernel's fast_* are stale (and the program left them 0)
    return PortBucket(
        buckets=matched,
        fastreuse=v[_REUSE],
        fastreuseport=v[_REUSEPORT],
        fastuid=v[_UID] if cached else None,
        fast_rcv_saddr=IPv4Address(v[_RCV]) if cached else None,
        fast_v6_rcv_saddr=IPv6Address(v[_RCV6]) if cached else None,
        fast_sk_family=v[_FAMILY] if cached else None,
        fast_ipv6_only=bool(v[_V6ONLY]) if cached else None,
        l3mdev=v[_L3MDEV],
        bind2=v[_BIND2],
        owners=v[_OWNERS] if owners else None,
        chain_truncated=trunc,
        counts_truncated=bool(flags & (BIND2_TRUNCATED | OWNERS_TRUNCATED)),
        faulted=bad,
    )


def read_port_buckets(
    ports: Iterable[int], *, owners: bool = False, netns: int | None = None
) -> dict[int, PortBucket] | Unavailable:
    """Each TCP port's bind bucket(s) in this thread's network namespace, read from the bind
    hash: one chain walk per port, no socket visited (docs/benchmarks.md). Ports outside
    1-65535 are left out. ``owners``: also count each port's sockets (bounded: OWNER_HOPS per
    bind2 bucket; ~10x the cost on a loaded namespace: each is a socket's cache miss).
    Unavailable (with the reason) where BPF cannot run here: capabilities, REBIND_NO_BPF=1, BTF
    lacking a member, the verifier; or ``netns`` (the namespace meant, an inode) is not this
    thread's: the program reads the caller's (current->nsproxy->net_ns)."""
    wanted = sorted({p for p in ports if 0 < p < 1 << 16})
    try:
        if (elsewhere := _elsewhere(netns)) is not None:
            return elsewhere
        check_bpf_environment(honour_no_bpf=True)
        lay = load_layout()
        if not wanted:
            return {}
        return decode_buckets(wanted, _run_buckets(lay, wanted, owners), owners)
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(_reason(exc))


def read_port_bucket_groups(ports: Sequence[int]) -> list[tuple[PortBucket, list[int]]] | Unavailable:
    """:func:`read_port_buckets` for a caller that sorts many ports by their bucket (the exporter:
    the whole ephemeral range each scrape): each distinct bucket once, with the ports it answers,
    in the order asked -- no dict or lookup per port (a 28k-port range holds a handful of
    distinct buckets). ``ports`` unique, each in 1-65535 (others are left out). No owners."""
    wanted = list(ports)
    checked = wanted in (_LAST_INPUTS[0], _OLDER_INPUTS[0])  # (the last inputs were, so)
    if not checked and wanted and (min(wanted) < 1 or max(wanted) >= 1 << 16):
        wanted = [p for p in wanted if 0 < p < 1 << 16]
    try:
        check_bpf_environment(honour_no_bpf=True)
        lay = load_layout()
        if not wanted:
            return []
        data = _run_buckets(lay, wanted)
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(_reason(exc))
    return [(decode_entry(ENTRY.unpack(bytes(2) + rest)), got) for rest, got in _grouped(wanted, data)]


def _grouped(ports: list[int], data: bytes) -> Iterable[tuple[bytes, list[int]]]:
    """The entries' distinct values (but for the port) with their ports, in one pass (~2.5 ms
    for 28k ports), or, where the answer is the last all-equal one again (an idle range: the
    same ports, every entry the same), by one comparison (~0.1 ms). The entries hold their
    ports, so equal answers are for the same ports."""
    global _LAST_SAME
    if len(ports) > 1 and data == _LAST_SAME:
        return [(data[2 : ENTRY.size], list(ports))]
    sparse = _sparse_groups(ports, data)
    if sparse is not None:
        if len(sparse) == 1:
            _LAST_SAME = data  # every port free: the next idle read compares at once
        return sparse
    groups: dict[bytes, list[int]] = {}
    get = groups.get
    for port, (rest,) in zip(ports, _REST.iter_unpack(data), strict=True):
        got = get(rest)
        if got is None:
            got = groups[rest] = []
        got.append(port)
    if len(groups) == 1:
        _LAST_SAME = data  # one reference, replaced whole: safe across threads
    return groups.items()


#: The last answer whose entries were all equal (but for the port).
_LAST_SAME = b""
#: A free port's entry but for the port: the program ran, found no bucket, wrote nothing else
#: (every other field is written only for a matched bucket: bindprog._chain_loop).
_FREE_REST = bytes(ENT["flags"] - 2) + bytes([RAN]) + bytes(ENTRY.size - ENT["flags"] - 1)
_NONZERO = re.compile(rb"[^\x00]")
_NOT_RAN = re.compile(b"[^" + re.escape(bytes([RAN])) + b"]")


def _sparse_groups(ports: list[int], data: bytes) -> list[tuple[bytes, list[int]]] | None:
    """:func:`_grouped` where most ports are free (every port of the host: 65,535 entries, a
    few thousand held): the held ones found by their ``matched`` byte in one C-level scan of
    that column, the free ones taken as the slices between them -- no Python step per free
    port (~6 ms for all ports on bench/mkload.py's table otherwise). None where any entry's
    flags are not exactly RAN (a fault, a walk cut short: the full pass sorts those)."""
    size, n = ENTRY.size, len(ports)
    if n < 2:
        return None
    matched = data[ENT["matched"] :: size]
    if (n - matched.count(0)) * 8 > n:
        return None  # many held: the dict pass is as quick
    held = [m.start() for m in _NONZERO.finditer(matched)]
    flags = data[ENT["flags"] :: size]
    if flags.count(RAN) != n and any(not matched[m.start()] for m in _NOT_RAN.finditer(flags)):
        return None  # a free port's entry with more than RAN: not _FREE_REST
    groups: dict[bytes, list[int]] = {}
    free: list[int] = []
    last = 0
    for i in held:
        free += ports[last:i]
        last = i + 1
        rest = data[i * size + 2 : (i + 1) * size]
        got = groups.get(rest)
        if got is None:
            got = groups[rest] = []
        got.append(ports[i])
    free += ports[last:]
    out = list(groups.items())
    if free:
        out.append((_FREE_REST, free))
    return out


@dataclass(frozen=True, slots=True)
class BindMade:
    """:func:`read_bind_made_ports`' answer: the ports whose one bucket bind() made, and those
    the read cannot vouch for (a fault, a walk cut short, several l3mdev buckets)."""

    ports: list[int]
    unknown: list[int]


def read_bind_made_ports(ports: Sequence[int]) -> BindMade | Unavailable:
    """Which of ``ports`` (unique, each in 1-65535) hold a bind()-made bucket in this thread's
    namespace -- where a listener or a bound-inactive socket can be -- from one run of the
    bucket program, without a PortBucket or a Python step per port: the entries' columns are
    compared as whole byte strings (bytes.translate, then big integers ANDed), so the ~14k
    connect()-made ports of a busy client host and the free ones cost nothing each."""
    wanted = list(ports)
    try:
        check_bpf_environment(honour_no_bpf=True)
        lay = load_layout()
        if not wanted:
            return BindMade([], [])
        data = _run_buckets(lay, wanted)
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(_reason(exc))
    return bind_made_of(wanted, data)


def bind_made_of(ports: list[int], data: bytes) -> BindMade:
    """The bucket program's entries for ``ports`` (``data``) sorted as read_bind_made_ports
    says (pure)."""
    size, n = ENTRY.size, len(ports)
    if not n:
        return BindMade([], [])
    matched = data[ENT["matched"] :: size]
    flags = data[ENT["flags"] :: size]
    # made by bind(): a bucket (matched) whose fastreuse or fastreuseport is not -1 (the -1 of
    # inet_bind_bucket_create in __inet_hash_connect; a bind() joining it sets at least one:
    # inet_csk_update_fastreuse, connect-rules C6; PortBucket.connect_made)
    reuse = data[ENT["fastreuse"] :: size].translate(_NOT_FF_TO_1)
    reuseport = data[ENT["fastreuseport"] :: size].translate(_NOT_FF_TO_1)
    made = _and(matched.translate(_NONZERO_TO_1), _or(reuse, reuseport, n), n)
    unclean = _or(flags.translate(_NOT_RAN_TO_1), matched.translate(_SEVERAL_TO_1), n)
    return BindMade(
        [ports[m.start()] for m in _NONZERO.finditer(made)],
        [ports[m.start()] for m in _NONZERO.finditer(unclean)],
    )


def _and(a: bytes, b: bytes, n: int) -> bytes:
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(n, "little")


def _or(a: bytes, b: bytes, n: int) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")


#: bytes.translate tables for read_bind_made_ports' columns (each byte to 0 or 1).
_NONZERO_TO_1 = bytes([0] + [1] * 255)
_NOT_FF_TO_1 = bytes([1] * 255 + [0])
_NOT_RAN_TO_1 = bytes(1 if b != RAN else 0 for b in range(256))
_SEVERAL_TO_1 = bytes(1 if b > 1 else 0 for b in range(256))


def _elsewhere(netns: int | None) -> Unavailable | None:
    from rebind.kernel.bpf.sockiter import current_netns

    here = current_netns() if netns is not None else None
    if here is not None and here != netns:
        return Unavailable(f"the bind hash is read for this thread's network namespace ({here}), not {netns}")
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, BPFUnavailable):
        return f"BPF bind hash read: {exc.strerror or exc}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------------------------------------
# the owners


def read_port_owners(port: int, limit: int, *, netns: int | None = None) -> PortOwners | Unavailable:
    """Every TCP socket of ``port``'s bind buckets in this thread's network namespace -- full
    sockets and TIME_WAITs, of every bind2 bucket (address) and every l3mdev bucket -- read from
    the bind hash (no walk of the socket tables), at most ``limit`` of them (``truncated`` past
    it). Each is the socket iterator's SockState (same record, same decoder), but for:

    - ``cookie``: the socket's ``skc_cookie`` as the kernel holds it, 0 where nothing asked for
      it yet (inet_diag, SO_COOKIE and the iterator make it: sock_gen_cookie; a TIME_WAIT keeps
      its socket's);
    - ``uid``: ``sk_uid`` (the iterator's is the socket inode's owner, the same unless changed);
    - ``seq``: 0 (no iterator order).

    Sockets whose record faulted, or met where another port's or namespace's would be (a
    bind2 bucket or socket freed and reused mid-walk), are counted in ``faulted`` /
    ``inconsistent``, not reported: then "not seen" is not "not there".

    The records also carry a full socket's inode and a TIME_WAIT's jiffies left, in two fields
    only UDP's iterator fills (bindowners.EXTRA_*), left out of the SockStates here:
    kernel/bindhash_table.py reads them (`rebind trace`'s snapshot)."""
    from rebind.kernel.bpf.sockiter import current_netns, load_sock_layout

    if not 0 < port < 1 << 16:
        return Unavailable(f"port {port} out of range")
    try:
        check_bpf_environment(honour_no_bpf=True)
        lay = load_layout()
        sock = load_sock_layout()
        if (elsewhere := _elsewhere(netns)) is not None:
            return elsewhere
        here = current_netns()
        state, data = _run_owners(lay, sock, port, _limit(limit))
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(_reason(exc))
    return _owners_of(here, port, state, data)


def _run_owners(
    lay: BindHashLayout, sock: SockLayout, port: int, limit: int, only_state: int = 0
) -> tuple[bytes, bytes]:
    """One test run of the owners program: (the state map's value, the records written).
    ``only_state``: emit only the owners in this TCP state (OwnerState.ONLY_STATE); the walk
    then passes any number of others, so it gets bpf_loop's every step."""
    from rebind.kernel.bpf.bindowners import OwnerState
    from rebind.kernel.bpf.socklayout import RECORD

    S = OwnerState
    with _LOCK:
        run = _owners_loaded(lay, sock, limit)
        try:
            state, records = run.maps
            head = bytearray(S.SIZE)
            steps = MAX_STEPS if only_state else min(3 * limit + 2 * CHAIN_HOPS + 8, MAX_STEPS)
            struct.pack_into("<III", head, S.PORT, port, limit, steps)
            struct.pack_into("<I", head, S.ONLY_STATE, only_state)
            state[: S.SIZE] = bytes(head)
            _test_run(run.prog, 1)
            got = state[: S.SIZE]
            emitted = min(_U32.unpack_from(got, S.EMITTED)[0], limit)
            return got, records[: RECORD.size * emitted]
        except BaseException:
            _forget("owners")
            raise


def _owners_loaded(lay: BindHashLayout, sock: SockLayout, limit: int) -> _Loaded:
    from rebind.kernel.bpf.bindowners import GLOBAL_FUNCS, OwnerState, build_owners_program
    from rebind.kernel.bpf.socklayout import RECORD

    return _loaded(
        "owners",
        (lay, sock),
        limit,
        lambda cap: [(OwnerState.SIZE, 1), (RECORD.size, cap)],
        lambda fds: build_owners_program(lay, sock, fds[0], fds[1]),
        GLOBAL_FUNCS,
    )


def prepare_port_owners(limit: int) -> Unavailable | None:
    """Load the owners program and its maps for ``limit`` records ahead of the first
    read_port_owners (a tracer's set-up: the verifier's few ms and the records map's allocation
    -- 144 bytes a record -- are then not in the snapshot's time). None when ready, else why not."""
    from rebind.kernel.bpf.sockiter import load_sock_layout

    try:
        check_bpf_environment(honour_no_bpf=True)
        lay, sock = load_layout(), load_sock_layout()
        with _LOCK:
            _owners_loaded(lay, sock, _limit(limit))
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(_reason(exc))
    return None


def _limit(limit: int) -> int:
    return min(max(limit, 0), MAX_LIMIT)


#: The most records one read_port_owners returns (the map: 144 bytes a record, ~38 MB).
MAX_LIMIT = 1 << 18
#: bpf_loop's most iterations (BPF_MAX_LOOPS, kernel/bpf/bpf_iter.c).
MAX_STEPS = 1 << 23
_U32 = struct.Struct("<I")


def _owners_of(netns: int, port: int, state: bytes, data: bytes) -> PortOwners:
    return _owners_and_rows(netns, port, state, data)[0]


def _owners_and_rows(
    netns: int, port: int, state: bytes, data: bytes
) -> tuple[PortOwners, list[tuple[Any, ...]], BulkDecoder]:
    """The PortOwners, and the raw rows of its sockets (in order) with their decoder, for
    readers of the record's extra fields (:mod:`rebind.kernel.bindhash_table`)."""
    from rebind.kernel.bpf.sockdecode import BulkDecoder
    from rebind.kernel.bpf.socklayout import RECORD

    dec = BulkDecoder(Proto.TCP)
    decode, fi, li, ci, ui = dec.decode, dec.faults, dec.lport, dec.cookie, dec.uid
    # a faulted record, or one of another port (a socket reused mid-walk): left out, counted
    kept = [(i, v) for i, v in enumerate(dec.rows(data)) if not v[fi] and v[li] == port]
    out = tuple(decode(v, data, i, v[ci], v[ui]) for i, v in kept)
    return port_owners(netns, port, state, out, len(data) // RECORD.size), [v for _, v in kept], dec


def port_owners(
    netns: int, port: int, state: bytes, sockets: tuple[SockState, ...], records: int
) -> PortOwners:
    """The PortOwners of a run whose state map is ``state``, of ``records`` records of which
    ``sockets`` were kept (the others faulted, or were of another port: a socket reused
    mid-walk)."""
    from rebind.kernel.bpf.bindowners import STEPS_EXHAUSTED, OwnerState

    S = OwnerState
    flags, buckets, bind2, skipped = (
        _U32.unpack_from(state, at)[0] for at in (S.FLAGS, S.BUCKETS, S.BIND2, S.SKIPPED)
    )
    return PortOwners(
        netns,
        port,
        sockets,
        buckets=buckets,
        bind2=bind2,
        truncated=bool(flags & (OWNERS_TRUNCATED | STEPS_EXHAUSTED | CHAIN_TRUNCATED)) or not flags & RAN,
        faulted=skipped + records - len(sockets) + bool(flags & FAULTED),
        inconsistent=bool(flags & INCONSISTENT),
    )
