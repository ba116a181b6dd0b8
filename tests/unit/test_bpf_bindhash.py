"""The bind-hash reader without a kernel: its layout from a hand-built BTF blob (x86_64 Linux
6.18.44's offsets), the entries and records decoded, and the programs' shape (helpers, stack,
jumps). Its kernel behaviour is tests/kernel/test_bindhash_kernel.py."""

from __future__ import annotations

import struct

import pytest

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import bindhash as H
from rebind.kernel.bpf import bindhashlayout as L
from rebind.kernel.bpf import btf as B
from rebind.kernel.bpf import socklayout as R
from rebind.kernel.bpf.bindowners import (
    FUNCS,
    GLOBAL_FUNCS,
    STEPS_EXHAUSTED,
    EmitFrame,
    OwnerState,
    StepFrame,
    build_owners_program,
)
from rebind.kernel.bpf.bindprog import HELPER_GET_CURRENT_TASK, BucketFrame, NetState, build_bucket_program
from rebind.model.records import State
from rebind.model.sockstate import BindBucket, PortBucket, SockKind, Unavailable
from tests.unit.test_bpf_sockiter import _record, fake_layout
from tests.unit.test_btf import Blob

#: x86_64 Linux 6.18.44 (bytes).
OFFSETS = {
    "task_struct.nsproxy": 1840,
    "nsproxy.net_ns": 40,
    "net.hash_mix": 432,
    "net.ipv4.tcp_death_row.hashinfo": 960,
    "inet_hashinfo.bhash": 32,
    "inet_hashinfo.bhash_size": 56,
    "inet_bind_hashbucket.chain": 8,
    "hlist_head.first": 0,
    "hlist_node.next": 0,
    "inet_bind_bucket.ib_net.net": 0,
    "inet_bind_bucket.l3mdev": 8,
    "inet_bind_bucket.port": 12,
    "inet_bind_bucket.fastreuse": 14,
    "inet_bind_bucket.fastreuseport": 15,
    "inet_bind_bucket.fastuid": 16,
    "inet_bind_bucket.fast_v6_rcv_saddr": 20,
    "inet_bind_bucket.fast_rcv_saddr": 36,
    "inet_bind_bucket.fast_sk_family": 40,
    "inet_bind_bucket.fast_ipv6_only": 42,
    "inet_bind_bucket.node": 48,
    "inet_bind_bucket.bhash2": 64,
    "inet_bind2_bucket.ib_net.net": 0,
    "inet_bind2_bucket.port": 12,
    "inet_bind2_bucket.bhash_node": 48,
    "inet_bind2_bucket.owners": 64,
    "sock_common.skc_bind_node": 24,
    "sock_common.skc_num": 14,
    "sock_common.skc_state": 18,
    "sock_common.skc_net": 48,
    "sock_common.skc_cookie": 88,
    "sock.sk_socket": 288,
    "socket_alloc.socket": 0,
    "socket_alloc.vfs_inode": 128,
    "socket.file": 16,
    "inode.i_ino": 64,
    "inet_timewait_sock.tw_timer.expires": 176,
}
_SIZES = {f"{s}.{m}": size for s, m, size in L.MEMBERS}
FAKE = L.BindHashLayout(tuple(OFFSETS.items()), (("inet_bind_hashbucket", 16),))


