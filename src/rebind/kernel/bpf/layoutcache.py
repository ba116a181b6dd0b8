"""The per-boot cache of what the BPF programs read from vmlinux BTF (one for every program).

Finding a program's member offsets walks tens of thousands of BTF records (the owner scan's
~15 ms, the socket iterators' ~0.5 s on 6.18: bench/sockiter.py). They cannot change until the
next boot, so each layout is kept in /run (a tmpfs, emptied at boot), in a file of its own,
keyed by boot id and BTF size, and remembered in the process after the first use.

The file is trusted only if it is ours (owner = our euid) and nobody else may write it; it is
written beside its final name with O_CREAT|O_EXCL|O_NOFOLLOW and renamed over it, in /run/rebind
(created 0755: only root, who can write /run, makes it). What is unreadable, foreign, of another
boot or another member list reads as "no cache": the layout is read from BTF again.

Each program's cache is made by :func:`layout_cache`, which names the file and its first line
after the program's member list (see there why).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Generic, TypeVar

from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.syscall import VMLINUX_BTF, BPFUnavailable, read_vmlinux_btf

T = TypeVar("T")

CACHE_DIR = "/run/rebind"


def cache_key(btf_path: str = VMLINUX_BTF) -> str | None:
    """This boot and this BTF: what a cached layout must have been made for."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return f"{boot_id} {os.stat(btf_path).st_size}"
    except OSError:
        return None


class LayoutCache(Generic[T]):
    """One program's layout: ``build`` reads it from BTF, ``encode``/``decode`` turn it into the
    lines of its cache file and back (``decode`` returns None for anything it does not accept)."""

    def __init__(
        self,
        path: str,
        magic: str,
        *,
        build: Callable[[bytes], T],
        encode: Callable[[T], list[str]],
        decode: Callable[[list[str]], T | None],
    ) -> None:
        self.path, self.magic = path, magic
        self.build, self.encode, self.decode = build, encode, decode
        self._memo: T | None = None

    def load(self, *, use_cache: bool = True) -> T:
        """This kernel's layout: from this process, the per-boot cache, or its BTF."""
        if self._memo is not None:
            return self._memo
        key = cache_key() if use_cache else None
        if key is not None and (cached := self.read(key)) is not None:
            self._memo = cached
            return cached
        data = read_vmlinux_btf()
        try:
            lay = self.build(data)
        except btfmod.BTFError as exc:
            raise BPFUnavailable(f"kernel BTF: {exc}") from exc
        if key is not None:
            self.write(key, lay)
        self._memo = lay
        return lay

    def read(self, key: str) -> T | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None  # not ours, or writable by others: do not trust it
            lines = os.read(fd, 1 << 16).decode().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        finally:
            os.close(fd)
        if len(lines) < 2 or lines[0] != self.magic or lines[1] != key:
            return None
        return self.decode(lines[2:])

    def write(self, key: str, lay: T) -> None:
        body = [self.magic, key, *self.encode(lay)]
        tmp = f"{self.path}.{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, ("\n".join(body) + "\n").encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def layout_cache(
    name: str,
    version: int,
    members: object,
    *,
    build: Callable[[bytes], T],
    encode: Callable[[T], list[str]],
    decode: Callable[[list[str]], T | None],
) -> LayoutCache[T]:
    """The cache of one program's layout: /run/rebind/NAME-CRC, first line "rebind-NAME VERSION
    CRC", where CRC is the crc32 of ``members`` (what the program reads: its repr must change
    when they do) and VERSION is bumped when the file's lines change meaning.

    One file per member list: two rebind versions on one host (a venv beside the system's) would
    otherwise rewrite each other's cache on every run, and each pay the BTF walk each time. The
    magic names the member list too: a rebind that reads other members never takes this one's
    cache (an optional member absent from the file would otherwise read as absent from the
    kernel). crc32, not hashlib: this tells our own versions apart (no adversary picks the
    lists), and importing hashlib loads OpenSSL, 4-12 ms of every `why` (bench/whyperf.py).
    """
    crc = format(zlib.crc32(repr(members).encode()), "08x")
    path, magic = f"{CACHE_DIR}/{name}-{crc}", f"rebind-{name} {version} {crc}"
    return LayoutCache(path, magic, build=build, encode=encode, decode=decode)
