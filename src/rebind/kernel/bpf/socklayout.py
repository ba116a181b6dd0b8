"""What the socket programs and their readers agree on (pure: no syscalls): the record and the
kernel's layout.

:data:`RECORD`: the fixed-size record the programs (:mod:`.sockprog`: the iterators', and the
lookup's in :mod:`.socklookup`) write per socket and :mod:`.sockdecode` reads, with the values
some fields take (``kind``, ``ABSENT``, ``CHAIN_UNKNOWN``) and the ports map's value of the count
mode. :class:`SockLayout`: where the programs look in the kernel's structures, the members
(:data:`SOCK_MEMBERS`, :data:`OPTIONAL_MEMBERS`) and attach points (:data:`SOCK_TARGETS`) read
from vmlinux BTF (:func:`.sockprog.sock_layout_from_btf`; cached per boot by :mod:`.sockiter`).
What each field means to bind()/connect() is in :mod:`.sockiter`'s docstring.
"""

from __future__ import annotations

import struct

from rebind.kernel.bpf import btf as btfmod

#: Record kinds: what the iterator's pointer really is (struct sock_common is the prefix of all).
KIND_FULL, KIND_TIMEWAIT, KIND_REQUEST = 0, 1, 2
#: A one-byte field whose member this kernel's BTF lacks (e.g. tw_connect_bind before 6.18).
ABSENT = 0xFF
#: UDP: how far along its port chain the program follows ``next`` (udp_lib_lport_inuse walks
#: that chain only while the slot is small: ``hslot->count > 10`` switches to hash2, unless the
#: hash2 slot is larger still). Past this, ``chain_after`` is CHAIN_UNKNOWN.
CHAIN_HOPS = 64
CHAIN_UNKNOWN = 0xFFFFFFFF

#: The record, field by field (little-endian, no padding; natural alignment kept by the order).
RECORD_FIELDS: tuple[tuple[str, str], ...] = (
    ("cookie", "Q"),  # bpf_get_socket_cookie(): the same cookie inet_diag reports
    ("seq_num", "Q"),  # bpf_iter_meta.seq_num: the iterator's visiting order
    ("tw_ts_recent_stamp", "Q"),  # tcp_timewait_sock (u32 on 6.18, time64_t before 5.x)
    ("netns", "I"),  # skc_net->ns.inum
    ("uid", "I"),  # the iterator's uid (sock_i_uid, in the reader's user namespace)
    ("sk_uid", "I"),  # sock.sk_uid, the kuid SO_REUSEPORT compares (full sockets)
    ("bound_dev_if", "I"),  # skc_bound_dev_if
    ("bucket", "I"),  # bpf_iter__udp.bucket (UDP): the hash slot being walked
    ("faults", "I"),  # copies that failed
    ("fastuid", "I"),  # inet_bind_bucket
    ("tw_ts_recent", "I"),  # tcp_timewait_sock
    ("rcv_saddr", "4s"),  # skc_rcv_saddr (network order)
    ("daddr", "4s"),  # skc_daddr
    ("fast_rcv_saddr", "4s"),  # inet_bind_bucket
    ("chain_after", "I"),  # UDP: sockets after this one in its port's chain (skc_node), or CHAIN_UNKNOWN
    ("v6_rcv_saddr", "16s"),
    ("v6_daddr", "16s"),
    ("fast_v6_rcv_saddr", "16s"),
    ("family", "H"),  # skc_family
    ("lport", "H"),  # skc_num (host order)
    ("dport", "2s"),  # skc_dport (network order)
    ("tb_port", "H"),  # inet_bind_bucket.port
    ("fast_sk_family", "H"),
    ("state", "B"),  # skc_state
    ("kind", "B"),  # KIND_*
    ("reuse", "B"),  # skc_reuse:4 (SK_NO_REUSE 0, SK_CAN_REUSE 1, SK_FORCE_REUSE 2)
    ("reuseport", "B"),  # skc_reuseport:1
    ("ipv6only", "B"),  # skc_ipv6only:1
    ("userlocks", "B"),  # sk_userlocks (full sockets)
    ("tw_substate", "B"),  # inet_timewait_sock
    ("has_bucket", "B"),  # bit 0: the inet_bind_bucket fields were read; bit 1: the bind2 one's
    ("fastreuse", "b"),  # inet_bind_bucket (signed: -1 on 6.18 for a connect()-made bucket)
    ("fastreuseport", "b"),
    ("fast_ipv6_only", "B"),
    ("tw_connect_bind", "B"),  # inet_timewait_sock.tw_connect_bind:1 (6.18), or ABSENT
    ("tb2_fastreuse", "b"),  # inet_bind2_bucket (per port and address; 6.18), if has_bucket & 2
    ("tb2_fastreuseport", "b"),
)
RECORD = struct.Struct("<" + "".join(f for _, f in RECORD_FIELDS))
RECORD_NAMES = tuple(n for n, _ in RECORD_FIELDS)
#: Byte offset of each record field.
REC: dict[str, int] = {}
_at = 0
for _name, _fmt in RECORD_FIELDS:
    REC[_name] = _at
    _at += struct.calcsize("<" + _fmt)
