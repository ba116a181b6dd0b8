"""The owner scan: load the iterator program, run it over every task, decode its records.

Nothing is sampled or skipped: every task is visited, whatever its uid, network namespace or
pid namespace, and each socket is matched by its inode number (the ``socket:[INODE]`` of /proc
and inet_diag), never by a guess. Threads: a thread whose fd table is its leader's is skipped
(the leader is visited); a thread with a table of its own (``unshare(CLONE_FILES)``) is visited
and reported under its process (tgid), like a process whose leader has exited.

Needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), BTF and the initial pid namespace; anything
missing raises :class:`BPFUnavailable` and callers fall back to the /proc scan.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from rebind.kernel.bpf.layoutcache import CACHE_DIR, LayoutCache
from rebind.kernel.bpf.programs import (
    BITMAP_BYTES,
    MEMBERS,
    RECORD,
    STATE,
    TARGETS,
    Built,
    Layout,
    Maps,
    build_fdtable_program,
    layout_from_btf,
)
from rebind.kernel.bpf.syscall import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPFUnavailable,
    check_bpf_environment,
    iter_create,
    link_create,
    load_program,
    map_create,
    map_fill,
    map_lookup,
    map_update,
    read_all,
)


class Hit(NamedTuple):
    pid: int  # tgid, as /proc/PID names the process (initial pid namespace)
    tid: int  # the task whose fd table holds the socket (== pid unless the table is unshared)
    fd: int
    inode: int
    start_ticks: int  # the process's start, in /proc/PID/stat field-22 units


class ScanResult(NamedTuple):
    hits: tuple[Hit, ...]
    #: fd tables visited: one per process (kernel threads included), plus threads with a
    #: table of their own.
    tables: int


def _check_environment() -> None:
    """Cheap reasons not to try, before the BTF is read."""
    # task->tgid is the pid of the initial namespace; /proc here would number them differently.
    check_bpf_environment(initial_pidns="not in the initial pid namespace")


def _decode_layout(lines: list[str]) -> Layout | None:
    attach: dict[str, int] = {}
    offsets: dict[str, int] = {}
    try:
        for line in lines:
            kind, name, value = line.split()
            (attach if kind == "attach" else offsets)[name] = int(value)
    except ValueError:
        return None
    if set(attach) != set(TARGETS) or set(offsets) != {f"{s}.{m}" for s, m, _ in MEMBERS}:
        return None
    return Layout(attach, offsets)


def _encode_layout(lay: Layout) -> list[str]:
    return [
        *(f"attach {k} {v}" for k, v in sorted(lay.attach.items())),
        *(f"offset {k} {v}" for k, v in sorted(lay.offsets.items())),
    ]


#: The fd-table program's layout, cached per boot (kernel/bpf/layoutcache.py).
LAYOUT_CACHE = LayoutCache(
    f"{CACHE_DIR}/bpf-layout",
    "rebind-bpf-layout 2",  # 2: without the task_file program's members
    build=layout_from_btf,
    encode=_encode_layout,
    decode=_decode_layout,
)


def load_layout(*, use_cache: bool = True) -> Layout:
    """The layout of this kernel, from the per-boot cache or from its BTF."""
    return LAYOUT_CACHE.load(use_cache=use_cache)


def _boottime_offset_ns() -> int:
    """This time namespace's boottime offset: /proc/PID/stat adds it (timens_add_boottime_ns)."""
    try:
        with open("/proc/self/timens_offsets", "rb") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in (b"boottime", b"7"):  # name, or CLOCK_BOOTTIME's number
                    return int(parts[1]) * 1_000_000_000 + int(parts[2])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # no CONFIG_TIME_NS: no offsets


def _load(program: Built, attach_btf_id: int) -> int:
    insns, funcs = program
    return load_program(insns, attach_btf_id, funcs)


def _run(prog_fd: int, passes: Iterable[bytes | None], state_fd: int) -> tuple[bytes, bytes]:
    """Run the iterator once per pass (state written before each); output and final state."""
    out = []
    link_fd = link_create(prog_fd)
    try:
        for st in passes:
            if st is not None:
                map_update(state_fd, b"\0\0\0\0", st)
            iter_fd = iter_create(link_fd)
            try:
                out.append(read_all(iter_fd))
            finally:
                os.close(iter_fd)
    finally:
        os.close(link_fd)
    return b"".join(out), map_lookup(state_fd, b"\0\0\0\0", STATE.size)


