"""/proc/PID/stat: the one parser (and the C library handle), shared by every module that needs them."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass

# Field numbers as proc(5) counts them (1 = pid, 2 = comm).
STATE = 3
PPID = 4
PGRP = 5
STARTTIME = 22  # clock ticks since boot: with the pid, a process identity that survives pid reuse


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat rebind decides by."""

    pid: int
    state: str  # R, S, D, Z (zombie), X (dead), ...
    ppid: int
    pgrp: int
    start_ticks: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def split_stat(data: bytes) -> list[bytes]:
    """Fields 3.. of a /proc/PID/stat line (index 0 is field 3). comm (field 2) may contain
    spaces and ')': the fields after it start after the *last* ')'."""
    return data[data.rfind(b")") + 2 :].split()


def parse_stat(pid: int, data: bytes) -> ProcStat | None:
    rest = split_stat(data)
    try:
        return ProcStat(
            pid,
            rest[STATE - 3].decode("ascii", "replace"),
            int(rest[PPID - 3]),
            int(rest[PGRP - 3]),
            int(rest[STARTTIME - 3]),
        )
    except (ValueError, IndexError):
        return None


def default_root() -> str:
    """The host's /proc unless REBIND_PROC_ROOT names another (tests, containers): the one
    reading of that variable (kernel/procfs.py: ProcFS.default)."""
    return os.environ.get("REBIND_PROC_ROOT", "/proc")


def _stat_path(pid: int, root: str | None) -> str:
    return f"{root or default_root()}/{pid}/stat"


def read_stat(pid: int, root: str | None = None) -> ProcStat | None:
    """/proc/PID/stat parsed, or None if the process is gone or unreadable."""
    try:
        with open(_stat_path(pid, root), "rb") as f:
            return parse_stat(pid, f.read())
    except OSError:
        return None


def stat_field(pid: int, field: int, root: str | None = None) -> int | None:
    """One numeric field of /proc/PID/stat, or None if the process is gone or unreadable."""
    try:
        with open(_stat_path(pid, root), "rb") as f:
            return int(split_stat(f.read())[field - 3])
    except (OSError, ValueError, IndexError):
        return None


def start_ticks(pid: int, root: str | None = None) -> int | None:
    """Start time in clock ticks since boot (field 22): with the pid, an identity that survives
    pid reuse. Readable for every process: do_task_stat() masks some fields without ptrace
    access, never this one."""
    return stat_field(pid, STARTTIME, root)


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
