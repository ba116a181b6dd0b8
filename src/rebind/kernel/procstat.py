"""/proc/PID/stat fields and the C library handle, shared by every module that needs them."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# Field numbers as proc(5) counts them (1 = pid, 2 = comm).
PPID = 4
PGRP = 5
STARTTIME = 22  # clock ticks since boot: with the pid, a process identity that survives pid reuse


def stat_field(pid: int, field: int, root: str | None = None) -> int | None:
    """One numeric field of /proc/PID/stat, or None if the process is gone or unreadable."""
    try:
        with open(f"{root or os.environ.get('REBIND_PROC_ROOT', '/proc')}/{pid}/stat", "rb") as f:
            data = f.read()
        # comm (field 2) may contain spaces and ')': fields 3.. start after the last ')'.
        return int(data[data.rfind(b")") + 2 :].split()[field - 3])
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
