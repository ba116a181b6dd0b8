"""Birth certificates: who gave a socket its port, and when, as the kernel recorded it (pure).

``rebind trace --install`` leaves small BPF programs on the root cgroup's hooks
(:mod:`rebind.kernel.birth`) that write one :data:`VALUE` into the socket's ``sk_storage`` when
bind(), listen(), connect() or a UDP send gives it its port (:class:`Flag`), and mark the copy a
connection accept() returns inherits from its listener; inet_diag hands it back with each TCP
socket (``INET_DIAG_SK_BPF_STORAGES``), the UDP iterator with each UDP one
(kernel/birth_udp.py). It names the process that made the call, which is not always the one
holding the socket now (an fd passed over SCM_RIGHTS, a forked child, a supervisor's socket
activation), and survives the binder's exit.
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
    CONNECT: Final = 8  # BPF_CGROUP_INET{4,6}_CONNECT: connect() on a socket without a port
    SEND: Final = 16  # BPF_CGROUP_UDP{4,6}_SENDMSG: a UDP send autobound the socket
    #: Not a certificate: a UDP socket made while installed (BPF_CGROUP_INET_SOCK_CREATE), that
    #: nothing certified yet; what lets SEND tell an autobound port from an older one.
    CREATED: Final = 0x200
    #: Set on a connection accept() returns (BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB): the rest of
    #: the value is its listener's, copied by the kernel when it made the connection (BPF_F_CLONE).
    ACCEPTED: Final = 0x100


#: The bits one of which a certificate has (a value with none is a marker, or not filled yet).
CERTIFIED: Final = Flag.BIND4 | Flag.BIND6 | Flag.LISTEN | Flag.CONNECT | Flag.SEND


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

    @property
    def accepted(self) -> bool:
        """A connection accept() returns: the certificate is its listener's (who bound that)."""
        return bool(self.flags & Flag.ACCEPTED)

    @property
    def connected(self) -> bool:
        """connect() chose the port (TCP's ephemeral port, UDP's autobind)."""
        return bool(self.flags & Flag.CONNECT)

    @property
    def autobound(self) -> bool:
        """A UDP send (sendto/sendmsg with a destination) chose the port."""
        return bool(self.flags & Flag.SEND)


def decode(raw: bytes, boot_to_epoch: float, port: int = 0) -> Birth | None:
    """One map value as inet_diag (or the UDP reader) returned it; ``boot_to_epoch``: epoch
    seconds at boot time 0; ``port``: the socket's own, for a certificate written before the
    port was chosen (connect(): the value says 0)."""
    if len(raw) < VALUE.size:
        return None
    boot_ns, cgroup, tid, tgid, uid, at_port, flags, comm = VALUE.unpack_from(raw)
    if not flags & CERTIFIED:
        return None  # storage created but never filled (a program of an older layout)
    port = at_port or port
    name = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
    return Birth(tgid, tid, name, cgroup, uid, port, flags, boot_ns, boot_to_epoch + boot_ns / 1e9)


def when(b: Birth, now: float) -> str:
    """Local time of the bind: ``12:03:07`` today-ish, with the date when older than 20 hours."""
    from datetime import datetime

    t = datetime.fromtimestamp(b.at)
    return t.strftime("%H:%M:%S" if now - b.at < 20 * 3600 else "%Y-%m-%d %H:%M:%S")


def text(b: Birth, now: float) -> str:
    """``python[4121] at 12:03:07``: who and when, without what they did (:func:`phrase`)."""
    return f"{b.label} at {when(b, now)}"


def phrase(b: Birth, now: float) -> str:
    """What `ls`, `why`, `top` and `trace` print: ``bound by python[4121] at 12:03:07``;
    ``connected by curl[77] at ...`` when connect() chose the port; ``accepted on a socket
    bound by nginx[12] at ...`` for a connection accept() returns (the certificate is its
    listener's: the process named bound the listener, not this connection)."""
    if b.accepted:
        return f"accepted on a socket bound by {text(b, now)}"
    if b.connected:
        return f"connected by {text(b, now)}"
    if b.autobound:
        return f"autobound by {text(b, now)} (sendmsg)"
    return f"bound by {text(b, now)}"


def hook_name(flags: int) -> str:
    """Which hook wrote it (for an accepted connection: its listener's; see ``accepted``)."""
    if flags & Flag.CONNECT:
        return "connect"
    if flags & Flag.SEND:
        return "sendmsg"
    return "listen" if flags & Flag.LISTEN else "bind6" if flags & Flag.BIND6 else "bind4"
