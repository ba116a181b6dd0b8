"""The socket iterator programs and their record codec, without a kernel.

tests/data/bpf/sock_{tcp,udp,count}.txt are the disassembly of the programs for a fixed layout
(x86_64 Linux 6.18's) and a fixed map fd. When a change is intended, review the diff and
regenerate with:

    REBIND_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/unit/test_bpf_sockiter.py
"""

from __future__ import annotations

import os
import struct
from ipaddress import IPv4Address, IPv6Address
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import socklayout as R
from rebind.kernel.bpf import sockprog as P
from rebind.kernel.bpf.btf import Bits, BTFError
from rebind.kernel.bpf.sockdecode import decode_records
from rebind.model.records import Family, Proto, State
from rebind.model.sockstate import FASTREUSEPORT_ANY, ChainPos, SockKind

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "bpf"
MAPS = P.Maps(ports=11)

#: x86_64 Linux 6.18.44's positions (bit offset, bit width), so the pin depends on the program only.
FAKE_BITS = {
    "bpf_iter__tcp.meta": Bits(0, 64),
    "bpf_iter__tcp.sk_common": Bits(64, 64),
    "bpf_iter__tcp.uid": Bits(128, 32),
    "bpf_iter__udp.bucket": Bits(192, 32),
    "bpf_iter__udp.meta": Bits(0, 64),
    "bpf_iter__udp.udp_sk": Bits(64, 64),
    "bpf_iter__udp.uid": Bits(128, 32),
    "bpf_iter_meta.seq": Bits(0, 64),
    "bpf_iter_meta.seq_num": Bits(128, 64),
    "inet_bind_bucket.fast_ipv6_only": Bits(336, 8),
    "inet_bind_bucket.fast_rcv_saddr": Bits(288, 32),
    "inet_bind_bucket.fast_sk_family": Bits(320, 16),
    "inet_bind_bucket.fast_v6_rcv_saddr": Bits(160, 128),
    "inet_bind_bucket.fastreuse": Bits(112, 8),
    "inet_bind_bucket.fastreuseport": Bits(120, 8),
    "inet_bind_bucket.fastuid": Bits(128, 32),
    "inet_bind_bucket.port": Bits(96, 16),
    "inet_connection_sock.icsk_bind_hash": Bits(8704, 64),
    "inet_connection_sock.icsk_bind2_hash": Bits(8768, 64),
    "inet_timewait_sock.tw_tb2": Bits(1664, 64),
    "inet_bind2_bucket.fastreuse": Bits(576, 8),
    "inet_bind2_bucket.fastreuseport": Bits(584, 8),
    "inet_connection_sock.icsk_inet.sk": Bits(0, 6272),
    "inet_timewait_sock.__tw_common": Bits(0, 1088),
    "inet_timewait_sock.tw_connect_bind": Bits(1174, 1),
    "inet_timewait_sock.tw_substate": Bits(1120, 8),
    "inet_timewait_sock.tw_tb": Bits(1600, 64),
    "net.ns.inum": Bits(1408, 32),
    "sock.__sk_common": Bits(0, 1088),
    "sock.sk_uid": Bits(4224, 32),
    "sock.sk_userlocks": Bits(1944, 8),
    "sock_common.skc_bound_dev_if": Bits(160, 32),
    "sock_common.skc_daddr": Bits(0, 32),
    "sock_common.skc_dport": Bits(96, 16),
    "sock_common.skc_family": Bits(128, 16),
    "sock_common.skc_ipv6only": Bits(157, 1),
    "sock_common.skc_net": Bits(384, 64),
    "sock_common.skc_node": Bits(832, 128),
    "hlist_node.next": Bits(0, 64),
    "sock_common.skc_num": Bits(112, 16),
    "sock_common.skc_rcv_saddr": Bits(32, 32),
    "sock_common.skc_reuse": Bits(152, 4),
    "sock_common.skc_reuseport": Bits(156, 1),
    "sock_common.skc_state": Bits(144, 8),
    "sock_common.skc_v6_daddr": Bits(448, 128),
    "sock_common.skc_v6_rcv_saddr": Bits(576, 128),
    "tcp_timewait_sock.tw_sk": Bits(0, 1728),
    "tcp_timewait_sock.tw_ts_recent": Bits(1792, 32),
    "tcp_timewait_sock.tw_ts_recent_stamp": Bits(1856, 32),
    "udp_sock.inet.sk": Bits(0, 6272),
}


def fake_layout(**drop: bool) -> R.SockLayout:
    bits = {k: v for k, v in FAKE_BITS.items() if not drop.get(k.replace(".", "__"))}
    return R.SockLayout({"bpf_iter_tcp": 100, "bpf_iter_udp": 101}, bits)


def test_the_fixed_layout_names_every_member() -> None:
    want = {f"{s}.{m}" for s, m in (*R.SOCK_MEMBERS, *R.OPTIONAL_MEMBERS)}
    assert set(FAKE_BITS) == want
    P.check_layout(fake_layout())