#: Wanted sockets per iterator pass: (32 KiB seq_file buffer / 32-byte record) - 1. 4 KiB pages
#: are the smallest: with larger ones the buffer is larger and the bound merely conservative.
MAX_PER_PASS = (4096 << 3) // RECORD.size - 1


def find_socket_holders(
    inodes: Iterable[int],
    *,
    uids: Iterable[int] = (),
    netns: int | None = None,
) -> ScanResult:
    """Every (process, fd) whose file is one of these sockets.

    ``uids`` and ``netns`` (the sockets') only say which tasks to look at first: every task
    is visited whatever they are. Raises BPFUnavailable when this cannot be done here.
    """
    wanted = sorted({i for i in inodes if i})
    uids = tuple(uids)  # read once per pass below
    if not wanted:
        return ScanResult((), 0)
    if len(wanted) > MAX_PER_PASS:
        # One task's records are written by one show() call into the iterator's seq_file
        # buffer (bpf_iter: PAGE_SIZE << 3 = 32 KiB); a task holding 1,024 wanted sockets
        # fills it and read() fails with E2BIG. Bounded passes keep every task's output below.
        parts = [
            find_socket_holders(wanted[i : i + MAX_PER_PASS], uids=uids, netns=netns)
            for i in range(0, len(wanted), MAX_PER_PASS)
        ]
        return ScanResult(tuple(h for p in parts for h in p.hits), max(p.tables for p in parts))
    _check_environment()
    lay = load_layout()
    uid_list = sorted({u for u in uids if 0 <= u < 1 << 32})
    fds: list[int] = []
    try:
        try:
            maps = Maps(
                wanted=map_create(BPF_MAP_TYPE_HASH, 8, 1, len(wanted)),
                files=map_create(BPF_MAP_TYPE_HASH, 8, 8, len(wanted)),
                bits=map_create(BPF_MAP_TYPE_ARRAY, 4, BITMAP_BYTES, 1),
                state=map_create(BPF_MAP_TYPE_ARRAY, 4, STATE.size, 1),
                uids=map_create(BPF_MAP_TYPE_HASH, 4, 1, max(len(uid_list), 1)),
            )
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        fds.extend((maps.wanted, maps.files, maps.bits, maps.state, maps.uids))
        try:
            map_fill(maps.wanted, wanted, "Q")
            if uid_list:
                map_fill(maps.uids, uid_list, "I")
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        # Before Linux 5.17 (no bpf_loop) the verifier refuses the program: VerifierRejected,
        # a BPFUnavailable, and the caller uses the /proc scan.
        data, st = _scan_fdtables(lay, maps, len(wanted), netns, likely_first=bool(uid_list))
    except OSError as exc:
        raise BPFUnavailable(f"BPF iterator: {exc.strerror}") from exc
    finally:
        for fd in fds:
            os.close(fd)
    _mode, _unknown, tables, _netns, errors, _ = STATE.unpack(st)
    if errors:
        raise BPFUnavailable(f"{errors} fd table chunk(s) or file(s) could not be read")
    if len(data) % RECORD.size:
        raise BPFUnavailable(f"iterator output of {len(data)} bytes is not whole records")
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    offset = _boottime_offset_ns()
    hits = {
        (tgid, fd, ino): Hit(tgid, tid, fd, ino, (start + offset) // tick_ns)
        for tgid, tid, fd, _, start, ino in RECORD.iter_unpack(data)
    }
    return ScanResult(tuple(hits.values()), tables)


def _scan_fdtables(
    lay: Layout, maps: Maps, unknown: int, netns: int | None, *, likely_first: bool
) -> tuple[bytes, bytes]:
    """Load the fd-table program; a first pass over likely tasks, then every task."""
    prog_fd = _load(build_fdtable_program(lay, maps), lay.attach["bpf_iter_task"])
    try:
        out = b""
        if likely_first:
            out, st = _run(prog_fd, [STATE.pack(1, unknown, 0, netns or 0, 0, 0)], maps.state)
            _mode, unknown, _tables, _netns, errors, _pad = STATE.unpack(st)
            if errors:
                return out, st
        # every task; the addresses learnt so far stay in maps.files, "unknown" carries over
        data, st = _run(prog_fd, [STATE.pack(2, unknown, 0, 0, 0, 0)], maps.state)
        return out + data, st
    finally:
        os.close(prog_fd)