def _blob(drop: str = "", wrong_size: str = "") -> bytes:
    """vmlinux-like BTF with the members the layout reads, at 6.18's offsets (struct sizes and
    other members left out: the reader needs only these)."""
    b = Blob()
    sizes = {1: b.int_("u8", 1), 2: b.int_("u16", 2), 4: b.int_("u32", 4), 8: b.int_("u64", 8)}
    in6 = b.struct_("in6_addr", 16, [("s6_addr32", sizes[8], 0)])
    node = b.struct_("hlist_node", 16, [("next", sizes[8], 0), ("pprev", sizes[8], 64)])
    head = b.struct_("hlist_head", 8, [("first", sizes[8], 0)])
    netp = b.struct_("", 8, [("net", sizes[8], 0)])
    possible = b.add("possible_net_t", B.KIND_TYPEDEF, 0, netp)
    atomic = b.struct_("", 8, [("counter", sizes[8], 0)])
    kinds = {"node": node, "bhash_node": node, "skc_bind_node": node, "chain": head, "bhash2": head,
             "owners": head, "fast_v6_rcv_saddr": in6, "skc_cookie": atomic}  # fmt: skip
    death = b.struct_("inet_timewait_death_row", 64, [("hashinfo", sizes[8], 64 * 8)])
    ipv4 = b.struct_("netns_ipv4", 1024, [("tcp_death_row", death, 896 * 8)])
    timer = b.struct_("timer_list", 40, [("entry", node, 0), ("expires", sizes[8], 16 * 8)])
    opaque = b.struct_("opaque", 128, [])
    by_struct: dict[str, list[tuple[str, int, int]]] = {}
    for key, off in OFFSETS.items():
        s, _, path = key.partition(".")
        first = path.split(".")[0]
        if key == drop or s in ("hlist_node", "hlist_head"):
            continue
        if first == "ipv4":
            by_struct.setdefault(s, []).append(("ipv4", ipv4, 0))
            continue
        if first == "tw_timer":
            by_struct.setdefault(s, []).append(("tw_timer", timer, (off - 16) * 8))
            continue
        if first == "ib_net" or first == "skc_net":
            t = possible
        elif s == "socket_alloc":
            t = opaque  # any type: the programs use its offset only
        else:
            size = _SIZES[key]
            t = kinds.get(first) or sizes[2 if key == wrong_size else size]
        by_struct.setdefault(s, []).append((first, t, off * 8))
    b.struct_("inet_bind_hashbucket", 16, [("lock", sizes[4], 0), ("chain", head, 64)])
    for s, members in by_struct.items():
        if s != "inet_bind_hashbucket":
            b.struct_(s, 4096, members)
    return b.bytes()


def test_the_layout_is_read_from_btf() -> None:
    assert L.layout_from_btf(_blob()) == FAKE
    L.check_layout(FAKE)
    assert (FAKE.span("inet_bind_bucket"), FAKE.span("inet_bind2_bucket")) == (72, 72)


@pytest.mark.parametrize("key", ["sock_common.skc_bind_node", "inet_bind2_bucket.owners", "net.hash_mix"])
def test_a_member_this_kernel_lacks_is_a_btf_error(key: str) -> None:
    with pytest.raises(B.BTFError):
        L.layout_from_btf(_blob(drop=key))


def test_a_member_of_another_size_is_a_btf_error() -> None:
    with pytest.raises(B.BTFError, match="fastuid"):
        L.layout_from_btf(_blob(wrong_size="inet_bind_bucket.fastuid"))


def test_the_layout_survives_its_cache_file_and_garbage_does_not() -> None:
    assert L.decode_layout(L.encode_layout(FAKE)) == FAKE
    assert L.decode_layout(["off x"]) is None
    lines = [line for line in L.encode_layout(FAKE) if "skc_bind_node" not in line]
    assert L.decode_layout(lines) is None
    far = tuple((k, 200 if k == "inet_bind_bucket.bhash2" else v) for k, v in FAKE.offsets)
    with pytest.raises(B.BTFError, match="more than"):
        L.check_layout(L.BindHashLayout(far, FAKE.sizes))


def test_without_bpf_both_readers_say_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBIND_NO_BPF", "1")
    assert isinstance(H.read_port_buckets([80]), Unavailable)
    assert isinstance(H.read_port_owners(80, 10), Unavailable)
    assert isinstance(H.read_port_owners(0, 10), Unavailable)


# ---------------------------------------------------------------------------------------------
# entries


def _entry(port: int, **fields: object) -> bytes:
    values: dict[str, object] = {n: (b"\0" * 16 if n == "fast_v6_rcv_saddr" else 0) for n in L.ENTRY_NAMES}
    values["fast_rcv_saddr"] = bytes(4)
    values.update({"port": port, "flags": L.RAN, **fields})
    return L.ENTRY.pack(*(values[n] for n in L.ENTRY_NAMES))


