"""Where birth certificates are pinned, and opening their map for a reader (kernel/diag.py).

Kept apart from :mod:`rebind.kernel.birth` (loading, attaching, pinning) so that every
`rebind ls` pays one ``lstat`` when certificates are not installed, not the BPF imports.
"""

from __future__ import annotations

import os
import stat

DEFAULT_PIN_DIR = "/sys/fs/bpf/rebind"
MAP_PIN = "birth_map"
BPF_F_RDONLY = 1 << 3  # file_flags of BPF_OBJ_GET: a read-only map fd is all inet_diag needs


def pin_dir() -> str:
    """Where the pins live: ``REBIND_BPF_DIR`` (tests: a private bpffs) or /sys/fs/bpf/rebind."""
    return os.environ.get("REBIND_BPF_DIR") or DEFAULT_PIN_DIR


def open_map() -> int | None:
    """A read-only fd of the pinned map, or None (not installed, no privilege, REBIND_NO_BPF)."""
    if os.environ.get("REBIND_NO_BPF", "") not in ("", "0"):
        return None
    d = pin_dir()
    try:
        st = os.lstat(d)
    except OSError:
        return None
    # Only root's own directory: on a bpffs mounted writable for others, a user's map pinned
    # here first would put their words in root's `ls` ("bound by" whoever they like).
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        return None
    from rebind.kernel.birth import obj_get
    from rebind.kernel.bpf.syscall import BPFUnavailable

    try:
        return obj_get(os.path.join(d, MAP_PIN), BPF_F_RDONLY)
    except (OSError, BPFUnavailable):
        return None
