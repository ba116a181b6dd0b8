"""Birth certificates' kernel side: install, remove and read the post-bind program's map.

``rebind trace --install`` loads :mod:`rebind.kernel.bpf.birth_prog`'s program for each of
:data:`HOOKS` (IPv4 and IPv6 post-bind; the sock_ops listen and passive-established callbacks;
IPv4 and IPv6 connect; socket creation; IPv4 and IPv6 UDP sendmsg), attaches them to the root
of the cgroup v2 hierarchy with ``BPF_LINK_CREATE`` (Linux 5.7) and pins the links and the
``BPF_MAP_TYPE_SK_STORAGE`` map (``BPF_F_CLONE``: accepted connections inherit their
listener's certificate) under :func:`pin_dir` (``/sys/fs/bpf/rebind``). An earlier install
(fewer pins, a map without ``BPF_F_CLONE``) is replaced, its certificates lost. The pins are
what keeps them: the processes that made them exit, the links stay attached and the map
stays. ``rebind trace --uninstall`` (or ``rm /sys/fs/bpf/rebind/birth_*``) unpins them; with
the last reference gone the kernel detaches the links, frees the programs and the map, and
with it every socket's certificate.

Readers (:mod:`rebind.kernel.diag`, through :mod:`rebind.kernel.birth_pins`) open the pinned
map with ``BPF_OBJ_GET`` and pass its fd in
each inet_diag dump (``INET_DIAG_REQ_SK_BPF_STORAGES``, Linux 5.2; the kernel requires
CAP_BPF or CAP_SYS_ADMIN, ``bpf_sk_storage_diag_alloc``); when the map is not there, or cannot
be opened, dumps are as before and no certificate is shown. inet_diag never returns UDP
sockets' storage: :mod:`rebind.kernel.birth_udp` reads those with the UDP socket iterator.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from dataclasses import dataclass

from rebind.kernel.birth_pins import MAP_PIN, open_map, pin_dir
from rebind.kernel.bpf import birth_prog as prog
from rebind.kernel.bpf.syscall import (
    BPF_LINK_CREATE,
    BPF_MAP_CREATE,
    BPFUnavailable,
    ProgType,
    VerifierRejected,
    attr_buf,
    bpf,
    btf_load,
    load_program,
)
from rebind.model.birth import VALUE, Flag

BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7


@dataclass(frozen=True, slots=True)
class Hook:
    flag: int  # model.birth.Flag: what the program writes, and which program it is
    prog_type: int
    attach_type: int
    name: bytes  # the program's name (bpftool prog show)
    pin: str  # the link's pin name


HOOKS = (
    Hook(
        Flag.BIND4,
        prog.BPF_PROG_TYPE_CGROUP_SOCK,
        prog.BPF_CGROUP_INET4_POST_BIND,
        b"rebind_birth4",
        "birth_bind4",
    ),
    Hook(
        Flag.BIND6,
        prog.BPF_PROG_TYPE_CGROUP_SOCK,
        prog.BPF_CGROUP_INET6_POST_BIND,
        b"rebind_birth6",
        "birth_bind6",
    ),
    Hook(
        Flag.LISTEN, prog.BPF_PROG_TYPE_SOCK_OPS, prog.BPF_CGROUP_SOCK_OPS, b"rebind_birthl", "birth_listen"
    ),
    Hook(
        Flag.CONNECT,
        prog.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        prog.BPF_CGROUP_INET4_CONNECT,
        b"rebind_birthc4",
        "birth_connect4",
    ),
    Hook(
        Flag.CONNECT,
        prog.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        prog.BPF_CGROUP_INET6_CONNECT,
        b"rebind_birthc6",
        "birth_connect6",
    ),
    Hook(
        Flag.CREATED,
        prog.BPF_PROG_TYPE_CGROUP_SOCK,
        prog.BPF_CGROUP_INET_SOCK_CREATE,
        b"rebind_birthnew",
        "birth_create",
    ),
    Hook(
        Flag.SEND,
        prog.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        prog.BPF_CGROUP_UDP4_SENDMSG,
        b"rebind_births4",
        "birth_send4",
    ),
    Hook(
        Flag.SEND,
        prog.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        prog.BPF_CGROUP_UDP6_SENDMSG,
        b"rebind_births6",
        "birth_send6",
    ),
)
PINS = (*(h.pin for h in HOOKS), MAP_PIN)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


@dataclass(frozen=True, slots=True)
class Installed:
    pin_dir: str
    cgroup: str  # the cgroup v2 directory the programs are attached to
    already: bool  # every pin was there already: nothing was loaded
    replaced: tuple[str, ...] = ()  # an older install's pins, removed first (its records are lost)


def _caps() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            return next((int(line.split()[1], 16) for line in f if line.startswith(b"CapEff:")), 0)
    except (OSError, ValueError, IndexError):
        return 0


def check_privilege() -> None:
    caps = _caps()
    need = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN)
    if caps & need != need and not caps & (1 << CAP_SYS_ADMIN):
        raise BPFUnavailable(
            "rebind trace --install needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN): run it as root"
        )


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, root within its filesystem, fstype) from /proc/self/mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and right:
                    point = fields[4].replace("\\040", " ")
                    out.append((point, fields[3], right.split()[0]))
    except OSError:
        pass
    return out


def cgroup2_root() -> str:
    """The root of the cgroup v2 hierarchy (unified mode: /sys/fs/cgroup; hybrid: .../unified)."""
    roots = [point for point, root, fstype in _mounts() if fstype == "cgroup2" and root == "/"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in roots:
            return preferred
    if roots:
        return roots[0]
    raise BPFUnavailable("no cgroup v2 hierarchy mounted (the post-bind hooks attach to its root)")


def _fstype_of(path: str) -> str | None:
    best, kind = "", None
    for point, _root, fstype in _mounts():
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def _ensure_bpffs(directory: str) -> None:
    parent = os.path.dirname(directory.rstrip("/"))
    if _fstype_of(parent) == "bpf":
        return
    if parent != "/sys/fs/bpf":
        raise BPFUnavailable(f"{parent} is not a BPF filesystem: the pins need one (mount -t bpf)")
    # What systemd does at boot (mount_table in src/shared/mount-setup.c): mount it here.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", parent.encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise BPFUnavailable(f"mounting the BPF filesystem on {parent}: {os.strerror(err)}")


def _path_attr(
    path: str, fd: int, flags: int = 0
) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]:
    name = ctypes.create_string_buffer(path.encode())
    # pathname, bpf_fd, file_flags
    return name, attr_buf("<QII", ctypes.addressof(name), fd, flags)


def _pin(fd: int, path: str) -> None:
    _name, attr = _path_attr(path, fd)
    bpf(BPF_OBJ_PIN, attr)


def obj_get(path: str, flags: int = 0) -> int:
    _name, attr = _path_attr(path, 0, flags)
    return bpf(BPF_OBJ_GET, attr)


def _create_map() -> int:
    btf_fd = btf_load(prog.map_btf())
    try:
        # map_type, key_size, value_size, max_entries (0: per-socket storage), map_flags,
        # inner_map_fd, numa_node, map_name[16], map_ifindex, btf_fd, btf_key_type_id,
        # btf_value_type_id
        attr = attr_buf(
            "<7I16s4I",
            prog.BPF_MAP_TYPE_SK_STORAGE,
            4,
            VALUE.size,
            0,
            prog.MAP_FLAGS,
            0,
            0,
            b"rebind_birth",
            0,
            btf_fd,
            prog.KEY_TYPE_ID,
            prog.VALUE_TYPE_ID,
        )
        return bpf(BPF_MAP_CREATE, attr)
    finally:
        os.close(btf_fd)


def _load(map_fd: int, hook: Hook) -> int:
    """The hook's program through the one loader (kernel/bpf/syscall.load_program): no permission
    is BPFUnavailable, a refusal is VerifierRejected with the verifier's log."""
    kind = ProgType(hook.prog_type, hook.attach_type, hook.name, "the birth program", log_size=1 << 16)
    return load_program(prog.build_program(map_fd, hook.flag), prog=kind)


