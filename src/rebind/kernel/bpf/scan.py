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

import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from rebind.kernel.bpf.layoutcache import layout_cache
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
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPFUnavailable,
    check_bpf_environment,
    load_program,
    map_create,
    map_fill,
    map_fill_pairs,
    map_lookup,
    map_update,
    run_iterator,
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
LAYOUT_CACHE = layout_cache(
    "bpf-layout",
    3,  # 3: one file per member list; without bpf_iter__task.meta and bpf_iter_meta.seq
    (MEMBERS, TARGETS),
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


def _run(prog_fd: int, state_fd: int, state: bytes) -> bytes:
    """One walk over every task, from ``state``; the state it ends with."""
    map_update(state_fd, b"\0\0\0\0", state)
    # The records go to the records array; read() only drives the walk (and gives nothing:
    # the program writes no seq_file output).
    run_iterator(prog_fd)
    return map_lookup(state_fd, b"\0\0\0\0", STATE.size)


#: Records the array holds beyond two per wanted socket (one each from the likely-first and the
#: full pass): room for sockets shared by many processes (fork, prefork servers) before a
#: rescan is needed. 4,096 records are 128 KiB.
SPARE_RECORDS = 4096
#: Scans run again, each with room for every record the one before produced, before giving up
#: (each holder found more often than the one before: fd tables growing while scanned).
ATTEMPTS = 3


def find_socket_holders(
    inodes: Iterable[int],
    *,
    uids: Iterable[int] = (),
    netns: int | None = None,
    files: Mapping[int, int] | None = None,
) -> ScanResult:
    """Every (process, fd) whose file is one of these sockets.

    ``uids`` and ``netns`` (the sockets') only say which tasks to look at first: every task
    is visited whatever they are. Raises BPFUnavailable when this cannot be done here.

    One scan for any number of sockets: the wanted inodes are a hash map sized to them, and the
    records go to an array sized to them (twice, plus SPARE_RECORDS). If more were produced
    than it holds, the program counted them: the scan runs again with room for that many.

    ``files``: where the caller read a socket's ``struct file`` address beside its inode
    (inode -> address: the bind-hash and lookup programs' records, bindowners.EXTRA_FILE), the
    scan starts out knowing it. Until every wanted socket's file is known, the program reads
    every file's inode (a cache miss per fd: ~85 ms at bench/mkload.py's 211k fds); once all
    are, only the files whose address passes the bitmap are read (~13 ms). A known address is
    still checked against its inode at each match (a file freed and reused is no match), so a
    stale hint only loses that socket's holders: it was closed.
    """
    wanted = sorted({i for i in inodes if i})
    if not wanted:
        return ScanResult((), 0)
    _check_environment()
    lay = load_layout()
    uid_list = sorted({u for u in uids if 0 <= u < 1 << 32})
    hints = _hints(wanted, files or {})
    capacity = 2 * len(wanted) + SPARE_RECORDS
    for _ in range(ATTEMPTS):
        data, st = _scan(lay, wanted, uid_list, netns, capacity, hints=hints)
        _mode, _unknown, tables, _netns, errors, emitted = STATE.unpack(st)
        if errors:
            raise BPFUnavailable(f"{errors} fd table chunk(s) or file(s) could not be read")
        if emitted <= capacity:
            break
        capacity = emitted + emitted // 4 + SPARE_RECORDS
    else:
        raise BPFUnavailable(f"{emitted} records did not fit the {capacity} the last scan had room for")
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    offset = _boottime_offset_ns()
    hits = {
        (tgid, fd, ino): Hit(tgid, tid, fd, ino, (start + offset) // tick_ns)
        for tgid, tid, fd, _, start, ino in RECORD.iter_unpack(data[: emitted * RECORD.size])
    }
    return ScanResult(tuple(hits.values()), tables)


def _hints(wanted: list[int], files: Mapping[int, int]) -> list[tuple[int, int]]:
    """(file address, inode) for the wanted inodes with a known file, each address once."""
    by_file: dict[int, int] = {}
    for ino in wanted:
        f = files.get(ino, 0)
        if f and f not in by_file:
            by_file[f] = ino
    return sorted(by_file.items())


def _bitmap(addresses: Iterable[int]) -> bytes:
    """The program's pre-filter for these file addresses (programs._bit: bit (addr >> 6) &
    0xffff)."""
    bits = bytearray(BITMAP_BYTES)
    for a in addresses:
        i = (a >> 6) & 0xFFFF
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def _scan(
    lay: Layout,
    wanted: list[int],
    uid_list: list[int],
    netns: int | None,
    capacity: int,
    *,
    hints: Sequence[tuple[int, int]] = (),
) -> tuple[bytes, bytes]:
    """One scan with a records array of ``capacity``: its contents and the final state."""
    fds: list[int] = []
    try:
        try:
            # Map memory is charged to the memory cgroup (Linux 5.11), not RLIMIT_MEMLOCK: the
            # arrays' few MiB for 100k sockets need no CAP_SYS_RESOURCE.
            maps = Maps(
                wanted=map_create(BPF_MAP_TYPE_HASH, 8, 1, len(wanted)),
                files=map_create(BPF_MAP_TYPE_HASH, 8, 8, len(wanted)),
                bits=map_create(BPF_MAP_TYPE_ARRAY, 4, BITMAP_BYTES, 1),
                state=map_create(BPF_MAP_TYPE_ARRAY, 4, STATE.size, 1),
                uids=map_create(BPF_MAP_TYPE_HASH, 4, 1, max(len(uid_list), 1)),
                records=map_create(BPF_MAP_TYPE_ARRAY, 4, RECORD.size, capacity, BPF_F_MMAPABLE),
            )
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        fds.extend(maps)
        try:
            map_fill(maps.wanted, wanted, "Q")
            if uid_list:
                map_fill(maps.uids, uid_list, "I")
            if hints:
                map_fill_pairs(maps.files, hints)
                map_update(maps.bits, bytes(4), _bitmap(f for f, _ in hints))
        except OSError as exc:
            raise BPFUnavailable(f"BPF maps: {exc.strerror}") from exc
        # Before Linux 5.17 (no bpf_loop) the verifier refuses the program: VerifierRejected,
        # a BPFUnavailable, and the caller uses the /proc scan.
        unknown = len(wanted) - len({ino for _, ino in hints})
        st = _scan_fdtables(lay, maps, unknown, netns, likely_first=bool(uid_list))
        _mode, _unknown, _tables, _netns, _errors, emitted = STATE.unpack(st)
        size = -(-capacity * RECORD.size // mmap.PAGESIZE) * mmap.PAGESIZE
        with mmap.mmap(maps.records, size, mmap.MAP_SHARED, mmap.PROT_READ) as mem:
            data = mem[: min(emitted, capacity) * RECORD.size]
    except OSError as exc:
        raise BPFUnavailable(f"BPF iterator: {exc.strerror}") from exc
    finally:
        for fd in fds:
            os.close(fd)
    return data, st


def _scan_fdtables(lay: Layout, maps: Maps, unknown: int, netns: int | None, *, likely_first: bool) -> bytes:
    """Load the fd-table program; a first pass over likely tasks, then every task."""
    prog_fd = _load(build_fdtable_program(lay, maps), lay.attach["bpf_iter_task"])
    try:
        emitted = 0
        if likely_first:
            st = _run(prog_fd, maps.state, STATE.pack(1, unknown, 0, netns or 0, 0, 0))
            _mode, unknown, _tables, _netns, errors, emitted = STATE.unpack(st)
            if errors:
                return st
        # every task; the addresses learnt so far stay in maps.files, "unknown" and the records
        # carry over
        return _run(prog_fd, maps.state, STATE.pack(2, unknown, 0, 0, 0, emitted))
    finally:
        os.close(prog_fd)