@pytest.mark.parametrize(
    ("name", "proto", "count"),
    [("sock_tcp", "tcp", False), ("sock_udp", "udp", False), ("sock_count", "tcp", True)],
)
def test_programs_match_their_saved_disassembly(name: str, proto: str, count: bool) -> None:
    got = (
        "\n".join(asm.disassemble(P.build_sock_program(fake_layout(), MAPS, proto=proto, count=count))) + "\n"
    )
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("REBIND_UPDATE_GOLDEN") == "1":
        path.write_text(got)
    assert got == path.read_text(), "the program changed: see the diff, then regenerate (module doc)"


def test_a_bitfield_is_shifted_and_masked_by_its_btf_position() -> None:
    insns = P.build_sock_program(fake_layout(), MAPS, proto="tcp", count=False)
    text = asm.disassemble(insns)
    # skc_reuse: bits 152..155, i.e. byte 19, shift 0, mask 0xf; skc_reuseport: bit 156 -> >> 4, & 1
    assert any("r1 &= 0xf" in line for line in text)
    assert any("r1 >>= 0x4" in line for line in text) and any("r1 >>= 0x5" in line for line in text)


def test_a_missing_optional_member_is_recorded_as_absent() -> None:
    lay = fake_layout(inet_timewait_sock__tw_connect_bind=True)
    text = asm.disassemble(P.build_sock_program(lay, MAPS, proto="tcp", count=False))
    slot = P.SockFrame.RECORD + R.REC["tw_connect_bind"]
    assert any(f"*(u8 *)(r10 - {-slot}) = {R.ABSENT:#x}" in line for line in text)


def test_a_kernel_without_bind2_caches_gets_a_program_without_them() -> None:
    full = P.build_sock_program(fake_layout(), MAPS, proto="tcp", count=False)
    lay = fake_layout(inet_bind2_bucket__fastreuse=True)
    older = P.build_sock_program(lay, MAPS, proto="tcp", count=False)
    assert len(older) < len(full)
    slot = P.SockFrame.RECORD + R.REC["tb2_fastreuse"]
    assert not any(f"r10 - {-slot})" in line for line in asm.disassemble(older))


def test_the_layout_cache_round_trips_and_refuses_what_is_not_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rebind.kernel.bpf import sockiter
    from rebind.kernel.bpf.layoutcache import LayoutCache

    c = sockiter.LAYOUT_CACHE
    cache = LayoutCache(str(tmp_path / "layout"), c.magic, build=c.build, encode=c.encode, decode=c.decode)
    cache.write("boot 1", fake_layout())
    assert cache.read("boot 1") == fake_layout()
    assert cache.read("boot 2") is None  # another boot or BTF
    (tmp_path / "layout").chmod(0o666)
    assert cache.read("boot 1") is None  # writable by others: not trusted


def test_a_layout_that_breaks_an_assumption_is_refused() -> None:
    bits = dict(FAKE_BITS)
    bits["sock.__sk_common"] = Bits(64, 1088)
    with pytest.raises(BTFError):
        P.check_layout(R.SockLayout({}, bits))
    bits = dict(FAKE_BITS)
    bits["tcp_timewait_sock.tw_ts_recent_stamp"] = Bits(1856, 128)  # wider than its record slot
    with pytest.raises(BTFError):
        P.check_layout(R.SockLayout({}, bits))


def test_every_stack_access_is_a_named_slot() -> None:
    for (_, a, an), (_, b, bn) in combinations(P.FRAME_SLOTS, 2):
        assert not (a < b + bn and b < a + an)
    named = [(off, off + size) for _, off, size in P.FRAME_SLOTS]
    assert all(lo >= -512 and hi <= 0 for lo, hi in named)
    for proto, count in (("tcp", False), ("udp", False), ("tcp", True)):
        insns = P.build_sock_program(fake_layout(), MAPS, proto=proto, count=count)
        fp_copy = -1
        for code, regs, off, imm in struct.iter_unpack("<BBhi", insns):
            cls, dst = code & 0x07, regs & 0xF
            base = regs >> 4 if cls == asm.LDX else regs & 0xF
            if cls in (asm.LDX, asm.STX, asm.ST) and base == asm.FP:
                size = {asm.B: 1, asm.H: 2, asm.W: 4, asm.DW: 8}[code & 0x18]
                assert any(lo <= off and off + size <= hi for lo, hi in named), (hex(code), off)
            if code == asm.ALU64 | asm.ADD | asm.K and dst == fp_copy:
                assert any(lo <= imm < hi for lo, hi in named), imm
            fp_copy = dst if code == asm.ALU64 | asm.MOV | asm.X and regs >> 4 == asm.FP else -1


def _record(**fields: Any) -> bytes:
    values: dict[str, Any] = {
        n: (b"\0" * R.REC_SIZE[n] if f.endswith("s") else 0) for n, f in R.RECORD_FIELDS
    }
    values.update(fields)
    return R.RECORD.pack(*(values[n] for n in R.RECORD_NAMES))