REC_SIZE: dict[str, int] = {n: struct.calcsize("<" + f) for n, f in RECORD_FIELDS}

#: Listeners-only mode: the ports map key whose first counter the program sets to 1 when it stops
#: the walk (port 0 is never asked about).
STOP_KEY = 0

#: Count mode: the ports map's value, one u64 counter per socket state (skc_state & 15).
COUNT_STATES = 16
COUNT_VALUE = struct.Struct(f"<{COUNT_STATES}Q")


# ---------------------------------------------------------------------------------------------
# Where the programs look: from vmlinux BTF

#: (struct, member path): copied or bit-extracted by the programs; sizes are checked against the
#: record slot each lands in (a member may be smaller than its slot, never larger).
SOCK_MEMBERS: tuple[tuple[str, str], ...] = (
    ("bpf_iter__tcp", "meta"),
    ("bpf_iter__tcp", "sk_common"),
    ("bpf_iter__tcp", "uid"),
    ("bpf_iter__udp", "meta"),
    ("bpf_iter__udp", "udp_sk"),
    ("bpf_iter__udp", "uid"),
    ("bpf_iter__udp", "bucket"),
    ("bpf_iter_meta", "seq"),
    ("bpf_iter_meta", "seq_num"),
    ("sock_common", "skc_family"),
    ("sock_common", "skc_state"),
    ("sock_common", "skc_reuse"),
    ("sock_common", "skc_reuseport"),
    ("sock_common", "skc_ipv6only"),
    ("sock_common", "skc_bound_dev_if"),
    ("sock_common", "skc_net"),
    ("sock_common", "skc_num"),
    ("sock_common", "skc_dport"),
    ("sock_common", "skc_rcv_saddr"),
    ("sock_common", "skc_daddr"),
    ("sock_common", "skc_v6_rcv_saddr"),
    ("sock_common", "skc_v6_daddr"),
    ("sock_common", "skc_node"),
    ("hlist_node", "next"),
    ("net", "ns.inum"),
    ("sock", "__sk_common"),
    ("sock", "sk_userlocks"),
    ("sock", "sk_uid"),
    ("udp_sock", "inet.sk"),
    ("inet_connection_sock", "icsk_inet.sk"),
    ("inet_connection_sock", "icsk_bind_hash"),
    ("inet_timewait_sock", "__tw_common"),
    ("inet_timewait_sock", "tw_substate"),
    ("inet_timewait_sock", "tw_tb"),
    ("tcp_timewait_sock", "tw_sk"),
    ("tcp_timewait_sock", "tw_ts_recent"),
    ("tcp_timewait_sock", "tw_ts_recent_stamp"),
    ("inet_bind_bucket", "port"),
    ("inet_bind_bucket", "fastreuse"),
    ("inet_bind_bucket", "fastreuseport"),
    ("inet_bind_bucket", "fastuid"),
    ("inet_bind_bucket", "fast_rcv_saddr"),
    ("inet_bind_bucket", "fast_v6_rcv_saddr"),
    ("inet_bind_bucket", "fast_sk_family"),
    ("inet_bind_bucket", "fast_ipv6_only"),
)
#: Members some kernels lack: the record says ABSENT for them.
OPTIONAL_MEMBERS: tuple[tuple[str, str], ...] = (
    ("inet_timewait_sock", "tw_connect_bind"),  # 6.18
    ("inet_connection_sock", "icsk_bind2_hash"),  # 6.1 (bhash2)
    ("inet_timewait_sock", "tw_tb2"),  # 6.1
    ("inet_bind2_bucket", "fastreuse"),  # 6.18: the bind2 bucket's own cache
    ("inet_bind2_bucket", "fastreuseport"),
)
SOCK_TARGETS = ("bpf_iter_tcp", "bpf_iter_udp")


class SockLayout:
    """Attach ids and member positions (to the bit), all from vmlinux BTF."""

    __slots__ = ("attach", "bits")

    def __init__(self, attach: dict[str, int], bits: dict[str, btfmod.Bits]) -> None:
        self.attach = attach
        self.bits = bits  # "struct.path" -> Bits; OPTIONAL_MEMBERS may be missing

    def __getitem__(self, key: str) -> int:
        """Byte offset of a byte-aligned member."""
        b = self.bits[key]
        if b.bit_offset % 8:
            raise btfmod.BTFError(f"{key} is not byte-aligned")
        return b.bit_offset // 8

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SockLayout) and (self.attach, self.bits) == (other.attach, other.bits)

    __hash__ = None  # type: ignore[assignment]
