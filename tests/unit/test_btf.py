"""The BTF reader and writer on hand-built blobs (include/uapi/linux/btf.h layouts)."""

from __future__ import annotations

import struct

import pytest

from rebind.kernel.bpf import btf as B


class Blob:
    """Builds a BTF blob type by type; ids are 1, 2, ... in call order; strings deduplicated
    as pahole does."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}
        self.types = bytearray()
        self.next_id = 1

    def s(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self.offsets[name]

    def add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: int = 0
    ) -> int:
        self.types += struct.pack("<III", self.s(name), kflag << 31 | kind << 24 | vlen, size_or_type)
        self.types += extra
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int) -> int:
        return self.add(name, B.KIND_INT, 0, size, struct.pack("<I", size * 8))

    def struct_(self, name: str, size: int, members: list[tuple[str, int, int]], kflag: int = 0) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, bits) for n, t, bits in members)
        return self.add(name, B.KIND_STRUCT, len(members), size, extra, kflag)

    def bytes(self) -> bytes:
        hdr = struct.pack(
            "<HBBIIIII", B.BTF_MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return hdr + bytes(self.types) + bytes(self.strings)


def sample() -> tuple[bytes, dict[str, int]]:
    b = Blob()
    ids: dict[str, int] = {}
    ids["u32"] = b.int_("unsigned int", 4)
    ids["u16"] = b.int_("unsigned short", 2)
    ids["u64"] = b.int_("unsigned long", 8)
    ids["umode_t"] = b.add("umode_t", B.KIND_TYPEDEF, 0, ids["u16"])
    ids["const_u64"] = b.add("", B.KIND_CONST, 0, ids["u64"])
    ids["enum"] = b.add("e", B.KIND_ENUM, 2, 4, struct.pack("<IiIi", b.s("A"), 0, b.s("B"), 1))
    ids["fwd"] = b.add("inode", B.KIND_FWD, 0, 0)  # a forward declaration, same name
    ids["anon"] = b.struct_("", 16, [("i_ino", ids["const_u64"], 0), ("i_gen", ids["u32"], 64)])
    ids["union"] = b.add(
        "", B.KIND_UNION, 1, 16, struct.pack("<III", 0, ids["anon"], 0)
    )  # anonymous union holding the anonymous struct
    ids["inode"] = b.struct_(
        "inode", 40, [("i_mode", ids["umode_t"], 0), ("i_flags", ids["u32"], 32), ("", ids["union"], 64)]
    )
    ids["proto"] = b.add("", B.KIND_FUNC_PROTO, 2, ids["u32"], struct.pack("<IIII", b.s("a"), 1, b.s("b"), 2))
    ids["func"] = b.add("bpf_iter_demo", B.KIND_FUNC, 1, ids["proto"])
    ids["wrap"] = b.struct_("wrap", 48, [("pad", ids["u64"], 0), ("in", ids["inode"], 64)])
    ids["bits"] = b.struct_(
        "bits", 4, [("lo", ids["u32"], 3 << 24 | 0), ("hi", ids["u32"], 29 << 24 | 3)], kflag=1
    )
    return b.bytes(), ids


def test_find_all_gives_the_ids_of_each_name_and_kind() -> None:
    data, ids = sample()
    b = B.BTF(data)
    got = b.find_all([("inode", B.KIND_STRUCT), ("bpf_iter_demo", B.KIND_FUNC), ("inode", B.KIND_FWD)])
    assert got == {
        ("inode", B.KIND_STRUCT): ids["inode"],
        ("bpf_iter_demo", B.KIND_FUNC): ids["func"],
        ("inode", B.KIND_FWD): ids["fwd"],
    }
    # a second lookup of something the walk passed by is answered from the index
    assert b.find("e", B.KIND_ENUM) == ids["enum"]
    assert b.kind(ids["proto"]) == B.KIND_FUNC_PROTO


def test_members_direct_anonymous_and_nested() -> None:
    data, ids = sample()
    b = B.BTF(data)
    inode = b.find("inode", B.KIND_STRUCT)
    assert b.member(inode, "i_mode") == B.Member(0, 2, B.KIND_INT, ids["u16"])
    assert b.member(inode, "i_flags") == B.Member(4, 4, B.KIND_INT, ids["u32"])
    # inside an anonymous union > anonymous struct, const peeled
    assert b.member(inode, "i_ino") == B.Member(8, 8, B.KIND_INT, ids["u64"])
    assert b.member(inode, "i_gen").offset == 16
    wrap = b.find("wrap", B.KIND_STRUCT)
    assert b.member(wrap, "in.i_ino").offset == 8 + 8
    assert b.member(wrap, "in").kind == B.KIND_STRUCT
    with pytest.raises(B.BTFError, match="no member"):
        b.member(inode, "i_nope")
    with pytest.raises(B.BTFError, match="bitfield"):
        b.member(b.find("bits", B.KIND_STRUCT), "hi")


def test_missing_names_and_kinds_are_errors() -> None:
    data, _ = sample()
    b = B.BTF(data)
    with pytest.raises(B.BTFError, match="no BTF name"):
        b.find("task_struct", B.KIND_STRUCT)
    with pytest.raises(B.BTFError, match="of kind"):
        b.find("bpf_iter_demo", B.KIND_STRUCT)
    with pytest.raises(B.BTFError, match="out of range"):
        b.kind(999)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:10],
        lambda d: b"\x00\x00" + d[2:],
        lambda d: d[:2] + b"\x02" + d[3:],  # version 2
        lambda d: d[:8] + struct.pack("<I", 0) + struct.pack("<I", len(d)) + d[16:],  # type_len huge
    ],
)
def test_malformed_headers_are_refused(mutate: object) -> None:
    data, _ = sample()
    with pytest.raises(B.BTFError):
        B.BTF(mutate(data))  # type: ignore[operator]


def test_a_truncated_type_section_is_an_error_not_a_crash() -> None:
    data, _ = sample()
    _, type_len, _, str_len = struct.unpack_from("<IIII", data, 8)
    cut = type_len - 8  # the last record ("bits") loses its last member's tail
    hdr = data[:8] + struct.pack("<IIII", 0, cut, cut, str_len)
    b = B.BTF(hdr + data[24 : 24 + cut] + data[24 + type_len :])
    with pytest.raises(B.BTFError, match="truncated"):
        b.find("bits", B.KIND_STRUCT)


def test_encode_funcs_round_trips_through_the_reader() -> None:
    blob = B.encode_funcs([("main", 1), ("cb", 2), ("check", 3)])
    b = B.BTF(blob)
    got = b.find_all([("main", B.KIND_FUNC), ("cb", B.KIND_FUNC), ("check", B.KIND_FUNC)])
    # the ids prog_load()'s func_info relies on (kernel/bpf/syscall.py): 3, 5, 7
    assert [got["main", B.KIND_FUNC], got["cb", B.KIND_FUNC], got["check", B.KIND_FUNC]] == [3, 5, 7]
    assert b.kind(6) == B.KIND_FUNC_PROTO
    assert b.resolve(1) == (B.KIND_INT, 8, 1)
    with pytest.raises(B.BTFError):
        B.encode_funcs([("too_many", 6)])
