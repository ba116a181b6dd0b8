"""Just enough of a BTF reader to find one FUNC's type id and a few struct member offsets.

Format: Documentation/bpf/btf.rst and include/uapi/linux/btf.h. A blob is a header, a type
section and a string section. Types are variable-length records numbered from 1 in order, so
a type's id is only known by walking every record before it: the walk stops as soon as all
that was asked for has been found (``bpf_iter_task`` is about 60% into vmlinux BTF on 6.18).
Members of anonymous struct/union members are searched too (their offsets add up).
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable
from typing import NamedTuple

BTF_MAGIC = 0xEB9F

# enum of BTF_KIND_* in include/uapi/linux/btf.h
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

#: enum btf_func_linkage: a FUNC's vlen
FUNC_STATIC, FUNC_GLOBAL = 0, 1

#: u32 words after the 12-byte ``struct btf_type``: a fixed part, and a part per ``vlen`` item.
_FIXED_WORDS = {KIND_INT: 1, KIND_ARRAY: 3, KIND_VAR: 1, KIND_DECL_TAG: 1}
_WORDS_PER_VLEN = {
    KIND_STRUCT: 3,  # struct btf_member {name_off, type, offset}
    KIND_UNION: 3,
    KIND_ENUM: 2,  # struct btf_enum {name_off, val}
    KIND_FUNC_PROTO: 2,  # struct btf_param {name_off, type}
    KIND_DATASEC: 3,  # struct btf_var_secinfo {type, offset, size}
    KIND_ENUM64: 3,  # struct btf_enum64 {name_off, val_lo32, val_hi32}
}
#: Kinds whose size_or_type is a type id to follow when asking for a size.
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_SIZED = frozenset({KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT})
POINTER_SIZE = 8  # x86_64 and aarch64; a PTR record carries no size


class BTFError(Exception):
    """The blob is malformed, or something asked for is not in it."""


class Member(NamedTuple):
    offset: int  # bytes from the start of the outer struct
    size: int  # bytes
    kind: int  # BTF kind of the member's type once typedefs/modifiers are peeled
    type_id: int  # that peeled type


class Bits(NamedTuple):
    """Where a member's value sits, to the bit: a bitfield, or a whole member (8 * size bits)."""

    bit_offset: int  # bits from the start of the outer struct (little-endian: from byte 0's LSB)
    bit_size: int


def _record_words(info: int) -> int:
    kind = (info >> 24) & 0x1F
    return 3 + _FIXED_WORDS.get(kind, 0) + _WORDS_PER_VLEN.get(kind, 0) * (info & 0xFFFF)


