"""Birth certificates: who bound a socket, and when, as the kernel recorded it (pure).

``rebind trace --install`` leaves a small BPF program on the root cgroup's post-bind hooks
(:mod:`rebind.kernel.birth`) that writes one :data:`VALUE` into the socket's ``sk_storage`` at
bind() time; inet_diag hands it back with each socket (``INET_DIAG_SK_BPF_STORAGES``). It
names the process that called bind(), which is not always the one holding the socket now (an fd
passed over SCM_RIGHTS, a forked child, a supervisor's socket activation), and survives the
binder's exit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from rebind.model.records import process_label

#: The map value (``struct rebind_birth``, little-endian; BTF in kernel/bpf/birth_prog.py):
#: boot_ns (bpf_ktime_get_boot_ns), cgroup_id, tid, tgid, uid, port (host order), flags, comm.
VALUE: Final = struct.Struct("<QQIIIHH16s")


class Flag:
    """Bits of ``flags``: which hook wrote the certificate."""

    BIND4: Final = 1  # BPF_CGROUP_INET4_POST_BIND (__inet_bind)
    BIND6: Final = 2  # BPF_CGROUP_INET6_POST_BIND (__inet6_bind)
    LISTEN: Final = 4  # BPF_SOCK_OPS_TCP_LISTEN_CB: listen() on a socket no bind() certified


@dataclass(frozen=True, slots=True)
class Birth:
    """The certificate of one socket."""

    pid: int  # the binder's thread-group id (pid in the initial pid namespace)
    tid: int
    comm: str  # the binder's comm at bind() time (its own choice: hostile text)
    cgroup_id: int  # the binder's cgroup v2 id (inode of its cgroupfs directory)
    uid: int  # the binder's uid
    port: int  # the port bind() gave the socket
    flags: int
    boot_ns: int  # CLOCK_BOOTTIME at bind(), ns
    at: float  # the same instant as seconds since the epoch (converted when read)

    @property
    def label(self) -> str:
        """``name[pid]``, escaped (records.process_label)."""
        return process_label(self.comm, self.pid)


def decode(raw: bytes, boot_to_epoch: float) -> Birth | None:
    """One map value as inet_diag returned it; ``boot_to_epoch``: epoch seconds at boot time 0."""
    if len(raw) < VALUE.size:
        return None
    boot_ns, cgroup, tid, tgid, uid, port, flags, comm = VALUE.unpack_from(raw)
    if not flags:
        return None  # storage created but never filled (a program of an older layout)
    name = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
    return Birth(tgid, tid, name, cgroup, uid, port, flags, boot_ns, boot_to_epoch + boot_ns / 1e9)


def when(b: Birth, now: float) -> str:
    """Local time of the bind: ``12:03:07`` today-ish, with the date when older than 20 hours."""
    from datetime import datetime

    t = datetime.fromtimestamp(b.at)
    return t.strftime("%H:%M:%S" if now - b.at < 20 * 3600 else "%Y-%m-%d %H:%M:%S")


def text(b: Birth, now: float) -> str:
    """``python[4121] at 12:03:07``: what `ls`, `why` and `top` print after "bound by"."""
    return f"{b.label} at {when(b, now)}"


def hook_name(flags: int) -> str:
    return "listen" if flags & Flag.LISTEN else "bind6" if flags & Flag.BIND6 else "bind4"
