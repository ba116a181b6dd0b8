"""Where the bind-hash programs (:mod:`.bindhash`) look, and the entry they fill (pure: no syscalls).

The kernel decides bind() and connect() by a port's bind bucket (net/ipv4/inet_hashtables.c,
inet_connection_sock.c, Linux 6.8+ for the owners' linkage):

- ``current->nsproxy->net_ns``: the caller's namespace (the test run runs in the caller's task);
- ``net->ipv4.tcp_death_row.hashinfo->bhash[(port + net->hash_mix) & (bhash_size - 1)].chain``
  (inet_bhashfn): ``struct inet_bind_bucket``s linked by ``node``, one per (net, l3mdev, port)
  (inet_bind_bucket_match);
- each bucket's ``bhash2`` list: ``struct inet_bind2_bucket``s (one per address) linked by
  ``bhash_node``;
- each of those an ``owners`` list of sockets, full and TIME_WAIT, linked by
  ``sock_common.skc_bind_node`` (6.8 moved the owners from the port's bucket to bhash2's).

Every offset is read from vmlinux BTF (:func:`layout_from_btf`) and checked
(:func:`check_layout`): a member missing on this kernel is a BTFError, which the reader turns
into Unavailable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from rebind.kernel.bpf import btf as btfmod

#: (struct, member path, size in bytes the programs read it as; 0: any, its offset only)
MEMBERS: tuple[tuple[str, str, int], ...] = (
    ("task_struct", "nsproxy", 8),
    ("nsproxy", "net_ns", 8),
    ("net", "hash_mix", 4),
    ("net", "ipv4.tcp_death_row.hashinfo", 8),
    ("inet_hashinfo", "bhash", 8),
    ("inet_hashinfo", "bhash_size", 4),
    ("inet_bind_hashbucket", "chain", 8),
    ("hlist_head", "first", 8),
    ("hlist_node", "next", 8),
    ("inet_bind_bucket", "ib_net.net", 8),
    ("inet_bind_bucket", "l3mdev", 4),
    ("inet_bind_bucket", "port", 2),
    ("inet_bind_bucket", "fastreuse", 1),
    ("inet_bind_bucket", "fastreuseport", 1),
    ("inet_bind_bucket", "fastuid", 4),
    ("inet_bind_bucket", "fast_v6_rcv_saddr", 16),
    ("inet_bind_bucket", "fast_rcv_saddr", 4),
    ("inet_bind_bucket", "fast_sk_family", 2),
    ("inet_bind_bucket", "fast_ipv6_only", 1),
    ("inet_bind_bucket", "node", 16),
    ("inet_bind_bucket", "bhash2", 8),
    ("inet_bind2_bucket", "ib_net.net", 8),
    ("inet_bind2_bucket", "port", 2),
    ("inet_bind2_bucket", "bhash_node", 16),
    ("inet_bind2_bucket", "owners", 8),
    ("sock_common", "skc_bind_node", 16),
    ("sock_common", "skc_num", 2),
    ("sock_common", "skc_state", 1),
    ("sock_common", "skc_net", 8),
    ("sock_common", "skc_cookie", 8),
    # what `rebind trace`'s snapshot needs beside the record (bindowners._emit_extras): the
    # socket's inode as sock_i_ino finds it (sk_socket -> SOCK_INODE: the socket_alloc's
    # vfs_inode), and a TIME_WAIT's timer as inet_twsk_diag_fill reads it
    ("sock", "sk_socket", 8),
    ("socket_alloc", "socket", 0),
    ("socket_alloc", "vfs_inode", 0),
    # and its struct file (sock_alloc_file sets it once): the owner scan's hint
    # (kernel/bpf/scan.py: files), so it need not dereference every file to find the socket's
    ("socket", "file", 8),
    ("inode", "i_ino", 8),
    ("inet_timewait_sock", "tw_timer.expires", 8),
)
#: Structs whose size the programs use (an array's stride).
SIZED = ("inet_bind_hashbucket",)
#: A struct's members the programs copy in one bpf_probe_read_kernel (its first bytes, up to the
#: last wanted member's end): one read a bucket instead of one a member. Bounded by SPAN_MAX.
SPAN_MAX = 128


@dataclass(frozen=True, slots=True)
class BindHashLayout:
    """Byte offsets ("struct.path" -> offset) and the struct sizes, all from vmlinux BTF."""

    offsets: tuple[tuple[str, int], ...]
    sizes: tuple[tuple[str, int], ...]

    def __getitem__(self, key: str) -> int:
        for k, v in self.offsets:
            if k == key:
                return v
        raise KeyError(key)

    def size(self, name: str) -> int:
        return dict(self.sizes)[name]

    def span(self, struct_name: str) -> int:
        """Bytes of ``struct_name`` the programs copy at once: from 0 past every member they
        read, 8-aligned (:data:`MEMBERS` gives the sizes)."""
        end = max(self[f"{s}.{m}"] + size for s, m, size in MEMBERS if s == struct_name)
        return (end + 7) & ~7


def layout_from_btf(data: bytes) -> BindHashLayout:
    b = btfmod.BTF(data)
    names = sorted({s for s, _, _ in MEMBERS} | set(SIZED))
    ids = b.find_all([(s, btfmod.KIND_STRUCT) for s in names])
    offsets: list[tuple[str, int]] = []
    for s, path, size in MEMBERS:
        m = b.member(ids[s, btfmod.KIND_STRUCT], path)
        if size and m.size != size:
            raise btfmod.BTFError(f"{s}.{path} is {m.size} bytes, expected {size}")
        offsets.append((f"{s}.{path}", m.offset))
    sizes = tuple((s, b.resolve(ids[s, btfmod.KIND_STRUCT])[1]) for s in SIZED)
    lay = BindHashLayout(tuple(offsets), sizes)
    check_layout(lay)
    return lay


def check_layout(lay: BindHashLayout) -> None:
    """What the programs assume, checked rather than trusted: every member known, list links at
    offset 0 of their nodes, the copied spans small enough for the stack."""
    have = {k for k, _ in lay.offsets}
    for s, m, _ in MEMBERS:
        if f"{s}.{m}" not in have:
            raise btfmod.BTFError(f"layout lacks {s}.{m}")
    for key in ("hlist_head.first", "hlist_node.next", "socket_alloc.socket"):
        if lay[key] != 0:
            raise btfmod.BTFError(f"{key} is not at offset 0")
    for s in ("inet_bind_bucket", "inet_bind2_bucket"):
        if lay.span(s) > SPAN_MAX:
            raise btfmod.BTFError(f"{s}: {lay.span(s)} bytes to copy, more than {SPAN_MAX}")
    for s in SIZED:
        if not 0 < lay.size(s) <= 1 << 16:
            raise btfmod.BTFError(f"sizeof({s}) = {lay.size(s)}")


def encode_layout(lay: BindHashLayout) -> list[str]:
    return [*(f"off {k} {v}" for k, v in lay.offsets), *(f"size {k} {v}" for k, v in lay.sizes)]


def decode_layout(lines: list[str]) -> BindHashLayout | None:
    offsets: list[tuple[str, int]] = []
    sizes: list[tuple[str, int]] = []
    try:
        for line in lines:
            kind, name, value = line.split()
            (offsets if kind == "off" else sizes).append((name, int(value)))
        lay = BindHashLayout(tuple(offsets), tuple(sizes))
        check_layout(lay)
    except (ValueError, KeyError, btfmod.BTFError):
        return None
    return lay


# ---------------------------------------------------------------------------------------------
# The bucket program's entry: one per port asked (read_port_buckets)

#: Entry flags: the program ran for it; the chain was longer than CHAIN_HOPS (the port may have
#: a bucket further on: unknown); a copy faulted; a bucket's bhash2 list or a bind2's owners list
#: was longer than counted; a bind2 bucket of another port or namespace was met (freed and
#: reused mid-walk: the counts are not to be trusted).
RAN, CHAIN_TRUNCATED, FAULTED, BIND2_TRUNCATED, OWNERS_TRUNCATED, INCONSISTENT = 1, 2, 4, 8, 16, 32
#: Bounds of the walks (bounded loops: the verifier follows each hop).
CHAIN_HOPS = 32  # buckets of one bhash chain (all namespaces share it)
BIND2_HOPS = 8  # bind2 buckets (addresses) of one bucket, counted
OWNER_HOPS = 16  # owners of one bind2 bucket, counted

#: port (the input), matched buckets, flags, then the first matched bucket's fastreuse,
#: fastreuseport, bind2 count, fastuid, l3mdev, owners count (summed over its bind2 buckets),
#: fast_sk_family, fast_ipv6_only, pad, fast_rcv_saddr, fast_v6_rcv_saddr, pad. The fast_*
#: fields and fastuid are copied only where fastreuseport > 0 (else zero: the kernel leaves
#: them stale), so that equal buckets give equal bytes (the decoder shares their object).
ENTRY_FIELDS: tuple[tuple[str, str], ...] = (
    ("port", "H"),
    ("matched", "B"),
    ("flags", "B"),
    ("fastreuse", "b"),
    ("fastreuseport", "b"),
    ("bind2", "H"),
    ("fastuid", "I"),
    ("l3mdev", "i"),
    ("owners", "I"),
    ("fast_sk_family", "H"),
    ("fast_ipv6_only", "B"),
    ("pad", "B"),
    ("fast_rcv_saddr", "4s"),
    ("fast_v6_rcv_saddr", "16s"),
    ("pad2", "4x"),
)
ENTRY = struct.Struct("<" + "".join(f for _, f in ENTRY_FIELDS))
ENT: dict[str, int] = {}
_at = 0
for _name, _fmt in ENTRY_FIELDS:
    ENT[_name] = _at
    _at += struct.calcsize("<" + _fmt)
#: The names of the values ENTRY unpacks to, in order (padding "x" gives none).
ENTRY_NAMES = tuple(n for n, f in ENTRY_FIELDS if not f.endswith("x"))
