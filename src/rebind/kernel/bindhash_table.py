"""A TCP port's socket table read from its bind buckets, not dumped by inet_diag: `rebind
trace`'s snapshot of a failing bind() or listen() (kernel/trace_snapshot.py, issue 19).

inet_diag finds a port's sockets by walking the whole established hash (and, for bound-only
sockets, the whole bhash2): ~100 ms a dump on a 211k-socket namespace, two dumps a snapshot
(docs/benchmarks.md). What inet_csk_bind_conflict walks -- every socket of the port's bind
buckets: listeners, connections, TIME_WAITs, bound-only sockets -- is one hash chain away
(kernel/bpf/bindhash.py: read_port_owners). The owners program also writes what inet_diag would
report beside the record (bindowners._emit_extras): a full socket's inode, a TIME_WAIT's jiffies
left. Here each socket becomes the :class:`SocketRecord` inet_diag would give (:func:`to_record`,
pure) and its :class:`SockState` is kept beside it: the kernel's own flags, which
``facts.gather(states=...)`` uses as they are. The snapshot reads them through
:func:`port_records` (:func:`decode_port`: the records in the table's order in one pass, what
:func:`to_records` and :func:`table_order`, kept as its reference, give one socket at a time).

What inet_diag gives and this does not: request socks (NEW_SYN_RECV: in the established hash,
never in a bind bucket, so never a bind conflict), the timers of full sockets (retransmit,
keepalive: no bind rule reads them), rqueue/wqueue and cgroup ids, and the socket cookie where
nothing asked for it yet (skc_cookie 0: a cookie of our own is given, :data:`LOCAL_COOKIE`, never
shown). Anything the walk could not vouch for (a fault, a truncated or inconsistent walk, HZ not
calibrated) is :class:`Unavailable`: the caller falls back to inet_diag, never to less.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from rebind.kernel.bpf.socklayout import REC, RECORD
from rebind.kernel.hz import STANDARD_HZ
from rebind.model.records import Endpoint, Family, IPAddress, Proto, SocketRecord, State, Timer, fmt_addr
from rebind.model.sockstate import PortOwners, SockCommon, SockKind, SockState, SockStates, Unavailable
from rebind.slotted import twin

#: Cookies given to sockets nothing asked a cookie for yet (skc_cookie 0): the top bit set, out
#: of the reach of sock_gen_cookie's counter, so that SocketRecord.key stays unique per socket.
LOCAL_COOKIE = 1 << 63


@dataclass(frozen=True, slots=True)
class PortSockets:
    """read_port_owners' answer with the extras of each socket (same order)."""

    owners: PortOwners
    #: a full socket's inode (sock_i_ino), 0 for a TIME_WAIT or an orphan
    inodes: tuple[int, ...]
    #: a TIME_WAIT's timer, jiffies left (0 past due, and for full sockets)
    tw_left: tuple[int, ...]
    #: jiffies_64 at the run, and CLOCK_MONOTONIC (ns) around it: HZ calibration
    jiffies: int
    mono_ns: int
    #: a full socket's struct file address (0 for a TIME_WAIT or an orphan): the owner scan's
    #: hint (kernel/bpf/scan.find_socket_holders)
    files: tuple[int, ...] = ()

    def file_hints(self) -> dict[int, int]:
        """inode -> struct file address, for find_owners(files=...)."""
        return {i: f for i, f in zip(self.inodes, self.files, strict=False) if i and f}