def test_codec_decodes_a_listener_with_its_bucket() -> None:
    raw = _record(
        cookie=77, seq_num=3, netns=4026531840, uid=1000, sk_uid=1000, bound_dev_if=1, family=2, lport=8080,
        state=State.LISTEN, kind=R.KIND_FULL, reuse=1, reuseport=1, ipv6only=0, userlocks=12,
        rcv_saddr=bytes([127, 0, 0, 1]), has_bucket=3, tb2_fastreuse=0, tb2_fastreuseport=1, tb_port=8080, fastreuse=0, fastreuseport=FASTREUSEPORT_ANY,
        fastuid=1000, fast_rcv_saddr=bytes([127, 0, 0, 1]), fast_sk_family=2, fast_ipv6_only=0,
    )  # fmt: skip
    (st,), faulted = decode_records(Proto.TCP, raw)
    assert faulted == 0
    assert (st.cookie, st.seq, st.netns, st.uid, st.sk_uid, st.bound_dev_if) == (
        77,
        3,
        4026531840,
        1000,
        1000,
        1,
    )
    assert st.family is Family.INET and st.state is State.LISTEN and st.kind is SockKind.FULL
    assert str(st.local) == "127.0.0.1:8080" and str(st.remote) == "0.0.0.0:0"
    assert (st.reuseaddr, st.reuseport, st.ipv6only, st.port_locked, st.addr_locked) == (
        True,
        True,
        False,
        True,
        True,
    )
    assert st.bucket is not None and st.bucket.fast_rcv_saddr == IPv4Address("127.0.0.1")
    assert (st.bucket.port, st.bucket.fastuid, st.bucket.fast_sk_family) == (8080, 1000, 2)
    assert (st.bucket.bind2_fastreuse, st.bucket.bind2_fastreuseport) == (0, 1)
    assert st.chain is None and st.tw_substate is None and st.userlocks == 12


def test_codec_decodes_a_time_wait_and_hides_what_it_does_not_have() -> None:
    v6 = IPv6Address("2001:db8::1").packed
    raw = _record(
        family=10, lport=443, dport=(51000).to_bytes(2, "big"), state=State.TIME_WAIT, kind=R.KIND_TIMEWAIT,
        reuse=1, v6_rcv_saddr=v6, v6_daddr=v6, tw_substate=State.TIME_WAIT, tw_ts_recent=5, tw_ts_recent_stamp=9,
        tw_connect_bind=R.ABSENT, uid=0, userlocks=99, sk_uid=5, has_bucket=1, fastreuse=-1, fastreuseport=-1,
        fastuid=123, tb_port=443, tb2_fastreuse=-1, tb2_fastreuseport=-1,
    )  # fmt: skip
    (st,), _ = decode_records(Proto.TCP, raw)
    assert st.kind is SockKind.TIMEWAIT and st.tw_substate is State.TIME_WAIT
    assert str(st.remote) == "[2001:db8::1]:51000"
    assert (st.uid, st.sk_uid, st.userlocks, st.port_locked) == (None, None, None, None)
    assert (st.tw_ts_recent, st.tw_ts_recent_stamp, st.tw_connect_bind) == (5, 9, None)
    b = st.bucket
    assert b is not None and (b.fastreuse, b.fastreuseport) == (-1, -1)
    assert (b.fastuid, b.fast_rcv_saddr, b.fast_sk_family) == (
        None,
        None,
        None,
    )  # stale unless fastreuseport > 0


def test_codec_numbers_udp_chain_positions_per_bucket_and_skips_faulted_records() -> None:
    udp = {"family": 2, "state": State.CLOSE}
    recs = [
        _record(**udp, lport=53, bucket=7, seq_num=0, cookie=1, chain_after=4),
        _record(**udp, lport=53, bucket=9, seq_num=1, cookie=2, chain_after=9),
        _record(**udp, lport=53, bucket=7, seq_num=2, cookie=3, faults=1),
        _record(**udp, lport=53, bucket=7, seq_num=3, cookie=4, chain_after=0),
        _record(**udp, lport=54, bucket=1, seq_num=4, cookie=5, chain_after=R.CHAIN_UNKNOWN),
    ]
    got, faulted = decode_records(Proto.UDP, b"".join(recs))
    assert faulted == 1
    assert [(s.cookie, s.chain) for s in got] == [
        (1, ChainPos(7, 0, 1)),
        (2, ChainPos(9, 0, 0)),  # the most sockets after it: the head of the port's chain
        (4, ChainPos(7, 1, 2)),
        (5, ChainPos(1, 0, None)),  # a chain longer than the program follows: no position
    ]


def test_codec_refuses_a_torn_record() -> None:
    from rebind.kernel.bpf.syscall import BPFUnavailable

    with pytest.raises(BPFUnavailable):
        decode_records(Proto.TCP, _record()[:-1])