class BTF:
    """A BTF blob read lazily: records are indexed only as far as a lookup needs."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF blob shorter than its header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data)
        if magic != BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x} (not little-endian BTF?)")
        if version != 1:
            raise BTFError(f"unsupported BTF version {version}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if type_len % 4 or t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BTFError("BTF sections out of bounds")
        self._words = memoryview(data)[t0 : t0 + type_len].cast("I")
        self._strings = bytes(data[s0 : s0 + str_len])
        self._starts: list[int] = []  # word index of the record of type id k + 1
        self._next = 0  # word index where the first record not yet indexed starts
        self._hits: dict[tuple[str, int], int] = {}  # (name, kind) -> first id, as walked
        self._offsets: dict[str, frozenset[int]] = {}

    # -- strings ---------------------------------------------------------------------------

    def string_offsets(self, name: str) -> frozenset[int]:
        """Offset of the string ``name`` (empty if absent). vmlinux BTF is deduplicated by
        pahole, strings included, so the first copy is the only one; a name stored only as
        another string's tail would not be found: an error then, not a wrong match."""
        found = self._offsets.get(name)
        if found is None:
            raw = name.encode() + b"\0"
            if self._strings.startswith(raw):
                found = frozenset({0})
            else:
                at = self._strings.find(b"\0" + raw)
                found = frozenset() if at < 0 else frozenset({at + 1})
            self._offsets[name] = found
        return found

    def name(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off : end if end >= 0 else None].decode(errors="replace")

    # -- the walk --------------------------------------------------------------------------

    def _walk(self, until_id: int, wanted: Iterable[tuple[str, int]] = ()) -> None:
        """Index records until ``until_id`` is indexed and each (name, kind) wanted is seen.

        The hot loop of the module (~65k records to reach ``bpf_iter_task``): kept lean.
        """
        w, hits = self._words, self._hits
        i, n = self._next, len(self._words)
        append = self._starts.append
        pending = set(wanted)
        names = self._names_at({name for name, _ in pending})
        sizes: dict[int, int] = {}
        size_of = sizes.get
        left = until_id - len(self._starts)
        try:
            while i < n:
                append(i)
                info = w[i + 1]
                if w[i] in names:
                    key = (names[w[i]], (info >> 24) & 0x1F)
                    if key in pending:
                        hits[key] = len(self._starts)
                        pending.discard(key)
                        if not pending and left <= 1:
                            i += _record_words(info)
                            break
                size = size_of(info)
                if size is None:
                    size = sizes[info] = _record_words(info)
                i += size
                left -= 1
                if left <= 0 and not pending:
                    break
        except IndexError:
            raise BTFError("truncated BTF type record") from None
        if i > n:
            raise BTFError("truncated BTF type record")
        self._next = i

    def _names_at(self, names: Iterable[str]) -> dict[int, str]:
        return {off: name for name in names for off in self.string_offsets(name)}

    def _record(self, type_id: int) -> int:
        """Word index of a type's record."""
        if type_id > len(self._starts):
            self._walk(type_id)
        if not 0 < type_id <= len(self._starts):
            raise BTFError(f"type id {type_id} out of range")
        return self._starts[type_id - 1]

    def kind(self, type_id: int) -> int:
        return (self._words[self._record(type_id) + 1] >> 24) & 0x1F

    def find_all(self, wanted: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Ids of the first type of each (name, kind), found in a single walk."""
        keys = list(dict.fromkeys(wanted))
        for name, _ in keys:
            if not self.string_offsets(name):
                raise BTFError(f"no BTF name {name!r}")
        missing = [k for k in keys if k not in self._hits]
        if missing and self._starts:  # an earlier walk passed them by: look at what it indexed
            names = self._names_at({name for name, _ in missing})
            w = self._words
            for tid, at in enumerate(self._starts, 1):
                if w[at] in names:
                    self._hits.setdefault((names[w[at]], (w[at + 1] >> 24) & 0x1F), tid)
            missing = [k for k in missing if k not in self._hits]
        if missing:
            self._walk(0, missing)
            missing = [k for k in missing if k not in self._hits]
        if missing:
            name, kind = missing[0]
            raise BTFError(f"no BTF type {name!r} of kind {kind}")
        return {k: self._hits[k] for k in keys}

    def find(self, name: str, kind: int) -> int:
        """Id of the first type of ``kind`` called ``name``."""
        return self.find_all([(name, kind)])[name, kind]

    # -- structs ---------------------------------------------------------------------------

    def resolve(self, type_id: int) -> tuple[int, int, int]:
        """Peel typedefs and modifiers: (kind, size in bytes, id) of what the id names."""
        for _ in range(32):
            at = self._record(type_id)
            info, size_or_type = self._words[at + 1], self._words[at + 2]
            kind = (info >> 24) & 0x1F
            if kind in _MODIFIERS:
                type_id = size_or_type
                continue
            if kind == KIND_PTR:
                return kind, POINTER_SIZE, type_id
            if kind in _SIZED:
                return kind, size_or_type, type_id
            raise BTFError(f"type id {type_id} (kind {kind}) has no size")
        raise BTFError("typedef chain too long")

    def member(self, struct_id: int, path: str) -> Member:
        """Offset, size and kind of a struct member, looking into anonymous members.

        ``path`` may name an embedded struct's member: ``"ns.inum"`` (offsets add up).
        """
        first, *rest = path.split(".")
        found = self._named_member(struct_id, first, 0)
        for name in rest:
            found = self._named_member(found.type_id, name, found.offset)
        return found

    def bits(self, struct_id: int, path: str) -> Bits:
        """Bit offset and width of a member that may be a bitfield (``skc_reuse:4``).

        A bitfield's place changes between kernel builds (``sk_userlocks`` was ``:4`` before it
        became a u8): read it from BTF, never assume it. ``path`` as for :meth:`member`.
        """
        *outer, last = path.split(".")
        base, sid = 0, struct_id
        for name in outer:
            m = self._named_member(sid, name, base)
            base, sid = m.offset, m.type_id
        offs = self.string_offsets(last)
        found = self._member(sid, offs, base * 8, 0, bits=True) if offs else None
        if found is None:
            raise BTFError(f"type id {struct_id} has no member {path!r}")
        bit_off, width, size = found
        return Bits(bit_off, width or size * 8)

    def _named_member(self, struct_id: int, name: str, base: int) -> Member:
        offs = self.string_offsets(name)
        found = self._member(struct_id, offs, base * 8, 0) if offs else None
        if found is None:
            raise BTFError(f"type id {struct_id} has no member {name!r}")
        bit_off, _, size, kind, tid = found
        return Member(bit_off // 8, size, kind, tid)

    def _member(
        self, struct_id: int, name_offs: frozenset[int], base_bits: int, depth: int, *, bits: bool = False
    ) -> tuple[int, ...] | None:
        """(bit offset, bitfield width or 0, byte size[, kind, type id]) of a named member.

        Without ``bits`` a bitfield is an error: byte-addressed loads cannot read it."""
        if depth > 8:
            return None
        at = self._record(struct_id)
        info = self._words[at + 1]
        kind = (info >> 24) & 0x1F
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        kflag = info >> 31
        anonymous: list[tuple[int, int]] = []
        for m in range(info & 0xFFFF):
            m_name, m_type, m_off = self._words[at + 3 + 3 * m : at + 6 + 3 * m]
            bit_off = m_off & 0xFFFFFF if kflag else m_off  # kflag: bitfield_size << 24 | offset
            width = m_off >> 24 if kflag else 0
            if m_name in name_offs:
                if not bits and (width or bit_off % 8):
                    raise BTFError("member is a bitfield")
                m_kind, m_size, m_id = self.resolve(m_type)
                if bits:
                    return (base_bits + bit_off, width, m_size)
                return (base_bits + bit_off, width, m_size, m_kind, m_id)
            if m_name == 0:
                anonymous.append((m_type, base_bits + bit_off))
        for m_type, m_base in anonymous:
            while self.kind(m_type) in _MODIFIERS:
                m_type = self._words[self._record(m_type) + 2]
            found = self._member(m_type, name_offs, m_base, depth + 1, bits=bits)
            if found is not None:
                return found
        return None


# -- writing: the program BTF a loader must give for callbacks ---------------------------------


def encode_funcs(funcs: Iterable[tuple[str, int]], global_names: Collection[str] = ()) -> bytes:
    """A BTF blob describing functions ``long name(long, ...)`` (name, parameter count), static
    unless named in ``global_names``.

    The verifier wants BTF func_info for a program with callbacks (bpf_loop's callback must
    be a static function); for static functions it checks no argument types, so one
    integer type serves every parameter and return value. A global function (BTF_FUNC_GLOBAL,
    Linux 5.6) is verified once on its own, its ``long`` arguments as unknown scalars, instead of
    at each call with the caller's state.
    """
    strings = bytearray(b"\0long\0a0\0a1\0a2\0a3\0a4\0")
    arg_name = [6, 9, 12, 15, 18]  # offsets of a0..a4 (func_info protos need named params)
    types = bytearray()
    # id 1: INT "long", 8 bytes, signed 64 bits (BTF_INT_ENCODING SIGNED << 24 | bits)
    types += struct.pack("<IIII", 1, KIND_INT << 24, 8, (1 << 24) | 64)
    next_id = 2
    for name, nparams in funcs:
        if not 0 <= nparams <= len(arg_name):
            raise BTFError(f"{nparams} parameters: BPF functions take at most 5")
        # FUNC_PROTO returning long, parameters a0.. of type long; then the FUNC
        types += struct.pack("<III", 0, KIND_FUNC_PROTO << 24 | nparams, 1)
        for i in range(nparams):
            types += struct.pack("<II", arg_name[i], 1)
        name_off = len(strings)
        strings += name.encode() + b"\0"
        linkage = FUNC_GLOBAL if name in global_names else FUNC_STATIC
        types += struct.pack("<III", name_off, KIND_FUNC << 24 | linkage, next_id)
        next_id += 2
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + bytes(types) + bytes(strings)