def test_entries_decode_into_shared_port_buckets() -> None:
    stale = {"fastuid": 1000, "fast_rcv_saddr": bytes([10, 0, 0, 1])}  # the program copies them only if > 0
    data = b"".join(
        [
            _entry(40000, matched=1, fastreuse=-1, fastreuseport=-1, bind2=1, owners=3),
            _entry(40001, matched=1, fastreuse=-1, fastreuseport=-1, bind2=1, owners=3),
            _entry(40002),
            _entry(8443, matched=1, fastreuseport=1, bind2=1, owners=4, fast_sk_family=2, **stale),
            _entry(40003, flags=L.RAN | L.CHAIN_TRUNCATED),
            _entry(40004, flags=0),  # not run
            _entry(40005, matched=2, flags=L.RAN | L.OWNERS_TRUNCATED, owners=16, bind2=1),
            _entry(40006, matched=1, flags=L.RAN | L.INCONSISTENT),
        ]
    )
    ports = [40000, 40001, 40002, 8443, 40003, 40004, 40005, 40006]
    got = H.decode_buckets(ports, data, owners=True)
    assert got[40000] is got[40001] and got[40000].connect_made and got[40000].exists
    assert got[40000] == PortBucket(1, -1, -1, l3mdev=0, bind2=1, owners=3)
    assert got[40002] == PortBucket(0) and not got[40002].exists and got[40002].known
    rp = got[8443]
    assert (rp.fastuid, str(rp.fast_rcv_saddr), rp.fast_sk_family, rp.connect_made) == (
        1000,
        "10.0.0.1",
        2,
        False,
    )
    assert rp.bind_bucket(8443) == BindBucket(
        8443, 0, 1, 1000, rp.fast_rcv_saddr, rp.fast_v6_rcv_saddr, 2, False
    )
    assert got[40000].bind_bucket(40000) == BindBucket(40000, -1, -1, None, None, None, None, None)
    assert got[40003].chain_truncated and not got[40003].known
    assert got[40004].faulted and got[40006].faulted and not got[40004].known
    assert got[40005].buckets == 2 and got[40005].counts_truncated and got[40005].known
    assert PortBucket(0).bind_bucket(1) is None
    assert H.decode_buckets(ports, data)[40000].owners is None  # not counted unless asked


def test_an_entry_is_small_and_whole() -> None:
    assert L.ENTRY.size == 48 and L.ENTRY.size % 8 == 0
    assert len(H._inputs([1, 0x1234])) == 2 * L.ENTRY.size
    assert H._inputs([0x1234])[:2] == b"\x34\x12"


# ---------------------------------------------------------------------------------------------
# programs


def _insns(raw: bytes) -> list[tuple[int, int, int, int]]:
    return list(struct.iter_unpack("<BBhi", raw))


def _helpers(raw: bytes) -> set[int]:
    return {imm for code, regs, _, imm in _insns(raw) if code == asm.JMP | asm.CALL and not regs >> 4}


def _stack(raw: bytes) -> list[tuple[int, int]]:
    out = []
    for code, regs, off, _ in _insns(raw):
        cls = code & 0x07
        base = regs >> 4 if cls == asm.LDX else regs & 0xF
        if cls in (asm.LDX, asm.STX, asm.ST) and base == asm.FP:
            out.append((off, {asm.B: 1, asm.H: 2, asm.W: 4, asm.DW: 8}[code & 0x18]))
    return out


def _jumps_land_inside(raw: bytes) -> bool:
    n = len(raw) // 8
    for at, (code, _, off, _) in enumerate(_insns(raw)):
        if code & 0x07 == asm.JMP and code & 0xF0 not in (asm.CALL, asm.EXIT) and not 0 <= at + 1 + off < n:
            return False
    return True


