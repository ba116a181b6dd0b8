"""The lookup program (find a socket by 4-tuple, copy the iterator's record) and the listening-only
iterator program, checked without a kernel: built from the fixed 6.18 layout of
test_bpf_sockiter.py. Their kernel behaviour is tests/kernel/test_why_kernel_read.py."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from rebind.kernel.bpf import asm
from rebind.kernel.bpf import socklayout as R
from rebind.kernel.bpf import socklookup as L
from rebind.kernel.bpf import sockprog as P
from rebind.kernel.bpf.sockdecode import BulkDecoder, decode_one
from rebind.model.records import Endpoint, Proto, State
from tests.unit.test_bpf_sockiter import MAPS, _record, fake_layout


def _calls(insns: bytes) -> list[int]:
    return [imm for code, _, _, imm in struct.iter_unpack("<BBhi", insns) if code == asm.JMP | asm.CALL]


def _stack_offsets(insns: bytes) -> list[tuple[int, int]]:
    out = []
    for code, regs, off, _ in struct.iter_unpack("<BBhi", insns):
        cls = code & 0x07
        base = regs >> 4 if cls == asm.LDX else regs & 0xF
        if cls in (asm.LDX, asm.STX, asm.ST) and base == asm.FP:
            out.append((off, {asm.B: 1, asm.H: 2, asm.W: 4, asm.DW: 8}[code & 0x18]))
    return out


def test_the_lookup_program_releases_what_it_looks_up_and_stays_in_its_frame() -> None:
    insns = L.build_lookup_program(fake_layout(), 11, 12)
    calls = _calls(insns)
    assert calls.count(L.HELPER_SKC_LOOKUP_TCP) == 1 and calls.count(L.HELPER_SK_RELEASE) == 1
    for off, size in _stack_offsets(insns):
        assert off >= -512 and off + size <= 0
        if size == 8 and off in (L.REF_SLOT, L.ENTRY_SLOT):
            assert off % 8 == 0  # spilled pointers: aligned slots
    # the spilled slots lie below the record, outside every slot of the iterator's frame
    assert L.ENTRY_SLOT < L.REF_SLOT and L.REF_SLOT + 8 <= P.SockFrame.RECORD
    assert L.RECORD_AT + R.RECORD.size <= L.ENTRY_SIZE


def test_a_tuple_is_the_packet_to_the_socket_from_its_peer() -> None:
    local, remote = Endpoint(IPv4Address("127.0.0.1"), 9000), Endpoint(IPv4Address("127.0.0.9"), 40000)
    raw, size = L.ENTRY_IN.unpack(L._entry(local, remote)[0])
    assert size == 12 and raw[:12] == bytes([127, 0, 0, 9, 127, 0, 0, 1]) + struct.pack(">HH", 40000, 9000)
    local6, remote6 = Endpoint(IPv6Address("::1"), 9000), Endpoint(IPv6Address("fe80::2"), 40000)
    raw, size = L.ENTRY_IN.unpack(L._entry(local6, remote6)[0])
    assert (
        size == 36 and raw[:16] == IPv6Address("fe80::2").packed and raw[16:32] == IPv6Address("::1").packed
    )
    # v4-mapped both ends: looked up as IPv4, but the record is the AF_INET6 socket's own
    mapped = Endpoint(IPv6Address("::ffff:127.0.0.1"), 9000), Endpoint(IPv6Address("::ffff:127.0.0.9"), 40000)
    entry, want = L._entry(*mapped)
    raw, size = L.ENTRY_IN.unpack(entry)
    assert size == 12 and raw[:8] == bytes([127, 0, 0, 9, 127, 0, 0, 1])
    assert want == (mapped[0].addr.packed, mapped[1].addr.packed, (40000).to_bytes(2, "big"), 9000)


def test_the_map_holds_each_sockets_entry_and_the_expected_record() -> None:
    """_entries writes the IPv4 entries in place: the same bytes and expectations as _entry."""
    from rebind.model.records import Family, SocketRecord

    pairs = [
        (Endpoint(IPv4Address("127.0.0.1"), 9000), Endpoint(IPv4Address("127.0.0.9"), 40000)),
        (Endpoint(IPv6Address("::1"), 9000), Endpoint(IPv6Address("fe80::2"), 40001)),
        (Endpoint(IPv6Address("::ffff:127.0.0.1"), 9000), Endpoint(IPv6Address("::ffff:127.0.0.9"), 40002)),
        (Endpoint(IPv4Address("10.0.0.1"), 9000), Endpoint(IPv4Address("10.0.0.2"), 40003)),
    ]
    targets = [
        SocketRecord(
            Proto.TCP, Family.INET if isinstance(a.addr, IPv4Address) else Family.INET6,
            State.TIME_WAIT, a, b, None, None, cookie=i,
        )
        for i, (a, b) in enumerate(pairs)
    ]  # fmt: skip
    buf, expect = L._entries(targets)
    assert len(buf) == L.ENTRY_SIZE * len(pairs)
    for i, (a, b) in enumerate(pairs):
        entry, want = L._entry(a, b)
        at = i * L.ENTRY_SIZE
        assert buf[at : at + L.ENTRY_IN.size] == entry and expect[i] == want
        assert not any(buf[at + L.ENTRY_IN.size : at + L.ENTRY_SIZE])


def _tw(cookie: int, dport: int, **more: object) -> bytes:
    fields: dict[str, object] = dict(
        family=2, lport=9000, dport=dport.to_bytes(2, "big"), state=State.TIME_WAIT, kind=R.KIND_TIMEWAIT,
        reuse=1, rcv_saddr=bytes([127, 0, 0, 1]), daddr=bytes([127, 0, 0, 9]), tw_substate=State.TIME_WAIT,
        tw_ts_recent=cookie * 3, tw_ts_recent_stamp=cookie * 5, tw_connect_bind=R.ABSENT, cookie=cookie,
        seq_num=cookie, netns=4026531840, has_bucket=1, tb_port=9000, fastreuse=1, fastreuseport=0,
    )  # fmt: skip
    fields.update(more)
    return _record(**fields)


def _entries_of(records: list[bytes], found: list[int]) -> bytes:
    """The lookup map as the program leaves it: per entry a tuple, FOUND, the record."""
    out = bytearray(L.ENTRY_SIZE * len(records))
    for i, (rec, f) in enumerate(zip(records, found, strict=True)):
        at = i * L.ENTRY_SIZE
        struct.pack_into("<I", out, at + L.FOUND_AT, f)
        out[at + L.RECORD_AT : at + L.RECORD_AT + len(rec)] = rec
    return bytes(out)


def test_the_bulk_decoder_gives_the_codecs_answer_for_every_socket() -> None:
    """BulkDecoder shares one SockCommon among like sockets, decoded from one record: each
    socket's own fields (peer, cookie, timestamps) and whatever the memory holds in the fields of
    the other family (a TIME_WAIT's skc_v6_rcv_saddr on IPv4) must not leak between them."""
    recs = [
        _tw(1, 40001, v6_rcv_saddr=b"\x01" * 16, v6_daddr=b"\x02" * 16),
        _tw(2, 40002, v6_rcv_saddr=b"\x03" * 16),
        _tw(3, 40003, reuse=0),  # other flags: its own SockCommon
        _tw(4, 40004, kind=R.KIND_FULL, state=State.ESTABLISHED, uid=1000, sk_uid=1000, userlocks=12),
        _record(
            family=10, lport=9000, dport=(40005).to_bytes(2, "big"), state=State.TIME_WAIT, kind=R.KIND_TIMEWAIT,
            v6_rcv_saddr=IPv6Address("::1").packed, v6_daddr=IPv6Address("::2").packed, cookie=5,
            rcv_saddr=bytes([9, 9, 9, 9]), tw_substate=State.TIME_WAIT, tw_connect_bind=1,
        ),
    ]  # fmt: skip
    data = _entries_of(recs, [1] * len(recs))
    dec = BulkDecoder(Proto.TCP, lead=L._LEAD, trail=L.ENTRY_SIZE - L.RECORD_AT - R.RECORD.size)
    got = [dec.decode(v, data, i, 100 + i, 7) for i, v in enumerate(dec.rows(data))]
    for i, (st, rec) in enumerate(zip(got, recs, strict=True)):
        want = decode_one(Proto.TCP, R.RECORD.unpack(rec), cookie=100 + i, uid=7)
        assert st == want and st.common == want.common
        assert (st.remote, st.tw_ts_recent, st.seq) == (want.remote, want.tw_ts_recent, want.seq)
    assert got[0].common is got[1].common  # alike but for the other family's garbage
    assert len({id(st.common) for st in got}) == 4
    assert got[3].uid == 7 and got[0].uid is None  # the caller's uid; none for a TIME_WAIT


def test_a_record_of_another_socket_is_not_taken_for_the_one_named() -> None:
    """The 4-tuple of a socket gone since the dump may find a listener or a newer socket: the
    record must match the named socket's family, addresses and ports byte for byte."""
    from rebind.model.records import Family, SocketRecord

    def named(dport: int, family: Family = Family.INET) -> SocketRecord:
        a, b = (IPv4Address("127.0.0.1"), IPv4Address("127.0.0.9"))
        return SocketRecord(
            Proto.TCP, family, State.TIME_WAIT, Endpoint(a, 9000), Endpoint(b, dport), None, None, cookie=1
        )

    recs = [_tw(1, 40001), _tw(2, 40002), _tw(3, 40003, daddr=bytes([127, 0, 0, 8])), _tw(4, 40004)]
    data = _entries_of(recs, [1, 1, 1, 1])
    dec = BulkDecoder(Proto.TCP, lead=L._LEAD, trail=L.ENTRY_SIZE - L.RECORD_AT - R.RECORD.size)
    rows = list(dec.rows(data))
    targets = [named(40001), named(40009), named(40003), named(40004, Family.INET6)]
    wants = [L._entry(t.local, t.remote)[1] for t in targets]
    assert [L._is(dec, v, t, w) for v, t, w in zip(rows, targets, wants, strict=True)] == [
        True,  # the very socket
        False,  # another peer port
        False,  # another peer address
        False,  # another family
    ]


def test_the_listening_program_stops_at_the_first_socket_not_listening() -> None:
    plain = P.build_sock_program(fake_layout(), MAPS, proto="tcp", count=False)
    only = P.build_sock_program(fake_layout(), MAPS, proto="tcp", count=False, listeners_only=True)
    text = asm.disassemble(only)
    assert len(only) > len(plain)
    # the state test against TCP_LISTEN, and a return of 1 (bpf_iter: stop, EAGAIN to the reader)
    assert any(f"== {P.TCP_LISTEN:#x}" in line for line in text)
    assert any("r0 = 0x1" in line for line in text)
    assert not any("r0 = 0x1" in line for line in asm.disassemble(plain))
