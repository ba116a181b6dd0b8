"""bpf(2) through ctypes: maps, program and BTF loading, iterator links (no libbpf, no compiler).

The one bpf() wrapper of rebind: the owner scan (:mod:`.scan`), the socket iterators
(:mod:`.sockiter`), the socket lookup (:mod:`.socklookup`) and ``rebind trace``
(:mod:`rebind.kernel.trace`) load their programs and create their maps here, and ask
:func:`check_bpf_environment` and :func:`read_vmlinux_btf` whether they can run at all.

Attribute layouts are ``union bpf_attr`` in include/uapi/linux/bpf.h, packed with struct.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from rebind.errors import EnvironmentProblem
from rebind.kernel.bpf import btf as btfmod

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_BTF_LOAD = 18
BPF_MAP_UPDATE_BATCH = 26  # Linux 5.6
BPF_LINK_CREATE = 28  # Linux 5.7
BPF_ITER_CREATE = 33  # Linux 5.8
# enum bpf_map_type / bpf_prog_type / bpf_attach_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_RINGBUF = 27  # Linux 5.8
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28
# map_flags
BPF_F_MMAPABLE = 1 << 10

#: The kernel's own BTF (CONFIG_DEBUG_INFO_BTF, Linux 5.4): every program's offsets come from it.
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
#: /proc/self/ns/pid of the initial pid namespace (PROC_PID_INIT_INO, include/linux/proc_ns.h).
PROC_PID_INIT_INO = 0xEFFFFFFC
#: Capability bits (include/uapi/linux/capability.h): tracing programs need CAP_BPF and
#: CAP_PERFMON (Linux 5.8), or CAP_SYS_ADMIN.
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39

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


def check_bpf_environment(
    *,
    no_caps: str = "no CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN)",
    initial_pidns: str | None = None,
    honour_no_bpf: bool = False,
) -> None:
    """Cheap reasons not to try, before the BTF is read: one BPFUnavailable naming what is missing.

    ``no_caps``: the words when the capabilities are missing. ``initial_pidns``: the words when
    this process is not in the initial pid namespace, for programs that report pids (task->tgid
    and bpf_get_current_pid_tgid() number pids as the initial namespace does); None: not asked.
    ``honour_no_bpf``: REBIND_NO_BPF=1 switches the program off here (the owner scan asks it in
    kernel/owners.py instead, before choosing the /proc scan).
    """
    if honour_no_bpf and os.environ.get("REBIND_NO_BPF", "") not in ("", "0"):
        raise BPFUnavailable("REBIND_NO_BPF is set")
    try:
        with open("/proc/self/status", "rb") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith(b"CapEff:")), 0)
    except (OSError, ValueError, IndexError):
        caps = 0
    need = (1 << CAP_BPF) | (1 << CAP_PERFMON)
    if caps & need != need and not caps & (1 << CAP_SYS_ADMIN):
        raise BPFUnavailable(no_caps)
    if initial_pidns is None:
        return
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError as exc:
        raise BPFUnavailable(f"cannot tell the pid namespace: {exc.strerror}") from exc
    if pidns != PROC_PID_INIT_INO:
        raise BPFUnavailable(initial_pidns)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    # union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags
    return bpf(BPF_MAP_CREATE, attr_buf("<5I", map_type, key_size, value_size, max_entries, flags))


def map_fill(map_fd: int, keys: list[int], key_fmt: str) -> None:
    """One BPF_MAP_UPDATE_BATCH: every key with a zero u8 value."""
    _update_batch(map_fd, struct.pack(f"<{len(keys)}{key_fmt}", *keys), bytes(len(keys)), len(keys))


def map_fill_pairs(map_fd: int, items: Sequence[tuple[int, int]]) -> None:
    """One BPF_MAP_UPDATE_BATCH of u64 keys with u64 values."""
    n = len(items)
    keys = struct.pack(f"<{n}Q", *(k for k, _ in items))
    _update_batch(map_fd, keys, struct.pack(f"<{n}Q", *(v for _, v in items)), n)


def _update_batch(map_fd: int, keys: bytes, values: bytes, n: int) -> None:
    kbuf, vbuf = ctypes.create_string_buffer(keys), ctypes.create_string_buffer(values)
    # batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    attr = attr_buf("<QQQQIIQQ", 0, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), n, map_fd, 0, 0)
    bpf(BPF_MAP_UPDATE_BATCH, attr)
    done = struct.unpack_from("<I", attr, 32)[0]
    if done != n:
        raise BPFUnavailable(f"map update stopped after {done} of {n} keys")


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


@dataclass(frozen=True, slots=True)
class ProgType:
    """What kind of program is loaded, and how it is named in the kernel and in our errors."""

    prog_type: int
    expected_attach_type: int
    name: bytes  # prog_name[16] (bpftool prog show)
    what: str  # "the program" in "verifier rejected the program"
    log_size: int = 1 << 20  # the verifier's log, when a load is retried to say why
    log_tail: int | None = None  # keep only the end of the log in the error


#: The iterators (task fd tables, tcp/udp sockets): BPF_PROG_TYPE_TRACING attached as BPF_TRACE_ITER.
ITERATOR = ProgType(BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER, b"rebind_owners", "the program")
#: The socket lookup (a networking helper, run by BPF_PROG_TEST_RUN: kernel/bpf/socklookup.py).
SOCKET_LOOKUP = ProgType(
    BPF_PROG_TYPE_SCHED_CLS, 0, b"rebind_lookup", "the lookup program", log_size=1 << 22, log_tail=3000
)
#: `rebind trace`'s raw sys_exit tracepoint program (kernel/trace.py).
RAW_TRACEPOINT = ProgType(BPF_PROG_TYPE_RAW_TRACEPOINT, 0, b"rebind_trace", "the trace program")


def prog_load(
    insns: bytes,
    attach_btf_id: int = 0,
    log_size: int = 0,
    funcs: Sequence[tuple[str, int, int]] = (),
    *,
    prog: ProgType = ITERATOR,
    global_funcs: Collection[str] = (),
) -> int:
    """BPF_PROG_LOAD of one program (an iterator unless ``prog`` says otherwise); ``funcs``:
    (name, first insn, params) per function, for the func_info BTF that programs with
    callbacks need; those named in ``global_funcs`` are global (verified once, on their own).
    With ``log_size``, a refusal raises VerifierRejected with the log."""
    kind = prog
    btf_fd = 0
    finfo = None
    if funcs:
        btf_fd = btf_load(btfmod.encode_funcs(((name, n) for name, _, n in funcs), global_funcs))
        # struct bpf_func_info {insn_off, type_id}: FUNC ids are 3, 5, 7.. in encode_funcs
        recs = b"".join(struct.pack("<II", at, 3 + 2 * i) for i, (_, at, _) in enumerate(funcs))
        finfo = ctypes.create_string_buffer(recs, len(recs))
    try:
        return _prog_load_attr(kind, insns, attach_btf_id, log_size, btf_fd, finfo, len(funcs))
    finally:
        if btf_fd:
            os.close(btf_fd)


def load_program(
    insns: bytes,
    attach_btf_id: int = 0,
    funcs: Sequence[tuple[str, int, int]] = (),
    *,
    prog: ProgType = ITERATOR,
    global_funcs: Collection[str] = (),
) -> int:
    """Load a program, or say why not: no permission is BPFUnavailable; any other refusal loads
    it again with the verifier's log (``prog.log_size`` bytes), to raise VerifierRejected with it."""
    kind = prog
    try:
        return prog_load(insns, attach_btf_id, funcs=funcs, prog=kind, global_funcs=global_funcs)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise BPFUnavailable(f"loading a BPF program: {exc.strerror}") from exc
    return prog_load(
        insns, attach_btf_id, log_size=kind.log_size, funcs=funcs, prog=kind, global_funcs=global_funcs
    )


