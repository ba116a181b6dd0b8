"""Where the fd-table program (:mod:`.programs`) looks: attach ids and byte offsets, all read
from vmlinux BTF (pure: no syscalls). Kept apart from the program so that the layout cache
(:mod:`.scan`) and tests can use it without the assembler.
"""

from __future__ import annotations

from rebind.kernel.bpf import btf as btfmod

#: (struct, member path, size in bytes the programs load it with)
MEMBERS = (
    ("bpf_iter__task", "task", 8),
    ("task_struct", "pid", 4),
    ("task_struct", "tgid", 4),
    ("task_struct", "group_leader", 8),
    ("task_struct", "start_boottime", 8),
    ("task_struct", "files", 8),
    ("task_struct", "nsproxy", 8),
    ("task_struct", "cred", 8),
    ("files_struct", "fdt", 8),
    ("fdtable", "max_fds", 4),
    ("fdtable", "fd", 8),
    ("nsproxy", "net_ns", 8),
    ("net", "ns.inum", 4),
    ("cred", "euid", 4),
    ("file", "f_inode", 8),
    ("inode", "i_mode", 2),
    ("inode", "i_sb", 8),
    ("inode", "i_ino", 8),
    ("super_block", "s_magic", 8),
)
TARGETS = ("bpf_iter_task",)


class Layout:
    """Where the programs look: attach ids and byte offsets, all from vmlinux BTF."""

    __slots__ = ("attach", "offsets")

    def __init__(self, attach: dict[str, int], offsets: dict[str, int]) -> None:
        self.attach = attach  # iterator target -> BTF id of its FUNC
        self.offsets = offsets  # "struct.member" -> byte offset

    def __getitem__(self, key: str) -> int:
        return self.offsets[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.attach, self.offsets) == (other.attach, other.offsets)

    __hash__ = None  # type: ignore[assignment]


def layout_from_btf(data: bytes) -> Layout:
    """Find the attach points and the offsets; sizes are checked, not assumed."""
    b = btfmod.BTF(data)
    structs = sorted({s for s, _, _ in MEMBERS})
    ids = b.find_all([*((t, btfmod.KIND_FUNC) for t in TARGETS), *((s, btfmod.KIND_STRUCT) for s in structs)])
    offsets: dict[str, int] = {}
    for struct_name, member, size in MEMBERS:
        m = b.member(ids[struct_name, btfmod.KIND_STRUCT], member)
        if m.size != size:
            raise btfmod.BTFError(f"{struct_name}.{member} is {m.size} bytes, expected {size}")
        offsets[f"{struct_name}.{member}"] = m.offset
    return Layout({t: ids[t, btfmod.KIND_FUNC] for t in TARGETS}, offsets)
