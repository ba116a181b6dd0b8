"""`rebind trace`'s kernel side: load and attach the sys_exit program, read its ring buffer.

The program is built by :mod:`rebind.kernel.bpf.trace_prog` from offsets in vmlinux BTF and
loaded through raw ``bpf(2)``. Events arrive through a ``BPF_MAP_TYPE_RINGBUF`` (Linux 5.8)
read here without libbpf: the map is mmap()ed as the kernel lays it out
(kernel/bpf/ringbuf.c: ``ringbuf_map_mmap_kern``): one read-write page holding the consumer
position, then a read-only page holding the producer position followed by the data pages mapped
twice in a row, so a record that wraps is still contiguous. Each record has an 8-byte header
(``u32 len`` whose bit 31 is BUSY, bit 30 DISCARD; ``u32 pg_off``), and is 8-aligned.

What stays loaded: nothing once the :class:`Tracer` is closed or the process exits (the links
and maps live as long as their fds).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
from collections.abc import Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.syscall import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    BPF_RAW_TRACEPOINT_OPEN,
    RAW_TRACEPOINT,
    BPFUnavailable,
    attr_buf,
    bpf,
    check_bpf_environment,
    load_program,
    map_create,
    map_lookup,
    map_update,
    read_vmlinux_btf,
)
from rebind.kernel.bpf.trace_prog import (
    COUNTERS,
    EVENT,
    MAX_ERRNO,
    Bits,
    TraceLayout,
    TraceMaps,
    build_program,
    layout_from_btf,
)
from rebind.model.records import IPAddress, Proto
from rebind.model.trace import AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, Kind, TraceEvent

#: raw_syscalls:sys_exit (include/trace/events/syscalls.h; CONFIG_HAVE_SYSCALL_TRACEPOINTS)
TRACEPOINT = "sys_exit"
#: Ring size: ~27k events of 152 bytes (header included) before one is dropped.
RING_BYTES = 4 << 20
RINGBUF_BUSY_BIT = 1 << 31
RINGBUF_DISCARD_BIT = 1 << 30
RINGBUF_HDR = 8


class Counters(NamedTuple):
    matched: int  # failures that passed the errno filter, summed over CPUs
    dropped: int  # of those, the ones the ring could not take


def check_environment() -> None:
    """What is missing to trace here, as one BPFUnavailable (cheap checks, before BTF)."""
    check_bpf_environment(
        no_caps="rebind trace needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run it as root",
        # bpf_get_current_pid_tgid() gives pids of the initial namespace; ours would differ.
        initial_pidns="rebind trace must run in the initial pid namespace (pids would not match)",
    )


def load_layout() -> TraceLayout:
    try:
        return layout_from_btf(read_vmlinux_btf())
    except btfmod.BTFError as exc:
        raise BPFUnavailable(f"kernel BTF: {exc}") from exc


def _map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    try:
        return map_create(map_type, key_size, value_size, max_entries)
    except OSError as exc:
        raise BPFUnavailable(f"creating a BPF map (type {map_type}): {exc.strerror}") from exc


def _attach(prog_fd: int, tracepoint: str = TRACEPOINT) -> int:
    """BPF_RAW_TRACEPOINT_OPEN: the link lives as long as its fd."""
    name = ctypes.create_string_buffer(tracepoint.encode())
    try:
        # raw_tracepoint: name, prog_fd
        return bpf(BPF_RAW_TRACEPOINT_OPEN, attr_buf("<QI4x", ctypes.addressof(name), prog_fd))
    except OSError as exc:
        raise BPFUnavailable(f"attaching to the {tracepoint} tracepoint: {exc.strerror}") from exc


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many per-CPU slots a PERCPU map value has (num_possible_cpus: highest id + 1)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    top = 0
    for part in text.split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


class Ring:
    """The consumer side of a BPF ring buffer map."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self.fd = map_fd
        self.cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self.prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self.cons.close()
            raise
        self.data_at = page
        self.poller = select.epoll()
        self.poller.register(map_fd, select.EPOLLIN)

    def read(self) -> list[bytes]:
        """Every committed record now in the ring (consumed: the space is given back)."""
        out: list[bytes] = []
        cons = struct.unpack_from("<Q", self.cons, 0)[0]
        prod = struct.unpack_from("<Q", self.prod, 0)[0]  # x86/arm64: an aligned 8-byte load
        while cons < prod:
            at = self.data_at + (cons & self.mask)
            hdr = struct.unpack_from("<I", self.prod, at)[0]
            if hdr & RINGBUF_BUSY_BIT:
                break  # reserved, not committed yet: read on the next wake-up
            length = hdr & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)
            if not hdr & RINGBUF_DISCARD_BIT:
                out.append(bytes(self.prod[at + RINGBUF_HDR : at + RINGBUF_HDR + length]))
            cons += (length + RINGBUF_HDR + 7) & ~7
            struct.pack_into("<Q", self.cons, 0, cons)
        return out

    def wait(self, timeout: float) -> None:
        self.poller.poll(timeout)

    def close(self) -> None:
        self.poller.close()
        self.prod.close()
        self.cons.close()