def _prog_load_attr(
    kind: ProgType,
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
    # line_info_cnt, attach_btf_id, attach_btf_obj_fd (0: vmlinux). Fields a program type does
    # not use are zero, as the kernel reads a shorter attr (bpf_check_uarg_tail_zero, memset).
    attr = attr_buf(
        "<IIQQIIQII16sIIIIQIIQIII",
        kind.prog_type,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(lic),
        1 if log else 0,
        log_size,
        ctypes.addressof(log) if log else 0,
        0,
        0,
        kind.name,
        0,
        kind.expected_attach_type,
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
        if kind.log_tail is not None:
            text = text[-kind.log_tail :]
        raise VerifierRejected(f"verifier rejected {kind.what} ({exc.strerror}):\n{text}") from exc


def link_create(prog_fd: int) -> int:
    # prog_fd, target_fd, attach_type, flags, iter_info, iter_info_len (no map/task filter)
    return bpf(BPF_LINK_CREATE, attr_buf("<IIIIQI4x", prog_fd, 0, BPF_TRACE_ITER, 0, 0, 0))


def iter_create(link_fd: int) -> int:
    return bpf(BPF_ITER_CREATE, attr_buf("<II", link_fd, 0))


def run_iterator(prog_fd: int, stopped: Callable[[], bool] | None = None) -> bytes:
    """One walk of a loaded iterator program: its link, an iterator fd, everything it writes
    (:func:`read_all`), every fd closed again. The iterator takes the network namespace of the
    calling thread when its fd is made (bpf_iter_init_seq_net reads current's)."""
    link_fd = link_create(prog_fd)
    try:
        iter_fd = iter_create(link_fd)
        try:
            return read_all(iter_fd, stopped)
        finally:
            os.close(iter_fd)
    finally:
        os.close(link_fd)


def read_all(fd: int, stopped: Callable[[], bool] | None = None) -> bytes:
    """Everything an iterator fd gives. ``stopped``: asked on EAGAIN, whether that was the
    program stopping the walk (its output so far is then the whole answer)."""
    chunks: list[bytes] = []
    again = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            if stopped is not None and stopped():
                return b"".join(chunks)
            # bpf_seq_read() gives up with EAGAIN after MAX_ITER_OBJECTS (1M) files without
            # output; the iterator keeps its place, so reading again goes on from there.
            again += 1
            if again > 10_000:
                raise
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_vmlinux_btf(path: str = VMLINUX_BTF) -> bytes:
    """The kernel's own BTF (CONFIG_DEBUG_INFO_BTF, Linux 5.4): every program's offsets come from
    it, so its absence is "BPF unavailable", one line, never a traceback."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BPFUnavailable(f"no kernel BTF ({path}: {exc.strerror}; CONFIG_DEBUG_INFO_BTF)") from exc
