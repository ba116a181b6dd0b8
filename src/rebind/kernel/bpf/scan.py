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

import errno
import os
from collections.abc import Iterable
from typing import NamedTuple

from rebind.kernel.bpf import btf as btfmod
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
    iter_create,
    link_create,
    map_create,
    map_fill,
    map_lookup,
    map_update,
    prog_load,
    read_all,
    read_vmlinux_btf,
)

BTF_PATH = "/sys/kernel/btf/vmlinux"
#: /proc/self/ns/pid of the initial pid namespace (PROC_PID_INIT_INO, include/linux/proc_ns.h).
PROC_PID_INIT_INO = 0xEFFFFFFC


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


_layout: Layout | None = None


#: Capability bits (include/uapi/linux/capability.h): tracing programs need CAP_BPF and
#: CAP_PERFMON (Linux 5.8), or CAP_SYS_ADMIN.
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def _check_environment() -> None:
    """Cheap reasons not to try, before the BTF is read."""
    try:
        with open("/proc/self/status", "rb") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith(b"CapEff:")), 0)
    except (OSError, ValueError, IndexError):
        caps = 0
    bpf_caps = (1 << CAP_BPF) | (1 << CAP_PERFMON)
    if caps & bpf_caps != bpf_caps and not caps & (1 << CAP_SYS_ADMIN):
        raise BPFUnavailable("no CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN)")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError as exc:
        raise BPFUnavailable(f"cannot tell the pid namespace: {exc.strerror}") from exc
    if pidns != PROC_PID_INIT_INO:
        # task->tgid is the pid of the initial namespace; /proc here numbers them differently.
        raise BPFUnavailable("not in the initial pid namespace")


#: Finding the layout walks ~65k BTF records (~15 ms); it cannot change until the next boot,
#: so it is kept in /run (a tmpfs, emptied at boot) keyed by boot id and BTF size.
CACHE_PATH = "/run/rebind/bpf-layout"
_CACHE_MAGIC = "rebind-bpf-layout 2"  # 2: without the task_file program's members


def _cache_key() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return f"{boot_id} {os.stat(BTF_PATH).st_size}"
    except OSError:
        return None


def _read_cache(key: str) -> Layout | None:
    try:
        fd = os.open(CACHE_PATH, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None  # not ours, or writable by others: do not trust it
        text = os.read(fd, 1 << 16).decode()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    lines = text.splitlines()
    if len(lines) < 2 or lines[0] != _CACHE_MAGIC or lines[1] != key:
        return None
    attach: dict[str, int] = {}
    offsets: dict[str, int] = {}
    try:
        for line in lines[2:]:
            kind, name, value = line.split()
            (attach if kind == "attach" else offsets)[name] = int(value)
    except ValueError:
        return None
    if set(attach) != set(TARGETS) or set(offsets) != {f"{s}.{m}" for s, m, _ in MEMBERS}:
        return None
    return Layout(attach, offsets)


def _write_cache(key: str, lay: Layout) -> None:
    body = [_CACHE_MAGIC, key]
    body += [f"attach {k} {v}" for k, v in sorted(lay.attach.items())]
    body += [f"offset {k} {v}" for k, v in sorted(lay.offsets.items())]
    tmp = f"{CACHE_PATH}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(CACHE_PATH), mode=0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, ("\n".join(body) + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, CACHE_PATH)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_layout(*, use_cache: bool = True) -> Layout:
    """The layout of this kernel, from the per-boot cache or from its BTF."""
    global _layout
    if _layout is not None:
        return _layout
    key = _cache_key() if use_cache else None
    if key is not None and (cached := _read_cache(key)) is not None:
        _layout = cached
        return cached
    data = read_vmlinux_btf(BTF_PATH)
    try:
        _layout = layout_from_btf(data)
    except btfmod.BTFError as exc:
        raise BPFUnavailable(f"kernel BTF: {exc}") from exc
    if key is not None:
        _write_cache(key, _layout)
    return _layout


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
    try:
        return prog_load(insns, attach_btf_id, funcs=funcs)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise BPFUnavailable(f"loading a BPF program: {exc.strerror}") from exc
    # Load again, with the verifier's log this time, to say why.
    return prog_load(insns, attach_btf_id, log_size=1 << 20, funcs=funcs)


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