def _attach(prog_fd: int, cgroup_fd: int, hook: Hook) -> int:
    # link_create: prog_fd, target_fd (the cgroup), attach_type, flags. A link, not
    # BPF_PROG_ATTACH: it lives as long as its pin, so unpinning is the whole uninstall, and it
    # sits beside other programs on the same hook (links are always BPF_F_ALLOW_MULTI).
    return bpf(BPF_LINK_CREATE, attr_buf("<IIII", prog_fd, cgroup_fd, hook.attach_type, 0))


BPF_OBJ_GET_INFO_BY_FD = 15
#: struct bpf_map_info's head: type, id, key_size, value_size, max_entries, map_flags.
_MAP_INFO = struct.Struct("<6I")


def map_flags(fd: int) -> tuple[int, int]:
    """(value_size, map_flags) of a map fd (BPF_OBJ_GET_INFO_BY_FD)."""
    info = ctypes.create_string_buffer(80)
    # bpf_fd, info_len, info
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr_buf("<IIQ", fd, len(info), ctypes.addressof(info)))
    _type, _id, _key, value_size, _max, flags = _MAP_INFO.unpack_from(info.raw)
    return value_size, flags


def _map_is_current(directory: str) -> bool:
    """The pinned map is this version's: its value size, and BPF_F_CLONE (an install before
    accepted connections were certified made it without, and a map's flags never change)."""
    try:
        fd = obj_get(os.path.join(directory, MAP_PIN))
    except (OSError, BPFUnavailable):
        return False
    try:
        size, flags = map_flags(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return size == VALUE.size and flags & prog.MAP_FLAGS == prog.MAP_FLAGS


def installed(directory: str | None = None) -> list[str]:
    """The pins present (names), in PINS order."""
    d = directory or pin_dir()
    return [n for n in PINS if os.path.lexists(os.path.join(d, n))]


def install(directory: str | None = None) -> Installed:
    """Load, attach and pin; BPFUnavailable (one line) when this host cannot."""
    d = directory or pin_dir()
    check_privilege()
    cgroup = cgroup2_root()
    if installed(d) == list(PINS) and _map_is_current(d):
        return Installed(d, cgroup, already=True)
    older = tuple(installed(d))
    _ensure_bpffs(d)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise BPFUnavailable(f"{d} exists and is not root's directory: not using it") from None
    except OSError as exc:
        raise BPFUnavailable(f"creating {d}: {exc.strerror}") from exc
    uninstall(d, remove_dir=False)  # a half-done earlier install: start clean
    fds: list[int] = []
    try:
        try:
            map_fd = _create_map()
        except OSError as exc:
            raise BPFUnavailable(f"creating the sk_storage map (BTF, Linux 5.2): {exc.strerror}") from exc
        fds.append(map_fd)
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(cg_fd)
        links = {}
        for hook in HOOKS:
            try:
                prog_fd = _load(map_fd, hook)
                fds.append(prog_fd)
                links[hook.pin] = _attach(prog_fd, cg_fd, hook)
            except (VerifierRejected, BPFUnavailable):
                raise
            except OSError as exc:
                raise BPFUnavailable(f"loading the {hook.name.decode()} program: {exc.strerror}") from exc
            fds.append(links[hook.pin])
        try:
            _pin(map_fd, os.path.join(d, MAP_PIN))
            for pin, link_fd in links.items():
                _pin(link_fd, os.path.join(d, pin))
        except OSError as exc:
            uninstall(d)
            raise BPFUnavailable(f"pinning under {d}: {exc.strerror}") from exc
    finally:
        for fd in fds:
            os.close(fd)
    return Installed(d, cgroup, already=False, replaced=older)


def uninstall(directory: str | None = None, *, remove_dir: bool = True) -> list[str]:
    """Unpin links, then the map; the kernel detaches and frees them. Returns the names removed."""
    d = directory or pin_dir()
    removed = []
    for name in PINS:
        try:
            os.unlink(os.path.join(d, name))
            removed.append(name)
        except FileNotFoundError:
            continue
    if remove_dir:
        try:
            os.rmdir(d)
        except OSError:
            pass  # not there, or holds someone else's pins
    return removed


__all__ = [
    "MAP_PIN",
    "PINS",
    "Installed",
    "install",
    "installed",
    "obj_get",
    "open_map",
    "pin_dir",
    "uninstall",
]
