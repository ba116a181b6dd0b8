"""Birth certificates, pure parts: the map value, its BTF, the diag request and reply, the text."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from rebind.kernel import diag_codec as codec
from rebind.kernel.bpf import asm, birth_prog
from rebind.kernel.bpf import btf as btfmod
from rebind.model import birth
from rebind.model.records import Endpoint, Family, Proto, SocketEntry, SocketRecord, State
from rebind.render.sockets import birth_json
from rebind.top.model import build_rows, row_owners_text


def _value(comm: bytes = b"nginx", flags: int = birth.Flag.BIND4) -> bytes:
    return birth.VALUE.pack(5_000_000_000, 77, 4122, 4121, 1000, 8080, flags, comm)


def test_decode_converts_boot_time_to_the_epoch() -> None:
    b = birth.decode(_value(), boot_to_epoch=1_700_000_000.0)
    assert b is not None
    assert (b.pid, b.tid, b.comm, b.cgroup_id, b.uid, b.port) == (4121, 4122, "nginx", 77, 1000, 8080)
    assert b.at == 1_700_000_005.0
    assert birth_json(b)["hook"] == "bind4"  # type: ignore[index]


def test_an_empty_or_short_value_is_no_certificate() -> None:
    assert birth.decode(_value(flags=0), 0.0) is None
    assert birth.decode(b"\0" * 10, 0.0) is None


def test_hostile_comm_is_escaped() -> None:
    b = birth.decode(_value(comm=b"ev\x1b[2Jil"), 0.0)
    assert b is not None
    assert "\x1b" not in b.label and b.label.endswith("[4121]")


def test_when_shows_the_date_for_old_binds() -> None:
    b = birth.decode(_value(), 1_700_000_000.0)
    assert b is not None
    assert len(birth.when(b, b.at + 60)) == 8  # HH:MM:SS
    assert len(birth.when(b, b.at + 3 * 86400)) == 19  # YYYY-MM-DD HH:MM:SS


def test_storage_request_nests_the_map_fd() -> None:
    req = codec.storage_request(7)
    # INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u32 7 }
    assert req == struct.pack("=HH", 12, 2 | 0x8000) + struct.pack("=HHI", 8, 1, 7)
    assert codec.storage_request(None) == b""
    plain = codec.dump_request(Family.INET, Proto.TCP, 1)
    asked = codec.dump_request(Family.INET, Proto.TCP, 1, storage_fd=7)
    assert asked[16:] == plain[16:] + req and struct.unpack_from("=I", asked)[0] == len(asked)
    compat = codec.dump_request_tcp_any_family(1, storage_fd=7)
    assert compat.endswith(req)


def _reply(value: bytes) -> bytes:
    map_id = codec._rta(birth_prog_map_id := 2, struct.pack("=I", 9))
    assert birth_prog_map_id == codec.SK_DIAG_BPF_STORAGE_MAP_ID
    inner = map_id + codec._rta(codec.SK_DIAG_BPF_STORAGE_MAP_VALUE, value)
    return codec._rta(codec.SK_DIAG_BPF_STORAGE | codec.NLA_F_NESTED, inner)


def test_reply_values_are_decoded_into_the_record() -> None:
    assert codec.storage_values(_reply(_value())) == [_value()]
    msg = (
        codec.MSG_HEAD.pack(Family.INET, State.LISTEN, 0, 0)
        + codec.SockId(sport=8080).pack()
        + codec.MSG_TAIL.pack(0, 0, 128, 0, 99)
        + codec._rta(codec.Attr.SK_BPF_STORAGES | codec.NLA_F_NESTED, _reply(_value()))
    )
    rec = codec.decode_socket(Proto.TCP, memoryview(msg), boot_to_epoch=100.0)
    assert rec.birth is not None and rec.birth.pid == 4121 and rec.birth.at == 105.0
    assert codec.decode_socket(Proto.TCP, memoryview(msg)).birth is None  # not asked for


def test_map_btf_describes_the_value() -> None:
    b = btfmod.BTF(birth_prog.map_btf())
    sid = b.find("rebind_birth", btfmod.KIND_STRUCT)
    assert sid == birth_prog.VALUE_TYPE_ID
    for name, _type, off in birth_prog.MEMBERS[:-1]:  # the reader sizes no arrays: comm last
        assert b.member(sid, name).offset == off
    assert birth_prog.MEMBERS[-1][0] == "comm" and birth_prog.MEMBERS[-1][2] + 16 == birth.VALUE.size
    assert b.resolve(birth_prog.KEY_TYPE_ID)[1] == 4  # the key: a 4-byte int


def test_program_writes_every_field_and_always_allows() -> None:
    text = asm.disassemble(birth_prog.build_program(5, birth.Flag.BIND6))
    assert text[-2].endswith("r0 = 0x1") and text[-1].endswith("exit")
    assert any(line.endswith(f"call helper {birth_prog.HELPER_SK_STORAGE_GET}") for line in text)
    assert text[-3].endswith(f"*(u16 *)(r7 + {birth_prog.Off.FLAGS}) = 0x{birth.Flag.BIND6}")


def test_top_row_falls_back_to_the_certificate() -> None:
    b = birth.decode(_value(), 1_700_000_000.0)
    rec = SocketRecord(
        Proto.TCP,
        Family.INET,
        State.LISTEN,
        Endpoint(IPv4Address("127.0.0.1"), 8080),
        Endpoint(IPv4Address("0.0.0.0"), 0),
        0,
        1,
        birth=b,
    )
    (row,) = build_rows([SocketEntry(rec)])
    assert row_owners_text(row).startswith("bound by nginx[4121] at ")
    assert row_owners_text(row, 12).endswith("…")


def test_listen_program_keeps_a_bind_certificate_and_writes_no_reply() -> None:
    text = asm.disassemble(birth_prog.build_program(5, birth.Flag.LISTEN))
    out = len(text) - 2
    assert text[0].endswith(f"r2 = *(u32 *)(r1 + {birth_prog.OPS_OP})")
    assert f"if r2 == 0x{birth_prog.BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:x} goto " in text[1]
    assert text[2].endswith(f"if r2 != 0x{birth_prog.BPF_SOCK_OPS_TCP_LISTEN_CB:x} goto {out}")
    assert any(line.endswith(f"r1 = *(u16 *)(r7 + {birth_prog.Off.FLAGS})") for line in text)
    # every store goes to the map value (r7, r0 for the accepted mark): nothing to the ctx (its
    # reply stays 0) or the socket
    stores = [line.split(None, 5)[-1] for line in text if line.split(None, 5)[-1].startswith("*(")]
    assert stores and all("(r7 + " in st or "(r0 + " in st for st in stores)
    assert any(st.endswith(f"*(u16 *)(r7 + {birth_prog.Off.FLAGS}) = 0x{birth.Flag.LISTEN}") for st in stores)
    # accepted: look up (flags 0: never create), set the bit, keep the rest (the listener's)
    accepted = int(text[1].rsplit(None, 1)[1])
    tail = text[accepted:]
    assert any(line.endswith("r4 = 0x0") for line in tail)
    assert any(line.endswith(f"r1 |= 0x{birth.Flag.ACCEPTED:x}") for line in tail)
    assert [st for st in stores if "(r0 + " in st] == [f"*(u16 *)(r0 + {birth_prog.Off.FLAGS}) = r1"]


def test_pins_need_a_bpf_filesystem_and_only_sys_fs_bpf_is_mounted_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rebind.kernel import birth as kbirth
    from rebind.kernel.bpf.syscall import BPFUnavailable

    mounts = [("/", "/", "ext4"), ("/sys", "/", "sysfs"), ("/mnt/b", "/", "bpf")]
    monkeypatch.setattr(kbirth, "_mounts", lambda: mounts)
    kbirth._ensure_bpffs("/mnt/b/rebind")  # a bpffs already: nothing to do
    with pytest.raises(BPFUnavailable, match="not a BPF filesystem"):
        kbirth._ensure_bpffs("/tmp/elsewhere/rebind")  # never mounts anywhere but /sys/fs/bpf
    assert kbirth._fstype_of("/sys/fs/bpf") == "sysfs"
    mounts.append(("/sys/fs/cgroup/unified", "/", "cgroup2"))
    assert kbirth.cgroup2_root() == "/sys/fs/cgroup/unified"
    mounts.append(("/sys/fs/cgroup", "/", "cgroup2"))
    assert kbirth.cgroup2_root() == "/sys/fs/cgroup"


def test_connect_program_certifies_only_a_socket_without_a_port() -> None:
    text = asm.disassemble(birth_prog.build_program(5, birth.Flag.CONNECT))
    out = len(text) - 2
    assert text[0].endswith(f"r2 = *(u32 *)(r1 + {birth_prog.ADDR_PROTOCOL})")
    assert text[2].endswith(f"if r2 != 0x{birth_prog.IPPROTO_UDP:x} goto {out}")
    assert any(line.endswith(f"r6 = *(u64 *)(r1 + {birth_prog.ADDR_SK})") for line in text)
    assert any(line.endswith(f"if r8 != 0x0 goto {out}") for line in text)  # has a port: left alone
    assert text[-3].endswith(f"*(u16 *)(r7 + {birth_prog.Off.FLAGS}) = 0x{birth.Flag.CONNECT:x}")


def test_send_program_certifies_only_a_socket_the_create_hook_marked() -> None:
    created = asm.disassemble(birth_prog.build_program(5, birth.Flag.CREATED))
    assert created[-3].endswith(f"*(u16 *)(r0 + {birth_prog.Off.FLAGS}) = 0x{birth.Flag.CREATED:x}")
    assert not any("call helper 14" in line for line in created)  # a marker: no task named
    text = asm.disassemble(birth_prog.build_program(5, birth.Flag.SEND))
    gets = [
        i for i, line in enumerate(text) if line.endswith(f"call helper {birth_prog.HELPER_SK_STORAGE_GET}")
    ]
    assert len(gets) == 1 and text[gets[0] - 1].endswith("r4 = 0x0")  # never creates
    assert any(line.endswith(f"if r1 != 0x{birth.Flag.CREATED:x} goto {len(text) - 2}") for line in text)
    assert text[-3].endswith(f"*(u16 *)(r7 + {birth_prog.Off.FLAGS}) = 0x{birth.Flag.SEND:x}")


def test_udp_reader_only_looks_and_writes_cookie_then_value() -> None:
    text = asm.disassemble(birth_prog.build_udp_reader(5, udp_sk=8, meta=0, seq=0))
    get = next(
        i for i, line in enumerate(text) if line.endswith(f"call helper {birth_prog.HELPER_SK_STORAGE_GET}")
    )
    assert text[get - 1].endswith("r4 = 0x0")
    assert text[-3].endswith("call helper 127")  # bpf_seq_write
    assert text[-4].endswith(f"r3 = 0x{birth_prog.READ_RECORD.size:x}")


def test_decode_takes_the_sockets_port_for_a_connect_certificate_and_ignores_a_marker() -> None:
    raw = birth.VALUE.pack(1, 2, 3, 3, 0, 0, birth.Flag.CONNECT, b"curl")
    b = birth.decode(raw, 0.0, port=40000)
    assert b is not None and b.port == 40000 and b.connected and not b.accepted
    assert birth_json(b)["hook"] == "connect"  # type: ignore[index]
    assert birth.decode(birth.VALUE.pack(0, 0, 0, 0, 0, 0, birth.Flag.CREATED, b""), 0.0) is None
    bound = birth.decode(_value(), 0.0, port=1)
    assert bound is not None and bound.port == 8080  # the value's own port wins


def test_phrases_say_what_the_process_did() -> None:
    now = 1_700_000_100.0
    bound = birth.decode(_value(), 1_700_000_000.0)
    accepted = birth.decode(_value(flags=birth.Flag.BIND4 | birth.Flag.ACCEPTED), 1_700_000_000.0)
    connected = birth.decode(_value(flags=birth.Flag.CONNECT), 1_700_000_000.0)
    sent = birth.decode(_value(flags=birth.Flag.SEND), 1_700_000_000.0)
    assert bound and accepted and connected and sent
    assert birth.phrase(bound, now).startswith("bound by nginx[4121] at ")
    assert birth.phrase(accepted, now).startswith("accepted on a socket bound by nginx[4121] at ")
    assert birth.phrase(connected, now).startswith("connected by nginx[4121] at ")
    assert birth.phrase(sent, now).startswith("autobound by nginx[4121] at ")
    assert birth.phrase(sent, now).endswith(" (sendmsg)")
    doc = birth_json(accepted)
    assert doc is not None and doc["accepted"] is True and doc["hook"] == "bind4"
    assert birth_json(bound)["accepted"] is False  # type: ignore[index]


def test_udp_record_takes_its_certificate_by_cookie() -> None:
    sid = codec.SockId(sport=5353, cookie=0x1234)
    msg = (
        codec.MSG_HEAD.pack(Family.INET, State.CLOSE, 0, 0) + sid.pack() + codec.MSG_TAIL.pack(0, 0, 0, 0, 99)
    )
    raw = birth.VALUE.pack(5_000_000_000, 1, 2, 2, 0, 0, birth.Flag.SEND, b"dig")
    rec = codec.decode_socket(
        Proto.UDP, memoryview(msg), boot_to_epoch=100.0, storage_by_cookie={0x1234: raw}
    )
    assert rec.birth is not None and rec.birth.comm == "dig" and rec.birth.port == 5353
    other = codec.decode_socket(Proto.UDP, memoryview(msg), boot_to_epoch=100.0, storage_by_cookie={1: raw})
    assert other.birth is None


def test_udp_reader_records_and_failures() -> None:
    from rebind.kernel import birth_udp

    one = birth_prog.READ_RECORD.pack(7, _value())
    assert birth_udp.decode_records(one + one[:10]) == {7: _value()}  # a partial record is dropped
    assert birth_udp.read(-1) is None  # any failure: no certificate, never an exception


def test_ls_table_heads_the_column_birth() -> None:
    from rebind.cli.render import _rows
    from rebind.model.records import SocketTable

    rec = SocketRecord(
        Proto.TCP,
        Family.INET,
        State.ESTABLISHED,
        Endpoint(IPv4Address("127.0.0.1"), 8080),
        Endpoint(IPv4Address("127.0.0.1"), 40000),
        0,
        1,
        birth=birth.decode(_value(flags=birth.Flag.BIND4 | birth.Flag.ACCEPTED), 1_700_000_000.0),
    )
    head, rows = _rows(SocketTable(entries=(SocketEntry(rec),), owners_scanned=False))
    assert head[-1] == "birth" and rows[0][-1].startswith("accepted on a socket bound by nginx[4121] at ")