def test_the_bucket_program_calls_only_its_helpers_and_stays_in_its_frame() -> None:
    raw = build_bucket_program(FAKE, 11, 12)
    assert _helpers(raw) == {
        asm.HELPER_MAP_LOOKUP_ELEM,
        HELPER_GET_CURRENT_TASK,
        asm.HELPER_PROBE_READ_KERNEL,
    }
    for off, size in _stack(raw):
        assert off >= -512 and off + size <= 0 and off % size == 0  # aligned: the verifier wants it
    assert BucketFrame.TB2 + L.SPAN_MAX <= BucketFrame.TB and BucketFrame.TB + L.SPAN_MAX <= BucketFrame.HOP3
    assert _jumps_land_inside(raw)
    text = "\n".join(asm.disassemble(raw))
    assert f"r3 *= {hex(16)}" in text  # sizeof(inet_bind_hashbucket) from BTF, the chain's stride


def test_the_owners_program_emits_the_iterators_record() -> None:
    raw, funcs = build_owners_program(FAKE, fake_layout(), 11, 12)
    assert _helpers(raw) >= {181, HELPER_GET_CURRENT_TASK, asm.HELPER_PROBE_READ_KERNEL}
    assert _helpers(raw) <= {181, 1, 35, 113, 118}  # 118: bpf_jiffies64 (HZ, TIME_WAIT timers)
    assert [(name, n) for name, _, n in funcs] == list(FUNCS)
    assert sorted(GLOBAL_FUNCS) == ["rebind_emit"]
    main, step, emit = (at for _, at, _ in funcs)
    assert main == 0 < step < emit < len(raw) // 8
    # each function stays in its frame; together they fit the 512 bytes of the call chain
    frames = [_stack(raw[a * 8 : b * 8]) for a, b in ((main, step), (step, emit), (emit, len(raw) // 8))]
    depths = [-min(off for off, _ in f) for f in frames]
    assert depths[1] <= -StepFrame.TB and depths[2] <= -EmitFrame.INDEX and sum(depths) <= 512
    assert all(off % size == 0 for f in frames for off, size in f)
    assert _jumps_land_inside(raw)
    assert OwnerState.NET == NetState.NET and OwnerState.PORT >= NetState.SIZE
    text = asm.disassemble(raw)
    assert sum("call pc" in line for line in text) == 1  # the step calls emit, once


def _state(**fields: int) -> bytes:
    buf = bytearray(OwnerState.SIZE)
    for name, value in fields.items():
        struct.pack_into("<I", buf, getattr(OwnerState, name), value)
    return bytes(buf)


def test_owner_records_decode_into_the_iterators_sockstates() -> None:
    tw = {"family": 2, "lport": 9000, "state": State.TIME_WAIT, "kind": R.KIND_TIMEWAIT,
          "rcv_saddr": bytes([127, 0, 0, 1]), "tw_substate": State.TIME_WAIT, "has_bucket": 1,
          "tb_port": 9000, "tw_connect_bind": R.ABSENT}  # fmt: skip
    data = b"".join(
        [
            _record(cookie=5, dport=(40001).to_bytes(2, "big"), **tw),
            _record(cookie=6, dport=(40002).to_bytes(2, "big"), **tw),
            _record(cookie=7, faults=1, **tw),
            _record(cookie=8, **{**tw, "lport": 9001}),
            _record(cookie=9, uid=1000, sk_uid=1000, family=2, lport=9000, state=State.LISTEN, userlocks=12),
        ]
    )
    got = H._owners_of(4026531840, 9000, _state(FLAGS=L.RAN, BUCKETS=1, BIND2=1, EMITTED=5), data)
    assert [s.cookie for s in got.sockets] == [5, 6, 9]
    assert got.faulted == 2 and not got.truncated and not got.inconsistent and got.buckets == 1
    assert got.sockets[0].common is got.sockets[1].common and got.sockets[0].kind is SockKind.TIMEWAIT
    assert got.sockets[0].remote.port == 40001 and got.sockets[2].uid == 1000
    cut = H._owners_of(1, 9000, _state(FLAGS=L.OWNERS_TRUNCATED), b"")
    assert cut.truncated and cut.sockets == ()
    assert H._owners_of(1, 9000, _state(FLAGS=STEPS_EXHAUSTED), b"").truncated
    assert H._owners_of(1, 9000, _state(), b"").truncated  # never reached its end
    bad = H._owners_of(1, 9000, _state(FLAGS=L.RAN | L.FAULTED | L.INCONSISTENT, SKIPPED=2), b"")
    assert bad.faulted == 3 and bad.inconsistent


def test_a_global_function_is_marked_so_in_the_func_info_btf() -> None:
    blob = B.encode_funcs([("rebind_step", 2), ("rebind_emit", 2)], GLOBAL_FUNCS)
    b = B.BTF(blob)
    step, emit = (b.find(name, B.KIND_FUNC) for name in ("rebind_step", "rebind_emit"))
    vlen = {tid: b._words[b._record(tid) + 1] & 0xFFFF for tid in (step, emit)}
    assert (vlen[step], vlen[emit]) == (B.FUNC_STATIC, B.FUNC_GLOBAL)


# ---------------------------------------------------------------------------------------------
# the whole port space at once: the sparse grouping and the bind-made columns


def _space() -> tuple[list[int], bytes]:
    """Entries of a client host's ports: mostly free, a run of connect()-made ones, some made
    by bind() (a listener's; one joined by bind() with SO_REUSEADDR: fastreuse stays -1,
    fastreuseport 0), one faulted free, one with two l3mdev buckets."""
    ports = list(range(1000, 3000))
    made = {"matched": 1, "fastreuse": -1, "fastreuseport": -1, "bind2": 1}
    kinds: dict[int, dict[str, object]] = {p: dict(made) for p in range(2000, 2100)}
    kinds[1500] = {"matched": 1, "fastreuse": 0, "fastreuseport": 0, "bind2": 1}
    kinds[2050] = {"matched": 1, "fastreuse": -1, "fastreuseport": 0, "bind2": 2}
    kinds[2500] = {"flags": L.RAN | L.CHAIN_TRUNCATED}
    kinds[2600] = {"matched": 2, "fastreuse": 1, "fastreuseport": 0, "bind2": 1}
    return ports, b"".join(_entry(p, **kinds.get(p, {})) for p in ports)


def _by_dict(ports: list[int], data: bytes) -> dict[bytes, list[int]]:
    groups: dict[bytes, list[int]] = {}
    for p, (rest,) in zip(ports, H._REST.iter_unpack(data), strict=True):
        groups.setdefault(rest, []).append(p)
    return groups


def test_sparse_grouping_is_the_dict_s() -> None:
    ports, data = _space()
    # a free port's entry with more than RAN (port 2500's walk was cut short) is not
    # _FREE_REST: the dict pass sorts that
    assert H._sparse_groups(ports, data) is None
    at = ports.index(2500) * H.ENTRY.size
    data = data[:at] + _entry(2500) + data[at + H.ENTRY.size :]
    got = H._sparse_groups(ports, data)
    assert got is not None
    assert dict(got) == _by_dict(ports, data)
    assert dict(got)[H._FREE_REST][:3] == [1000, 1001, 1002]
    # many held: left to the dict pass; a free port's faulted entry is its own group there
    busy = b"".join(_entry(p, matched=1, fastreuse=-1, fastreuseport=-1) for p in ports)
    assert H._sparse_groups(ports, busy) is None
    bad = bytearray(data)
    bad[H.ENT["flags"]] = 0  # port 1000 free, not run: not _FREE_REST
    assert H._sparse_groups(ports, bytes(bad)) is None


def test_bind_made_columns() -> None:
    ports, data = _space()
    got = H.bind_made_of(ports, data)
    # 1500 bind()'s; 2050 joined by bind() (fastreuseport no longer -1); 2600 has two buckets
    assert got.ports == [1500, 2050, 2600]
    assert got.unknown == [2500, 2600]
    assert H.bind_made_of([], b"") == H.BindMade([], [])
