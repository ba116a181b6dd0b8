"""bpf(2) through ctypes: maps, program and BTF loading, iterator links (no libbpf, no compiler).

Attribute layouts are ``union bpf_attr`` in include/uapi/linux/bpf.h, packed with struct.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Sequence

from rebind.errors import EnvironmentProblem
from rebind.kernel.bpf import btf as btfmod

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_BTF_LOAD = 18
BPF_MAP_UPDATE_BATCH = 26  # Linux 5.6
BPF_LINK_CREATE = 28  # Linux 5.7
BPF_ITER_CREATE = 33  # Linux 5.8
# enum bpf_map_type / bpf_prog_type / bpf_attach_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28

#: The program is ours (MIT); "Dual MIT/GPL" is GPL-compatible for the kernel
#: (include/linux/license.h), which bpf_seq_write and bpf_probe_read_kernel require.
LICENSE = b"Dual MIT/GPL\0"

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


class BPFUnavailable(EnvironmentProblem):
    """The BPF path cannot run here (reason in the message); use the /proc scan."""


class VerifierRejected(BPFUnavailable):
    """The kernel's verifier refused a program; the message carries its log."""


_syscall: Callable[[int, int, int, int], int] | None = None


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    global _syscall
    machine = os.uname().machine
    nr = _NR_BPF.get(machine)
    if nr is None:
        raise BPFUnavailable(f"bpf(2) number unknown for {machine}")
    if _syscall is None:
        # A handle of its own, not procstat.libc(): argtypes belong to the function object, and
        # bpf(2)'s (long, int, void *, unsigned) would retype kernel/pidfd.py's syscall() too.
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        fn.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
        _syscall = fn
    while True:
        rc = int(_syscall(nr, cmd, ctypes.addressof(attr), len(attr)))
        if rc >= 0:
            return rc
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def attr_buf(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    raw = struct.pack(fmt, *values)
    return ctypes.create_string_buffer(raw, len(raw))


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    # union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags
    return bpf(BPF_MAP_CREATE, attr_buf("<5I", map_type, key_size, value_size, max_entries, 0))


def map_fill(map_fd: int, keys: list[int], key_fmt: str) -> None:
    """One BPF_MAP_UPDATE_BATCH: every key with a zero u8 value."""
    kbuf = ctypes.create_string_buffer(struct.pack(f"<{len(keys)}{key_fmt}", *keys))
    vbuf = ctypes.create_string_buffer(len(keys))
    # batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    attr = attr_buf(
        "<QQQQIIQQ", 0, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), len(keys), map_fd, 0, 0
    )
    bpf(BPF_MAP_UPDATE_BATCH, attr)
    done = struct.unpack_from("<I", attr, 32)[0]
    if done != len(keys):
        raise BPFUnavailable(f"map update stopped after {done} of {len(keys)} keys")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    # map_fd, (pad), key, value, flags
    bpf(BPF_MAP_LOOKUP_ELEM, attr_buf("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    return v.raw


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, attr_buf("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def btf_load(blob: bytes) -> int:
    buf = ctypes.create_string_buffer(blob, len(blob))
    # btf, btf_log_buf, btf_size, btf_log_size, btf_log_level
    return bpf(BPF_BTF_LOAD, attr_buf("<QQIII4x", ctypes.addressof(buf), 0, len(blob), 0, 0))


def prog_load(
    insns: bytes,
    attach_btf_id: int,
    log_size: int = 0,
    funcs: Sequence[tuple[str, int, int]] = (),
) -> int:
    """Load a tracing/iterator program; ``funcs``: (name, first insn, params) per function,
    for the func_info BTF that programs with callbacks need."""
    btf_fd = 0
    finfo = None
    if funcs:
        btf_fd = btf_load(btfmod.encode_funcs((name, n) for name, _, n in funcs))
        # struct bpf_func_info {insn_off, type_id}: FUNC ids are 3, 5, 7.. in encode_funcs
        recs = b"".join(struct.pack("<II", at, 3 + 2 * i) for i, (_, at, _) in enumerate(funcs))
        finfo = ctypes.create_string_buffer(recs, len(recs))
    try:
        return _prog_load_attr(insns, attach_btf_id, log_size, btf_fd, finfo, len(funcs))
    finally:
        if btf_fd:
            os.close(btf_fd)


def _prog_load_attr(
    insns: bytes,
    attach_btf_id: int,
    log_size: int,
    btf_fd: int,
    finfo: ctypes.Array[ctypes.c_char] | None,
    nfuncs: int,
) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(LICENSE, len(LICENSE))
    log = ctypes.create_string_buffer(log_size) if log_size else None
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16], prog_ifindex, expected_attach_type, prog_btf_fd,
    # func_info_rec_size, func_info, func_info_cnt, line_info_rec_size, line_info,
    # line_info_cnt, attach_btf_id, attach_btf_obj_fd (0: vmlinux)
    attr = attr_buf(
        "<IIQQIIQII16sIIIIQIIQIII",
        BPF_PROG_TYPE_TRACING,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(lic),
        1 if log else 0,
        log_size,
        ctypes.addressof(log) if log else 0,
        0,
        0,
        b"rebind_owners",
        0,
        BPF_TRACE_ITER,
        btf_fd,
        8 if finfo is not None else 0,
        ctypes.addressof(finfo) if finfo is not None else 0,
        nfuncs,
        0,
        0,
        0,
        attach_btf_id,
        0,
    )
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        if log is None:
            raise
        text = log.value.decode(errors="replace").strip()
        raise VerifierRejected(f"verifier rejected the program ({exc.strerror}):\n{text}") from exc


def link_create(prog_fd: int) -> int:
    # prog_fd, target_fd, attach_type, flags, iter_info, iter_info_len (no map/task filter)
    return bpf(BPF_LINK_CREATE, attr_buf("<IIIIQI4x", prog_fd, 0, BPF_TRACE_ITER, 0, 0, 0))


def iter_create(link_fd: int) -> int:
    return bpf(BPF_ITER_CREATE, attr_buf("<II", link_fd, 0))


def read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    again = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            # bpf_seq_read() gives up with EAGAIN after MAX_ITER_OBJECTS (1M) files without
            # output; the iterator keeps its place, so reading again goes on from there.
            again += 1
            if again > 10_000:
                raise
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_vmlinux_btf(path: str) -> bytes:
    """The kernel's own BTF (CONFIG_DEBUG_INFO_BTF, Linux 5.4): every program's offsets come from
    it, so its absence is "BPF unavailable", one line, never a traceback."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BPFUnavailable(f"no kernel BTF ({path}: {exc.strerror})") from exc