class Tracer:
    """The programs attached and the ring open; ``close()`` (or exit) detaches everything."""

    def __init__(self, errnos: Iterable[int], *, ring_bytes: int = RING_BYTES) -> None:
        check_environment()
        self.layout = load_layout()
        self._fds: list[int] = []
        self.ring: Ring | None = None
        self.cpus = possible_cpus()
        try:
            self.maps = TraceMaps(
                errnos=self._own(_map_create(BPF_MAP_TYPE_ARRAY, 4, 1, MAX_ERRNO + 1)),
                counters=self._own(_map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, COUNTERS.size, 1)),
                ring=self._own(_map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, ring_bytes)),
            )
            for e in sorted(set(errnos)):
                if not 0 < e <= MAX_ERRNO:
                    raise ValueError(f"errno {e} out of range")
                map_update(self.maps.errnos, struct.pack("<I", e), b"\x01")
            self.ring = Ring(self.maps.ring, ring_bytes)
            prog = self._own(load_program(build_program(self.layout, self.maps), prog=RAW_TRACEPOINT))
            self._own(_attach(prog))
        except BaseException:
            self.close()
            raise

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def counters(self) -> Counters:
        raw = map_lookup(self.maps.counters, b"\0\0\0\0", COUNTERS.size * self.cpus)
        matched = dropped = 0
        for m, d in COUNTERS.iter_unpack(raw):
            matched += m
            dropped += d
        return Counters(matched, dropped)

    def read(self, timeout: float) -> list[bytes]:
        """Records now in the ring; waits up to ``timeout`` seconds for one when empty."""
        assert self.ring is not None
        got = self.ring.read()
        if not got:
            self.ring.wait(timeout)
            got = self.ring.read()
        return got

    def events(self, timeout: float = 0.25) -> Iterator[list[bytes]]:
        """Batches of raw records (possibly empty, every ``timeout`` s, so callers can stop)."""
        while True:
            yield self.read(timeout)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for fd in reversed(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Decoding a record


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _bits(value: int, b: Bits) -> int:
    return (value >> b.shift) & ((1 << b.width) - 1)


def _sockaddr(raw: bytes) -> tuple[IPAddress | None, int, int]:
    """(address, port, scope id) of a sockaddr_in / sockaddr_in6; (None, 0, 0) for another family."""
    fam, port = struct.unpack_from("<HH", raw)  # sa_family is host order, sin_port network
    port = int.from_bytes(raw[2:4], "big")
    if fam == AF_INET:
        return IPv4Address(raw[4:8]), port, 0
    if fam == AF_INET6:
        return IPv6Address(raw[8:24]), port, struct.unpack_from("<I", raw, 24)[0]
    return None, port, 0


def decode(raw: bytes, bits: Mapping[str, Bits]) -> TraceEvent | None:
    """A record as a TraceEvent; None for sockets that are not TCP/UDP over IPv4/IPv6 (a
    failing bind of an AF_UNIX socket, a record cut short)."""
    if len(raw) < EVENT.size:
        return None
    (mono, cgroup, ino, tid, tgid, netns, err, uid, dev, kind, family, _stype, proto, flags, num, _pad,
     arg, saddr4, sockaddr, saddr6, comm, fd) = EVENT.unpack_from(raw)  # fmt: skip
    if family not in (AF_INET, AF_INET6) or kind not in {k.value for k in Kind}:
        return None
    k = Kind(kind)
    p = {IPPROTO_TCP: Proto.TCP, IPPROTO_UDP: Proto.UDP}.get(proto)
    local: IPAddress = IPv4Address(struct.pack("<I", saddr4)) if family == AF_INET else IPv6Address(saddr6)
    addr, port, scope = _sockaddr(sockaddr)
    if k is Kind.LISTEN:
        addr, port, scope = local, num, 0
    return TraceEvent(
        kind=k,
        errno=err,
        pid=tgid,
        tid=tid,
        comm=_cstr(comm),
        cgroup_id=cgroup,
        netns=netns,
        family=family,
        proto=p,
        fd=fd,
        addr=addr,
        port=port,
        scope_id=scope,
        local_addr=local,
        local_port=num,
        reuseaddr=_bits(flags, bits["skc_reuse"]) != 0,
        reuseport=_bits(flags, bits["skc_reuseport"]) != 0,
        v6only=_bits(flags, bits["skc_ipv6only"]) != 0,
        bound_dev_if=dev,
        uid=uid,
        inode=ino,
        arg=arg,
        mono_ns=mono,
    )