def jiffies_to_ms(j: int, hz: int) -> int:
    """jiffies_to_msecs, as inet_twsk_diag_fill reports idiag_expires (rounded up where HZ does
    not divide 1000, as the kernel's HZ_TO_MSEC_* constants do)."""
    return -(-max(j, 0) * 1000 // hz)


def snap_hz(d_jiffies: int, d_ns: int) -> int | None:
    """HZ from two (jiffies, time) samples: the standard value their rate is nearest to, if no
    other is within the samples' slack (a tick on either side of each: 2 jiffies); else None."""
    if d_ns <= 0 or d_jiffies <= 0:
        return None
    rate = d_jiffies * 1e9 / d_ns
    slack = 2 * 1e9 / d_ns
    near = sorted(STANDARD_HZ, key=lambda h: abs(rate - h))
    if abs(rate - near[0]) > slack or abs(rate - near[1]) <= slack:
        return None
    return near[0]


def to_record(st: SockState, inode: int, tw_left_ms: int | None, cookie: int) -> SocketRecord:
    """The SocketRecord inet_diag would report for this socket of a bind bucket (pure).

    As inet_diag_msg_common_fill / inet_sk_diag_fill / inet_twsk_diag_fill: a TIME_WAIT's state
    is its substate (TIME_WAIT, or FIN_WAIT2 kept as one), its timer TIME_WAIT with the ms left,
    no uid and no inode; a TCP socket in CLOSE in a bind bucket is bound-only (the bhash2 dump's
    "bound-inactive", diag_codec renames it); v6only only for an AF_INET6 socket in LISTEN or
    CLOSE (inet_diag_msg_attrs_fill); the uid is sk_uid (sock_i_uid)."""
    tw = st.kind is SockKind.TIMEWAIT
    if tw:
        state = st.tw_substate or State.TIME_WAIT
    elif st.state is State.CLOSE:
        state = State.BOUND_INACTIVE
    else:
        state = st.state
    v6only = None
    if not tw and st.family is Family.INET6 and st.state in (State.LISTEN, State.CLOSE):
        v6only = st.ipv6only
    # SocketRecord's slots set directly: its frozen __init__ (object.__setattr__ for each of 17
    # fields) was the largest part of a 10k-TIME_WAIT port's snapshot
    r: SocketRecord = _NEW(SocketRecord)
    values = (
        st.proto, st.family, state, st.local, st.remote, None if tw else st.uid,
        None if tw or not inode else inode, cookie, st.bound_dev_if,
        Timer.TIME_WAIT if tw else Timer.NONE, tw_left_ms if tw else None, v6only,
        None, 0, 0, st.netns, None,
    )  # fmt: skip
    for put, value in zip(_SET_RECORD, values, strict=True):
        put(r, value)
    return r


_NEW = object.__new__
#: SocketRecord's slot setters, in field order (proto ... netns, birth): see to_record.
_SET_RECORD = tuple(getattr(SocketRecord, f).__set__ for f in SocketRecord.__dataclass_fields__)
#: Plain classes of the same slots (rebind/slotted.py): decode_port builds each socket's
#: objects in them, every slot set, then makes them the dataclasses' (``__class__``).
_RecordSlots, _StateSlots, _EndpointSlots = twin(SocketRecord), twin(SockState), twin(Endpoint)
#: A record's remote port (skc_dport, network order) as an int, for each record at once.
_DPORT = struct.Struct(f">{REC['dport']}xH{RECORD.size - REC['dport'] - 2}x")


def table_order(records: list[tuple[SocketRecord, SockState]]) -> list[tuple[SocketRecord, SockState]]:
    """Sorted as kernel/walk.table sorts inet_diag's records (walk._order: the model names the
    first of a group, so the same socket as the dump's), with each address's text made once."""
    text: dict[object, str] = {}

    def ep(e: Endpoint) -> str:
        got = text.get(e.addr)
        if got is None:
            got = text[e.addr] = f"[{fmt_addr(e.addr)}]" if e.addr.version == 6 else str(e.addr)
        return f"{got}:{e.port}"

    def key(p: tuple[SocketRecord, SockState]) -> tuple[int, str, int, int, str, str]:
        r = p[0]
        listen = -int(r.state is State.LISTEN)
        return (r.local.port, r.proto.value, r.family.value, listen, ep(r.local), ep(r.remote))

    return sorted(records, key=key)


def to_records(got: PortSockets, hz: int) -> list[tuple[SocketRecord, SockState]]:
    """Every socket of the walk as (record, state); cookies given where the kernel has none."""
    out = []
    for i, (st, inode, left) in enumerate(zip(got.owners.sockets, got.inodes, got.tw_left, strict=True)):
        tw = st.kind is SockKind.TIMEWAIT
        cookie = st.cookie or LOCAL_COOKIE | i
        out.append((to_record(st, inode, jiffies_to_ms(left, hz) if tw else None, cookie), st))
    return out


def problem(got: PortOwners) -> str | None:
    """Why the walk cannot stand for the port's table, or None."""
    if got.truncated:
        return f"more than the {len(got.sockets)} sockets read"
    if got.faulted or got.inconsistent:
        return "the bind hash changed while it was read"
    return None


# ---------------------------------------------------------------------------------------------
# reading (I/O)


@dataclass(frozen=True, slots=True)
class _Run:
    """One run of the owners program: the state map's value and the records, as read."""

    netns: int
    state: bytes
    data: bytes
    #: CLOCK_MONOTONIC (ns) before and after the run
    before: int
    after: int


def _run(port: int, limit: int, only_state: int = 0) -> _Run | Unavailable:
    """One run of the owners program for ``port`` (this thread's network namespace);
    ``only_state``: its sockets in that TCP state alone (0: all)."""
    from rebind.errors import RebindError
    from rebind.kernel.bpf import bindhash as bh
    from rebind.kernel.bpf import btf as btfmod
    from rebind.kernel.bpf.sockiter import current_netns, load_sock_layout
    from rebind.kernel.bpf.syscall import check_bpf_environment

    if not 0 < port < 1 << 16:
        return Unavailable(f"port {port} out of range")
    try:
        check_bpf_environment(honour_no_bpf=True)
        lay, sock = bh.load_layout(), load_sock_layout()
        here = current_netns()
        before = time.monotonic_ns()
        state, data = bh._run_owners(lay, sock, port, bh._limit(limit), only_state)
        after = time.monotonic_ns()
    except (OSError, RebindError, btfmod.BTFError) as exc:
        return Unavailable(bh._reason(exc))
    return _Run(here, state, data, before, after)


def read_port_sockets(port: int, limit: int, *, only_state: int = 0) -> PortSockets | Unavailable:
    """read_port_owners with each socket's extras (this thread's network namespace);
    ``only_state``: only the sockets in that TCP state (skc_state, e.g. TCP_CLOSE for the
    bound-inactive ones), the others walked past in the kernel."""
    from rebind.kernel.bpf import bindhash as bh
    from rebind.kernel.bpf.bindowners import OwnerState

    run = _run(port, limit, only_state)
    if isinstance(run, Unavailable):
        return run
    here, state, data, before, after = run.netns, run.state, run.data, run.before, run.after
    owners, rows, dec = bh._owners_and_rows(here, port, state, data)
    jiffies = int.from_bytes(state[OwnerState.JIFFIES : OwnerState.JIFFIES + 8], "little")
    inodes = tuple(_column(rows, dec.bucket))
    stamps = _column(rows, dec.stamp)  # bindowners.EXTRA_FILE: a full socket's file
    return PortSockets(
        owners,
        inodes,
        tuple(_column(rows, dec.chain_after)),
        jiffies,
        (before + after) // 2,
        tuple(s if i else 0 for i, s in zip(inodes, stamps, strict=True)),
    )


def _column(rows: list[tuple[Any, ...]], at: int) -> list[int]:
    return [r[at] for r in rows]


def calibrate_hz(*, wait: float = 0.5) -> int | None:
    """The kernel's HZ (jiffies per second): known (kernel/hz.py), else from two runs of the
    owners program at least 100 ms apart (port 1's chain: nothing of ours is walked), kept for
    the process and the boot; None if BPF cannot run (asked again next time: that fails at
    once) or the rate stayed ambiguous for ``wait`` seconds (kept: the snapshots take inet_diag's
    dumps)."""
    from rebind.kernel import hz as hzmod

    known = hzmod.known_hz()
    if known is not None or "hz" in hzmod._MEMO:
        return known  # known, or a measurement that stayed ambiguous (not made again)
    first = read_port_sockets(1, 1)
    if isinstance(first, Unavailable):
        return None
    deadline = time.monotonic() + wait
    time.sleep(0.1)
    while True:
        now = read_port_sockets(1, 1)
        if isinstance(now, Unavailable):
            return None
        hz = snap_hz(now.jiffies - first.jiffies, now.mono_ns - first.mono_ns)
        if hz is not None or time.monotonic() > deadline:
            hzmod.remember(hz)
            return hz
        time.sleep(0.05)


def port_records(
    port: int, limit: int, without: int = 0
) -> tuple[list[SocketRecord], SockStates] | Unavailable:
    """The port's sockets as the records inet_diag would give, in its table's order, and beside
    them (one per record, in that order) each as the kernel holds it, in this thread's
    namespace; the full socket whose inode is ``without`` (non-zero) left out (the failing
    socket of a listen()). Unavailable where the bind-hash walk cannot stand for inet_diag's
    dump (see :func:`problem`) or HZ is not calibrated (a TIME_WAIT's time left)."""
    hz = calibrate_hz()
    if hz is None:
        return Unavailable("HZ not calibrated: a TIME_WAIT's time left would be unknown")
    run = _run(port, limit)
    if isinstance(run, Unavailable):
        return run
    return decode_port(run.netns, port, run.state, run.data, hz, without)


def decode_port(
    netns: int, port: int, state: bytes, data: bytes, hz: int, without: int = 0
) -> tuple[list[SocketRecord], SockStates] | Unavailable:
    """The owners program's output (``state``, ``data``) for ``port`` as :func:`port_records`
    gives it (pure): what :func:`to_records`, :func:`table_order` and the SockStates of
    read_port_owners give, socket for socket (tests/unit/test_trace_bindhash.py compares them),
    at a port of ten thousand TIME_WAITs' speed (docs/benchmarks.md). Every row is unpacked at
    once (struct.iter_unpack); what sockets alike share -- the SockCommon, the record's fields
    but the remote end, cookie, inode and time left, the sort key but the remote end -- is made
    once per distinct SockCommon (:class:`_Alike`); each socket's own objects are built in
    plain classes of their slots (rebind/slotted.py: a frozen dataclass's __init__ sets each
    field through object.__setattr__, ~6x the time); and the order is the sort of one string a
    socket (the remote end) where the sockets all share the rest of walk._order's key."""
    from rebind.kernel.bpf.bindhash import port_owners
    from rebind.kernel.bpf.sockdecode import BulkDecoder

    dec = BulkDecoder(Proto.TCP)
    fi, li, fa, ci, ui = dec.faults, dec.lport, dec.family, dec.cookie, dec.uid
    rcv, rcv6, da, da6, runs = dec.rcv, dec.rcv6, dec.daddr, dec.daddr6, dec._runs
    ino_at, left_at, ts_at, stamp_at, seq_at = dec.bucket, dec.chain_after, dec.ts, dec.stamp, dec.seq
    commons, new_common = dec.commons, dec.new_common
    alike: dict[int, _Alike] = {}  # by id(SockCommon): the commons are kept by ``dec``
    addrs: dict[bytes, tuple[IPAddress, str]] = {}
    walked: list[SockState] = []  # every socket kept, in the walk's order
    records: list[SocketRecord] = []
    states: list[SockState] = []
    remotes: list[str] = []  # each record's remote end as walk._order writes it
    inet, tw_timer, no_timer, local_cookie = Family.INET, Timer.TIME_WAIT, Timer.NONE, LOCAL_COOKIE
    i = -1
    for index, (v, (dport,)) in enumerate(zip(dec.rows(data), _DPORT.iter_unpack(data), strict=True)):
        # a faulted record, or one of another port (a socket reused mid-walk): left out, counted
        if v[fi] or v[li] != port:
            continue
        i += 1
        fam, uid = v[fa], v[ui]
        key = (uid, v[rcv] if fam == inet else v[rcv6], fam, runs(v))
        common = commons.get(key)
        if common is None:
            common = new_common(key, data, index, uid)
        a = alike.get(id(common))
        if a is None:
            a = alike[id(common)] = _Alike(common)
        raw = v[da] if fam == inet else v[da6]
        addr = addrs.get(raw)
        if addr is None:
            addr = addrs[raw] = _addr_text(fam, raw)
        remote = _EndpointSlots()
        remote.addr, remote.port = addr[0], dport
        remote.__class__ = Endpoint
        cookie = v[ci]
        tw = a.tw
        st = _StateSlots()
        st.common = common
        st.remote = remote
        st.cookie = cookie
        st.tw_ts_recent = v[ts_at] if tw else None
        st.tw_ts_recent_stamp = v[stamp_at] if tw else None
        st.chain = None
        st.seq = v[seq_at]
        st.__class__ = SockState
        walked.append(st)
        inode = None if tw else v[ino_at] or None
        if without and inode == without:
            continue  # the failing socket itself (a listen() fails on a socket bound to the port)
        # every field, in SocketRecord's order (to_record's values)
        r = _RecordSlots()
        r.proto = a.proto
        r.family = a.family
        r.state = a.state
        r.local = a.local
        r.remote = remote
        r.uid = a.uid
        r.inode = inode
        r.cookie = cookie or local_cookie | i
        r.ifindex = a.ifindex
        r.timer = tw_timer if tw else no_timer
        r.expires_ms = -(-v[left_at] * 1000 // hz) if tw else None  # jiffies_to_ms: a u32
        r.v6only = a.v6only
        r.cgroup_id = None
        r.rqueue = 0
        r.wqueue = 0
        r.netns = a.netns
        r.birth = None
        r.__class__ = SocketRecord
        records.append(r)
        states.append(st)
        remotes.append(f"{addr[1]}:{dport}")
    owners = port_owners(netns, port, state, tuple(walked), len(data) // RECORD.size)
    why = problem(owners)
    if why is not None:
        return Unavailable(why)
    # walk._order: (port, proto, family, listening first, local, remote) -- all but the remote
    # end are the SockCommon's: one string a socket to sort by where they all share the rest
    # (sorted() is stable: equal keys keep the walk's order, as they do in table_order)
    if len({a.key for a in alike.values()}) <= 1:
        order = sorted(range(len(records)), key=remotes.__getitem__)
    else:
        full = [(alike[id(st.common)].key, text) for st, text in zip(states, remotes, strict=True)]
        order = sorted(range(len(records)), key=full.__getitem__)
    return [records[j] for j in order], SockStates(netns, tuple([states[j] for j in order]))


class _Alike:
    """What the sockets of one SockCommon share in their records (as :func:`to_record` makes
    them: taken from its record for the first of them) and in walk._order's key."""

    __slots__ = ("family", "ifindex", "key", "local", "netns", "proto", "state", "tw", "uid", "v6only")

    def __init__(self, common: SockCommon) -> None:
        r = to_record(SockState(common, common.local, 0), 0, 0, 1)
        self.tw = common.kind is SockKind.TIMEWAIT
        self.proto, self.family, self.state, self.local, self.uid = r.proto, r.family, r.state, r.local, r.uid
        self.ifindex, self.v6only, self.netns = r.ifindex, r.v6only, r.netns
        self.key = (r.local.port, r.proto.value, r.family.value, -int(r.state is State.LISTEN), str(r.local))


def _addr_text(family: int, raw: bytes) -> tuple[IPAddress, str]:
    """An address from the record, and how walk._order writes it in an endpoint."""
    if family == Family.INET:
        a4 = IPv4Address(raw)
        return a4, str(a4)
    a6 = IPv6Address(raw)
    return a6, f"[{fmt_addr(a6)}]"
