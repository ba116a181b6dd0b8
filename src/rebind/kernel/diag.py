"""The thin I/O loop around :mod:`rebind.kernel.diag_codec`: dump sockets, destroy one.

Dumps stream: records are yielded as each datagram is decoded, so memory stays flat however
large the socket table is. Port filters run in the kernel as inet_diag bytecode.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Iterable, Iterator

from rebind.errors import EnvironmentProblem, KernelError
from rebind.kernel import diag_codec as codec
from rebind.model.records import Family, Proto, SocketRecord, State

# Big enough for the 32 KiB skbs netlink_dump() fills; a smaller buffer would truncate messages.
RECV_SIZE = 1 << 16
_seq = itertools.count(1)


def current_netns() -> int | None:
    """Inode of this thread's network namespace (thread-self: setns() is per thread)."""
    for path in ("/proc/thread-self/ns/net", "/proc/self/ns/net"):
        try:
            return os.stat(path).st_ino
        except OSError:
            continue
    return None


def states_mask(states: Iterable[State]) -> int:
    return sum({s.bit for s in states})


class DiagSocket:
    """A NETLINK_SOCK_DIAG socket. Use as a context manager."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, codec.NETLINK_SOCK_DIAG
            )
        except OSError as exc:
            raise EnvironmentProblem(f"netlink sock_diag is unavailable: {exc.strerror}") from exc
        self._buf = bytearray(RECV_SIZE)
        self.netns = current_netns()
        # Birth certificates (kernel/birth.py): asked for in every dump when installed.
        from rebind.kernel.birth_pins import open_map

        self._storage = open_map()
        self._boot_to_epoch = (
            time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) if self._storage is not None else None
        )
        #: UDP certificates by socket cookie (kernel/birth_udp.py): read once, at the first UDP
        #: socket a dump returns while the map is pinned; None until then.
        self._udp_values: dict[int, bytes] | None = None

    def close(self) -> None:
        self._sock.close()
        if self._storage is not None:
            os.close(self._storage)
            self._storage = None

    def __enter__(self) -> DiagSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dump(
        self,
        family: Family | None,
        proto: Proto,
        states: Iterable[State],
        *,
        bytecode: bytes | None = None,
        sport: int = 0,
    ) -> Iterator[SocketRecord]:
        """Yield every socket matching ``states`` and ``bytecode``.

        ``family=None`` (TCP only) asks both families in one kernel walk (TCPDIAG_GETSOCK).
        """
        seq = next(_seq)
        mask = states_mask(states)
        if family is None:
            if proto is not Proto.TCP:
                raise ValueError("an any-family dump exists for TCP only")
            req = codec.dump_request_tcp_any_family(
                mask, bytecode=bytecode, sport=sport, seq=seq, storage_fd=self._storage
            )
        else:
            req = codec.dump_request(
                family, proto, mask, bytecode=bytecode, seq=seq, storage_fd=self._storage
            )
        udp_values = self._udp_storage() if proto is Proto.UDP else None
        self._sock.send(req)
        # Each recv() returns one skb of whole netlink messages (netlink_dump() never splits a
        # message), so decoding per datagram is safe; an error for the request arrives as
        # NLMSG_ERROR, one that ends a dump midway as the errno in NLMSG_DONE (both raised by
        # the codec).
        view = memoryview(self._buf)
        while True:
            n = self._sock.recv_into(self._buf)
            for msg in codec.iter_messages(
                view[:n],
                proto,
                netns=self.netns,
                boot_to_epoch=self._boot_to_epoch,
                storage_by_cookie=udp_values,
            ):
                if isinstance(msg, SocketRecord):
                    yield msg
                elif isinstance(msg, codec.Done):
                    return

    def _udp_storage(self) -> dict[int, bytes] | None:
        """UDP sockets' certificates by cookie, which inet_diag does not return
        (kernel/birth_udp.py): read at the first UDP dump while the map is pinned, and only in
        the namespace this socket dumps (the iterator walks this thread's)."""
        if self._storage is None:
            return None
        if self._udp_values is None:
            self._udp_values = {}
            if current_netns() == self.netns:
                from rebind.kernel import birth_udp

                self._udp_values = birth_udp.read(self._storage) or {}
        return self._udp_values

    def destroy(self, rec: SocketRecord) -> None:
        """SOCK_DESTROY one socket (tcp_abort / udp_abort). Raises KernelError with the errno."""
        seq = next(_seq)
        self._sock.send(codec.destroy_request(rec, seq=seq))
        n = self._sock.recv_into(self._buf)
        for msg in codec.iter_messages(memoryview(self._buf)[:n], rec.proto):
            if isinstance(msg, codec.Ack):
                return
        raise KernelError("SOCK_DESTROY: no acknowledgement from the kernel")


def iter_sockets(
    *,
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[Family] = (Family.INET, Family.INET6),
    states: Iterable[State] = frozenset(State),
    ports: Iterable[int] | None = None,
    port_range: tuple[int, int] | None = None,
) -> Iterator[SocketRecord]:
    """Stream sockets over netlink, filtered in the kernel by local port when ``ports`` is given."""
    bytecodes: list[bytes | None] = [None]
    plist: list[int] = []
    if ports is not None:
        plist = sorted(set(ports))
        if not plist:
            return
        step = codec.MAX_FILTER_PORTS
        bytecodes = [codec.port_filter(plist[i : i + step]) for i in range(0, len(plist), step)]
    elif port_range is not None:
        bytecodes = [codec.port_range_filter(*port_range)]
    wanted = frozenset(states)
    fams = frozenset(families)
    sport = plist[0] if ports is not None and len(plist) == 1 else 0
    with DiagSocket() as diag:
        for proto in protos:
            pstates = _proto_states(proto, wanted)
            if not pstates:
                continue
            # TCP: one walk for both families; UDP has no such request, but its table is small.
            # On a big table most of the TCP cost is the bhash2 walk for bound-inactive sockets
            # (inet_diag_dump_icsk has no port shortcut there); measured in bench/ls.py.
            plan: list[Family | None] = [None] if proto is Proto.TCP and len(fams) == 2 else [*sorted(fams)]
            for family in plan:
                for bc in bytecodes:
                    for rec in diag.dump(family, proto, pstates, bytecode=bc, sport=sport):
                        if rec.family in fams:
                            yield rec


def _proto_states(proto: Proto, wanted: frozenset[State]) -> frozenset[State]:
    if proto is Proto.TCP:
        return wanted
    # UDP sockets are CLOSE (bound) or ESTABLISHED (connected) only (udp_dump_one / udp_dump).
    # Users asking for "bound" or "listening" mean a bound UDP socket.
    out = set(wanted & {State.ESTABLISHED, State.CLOSE})
    if wanted & {State.BOUND_INACTIVE, State.LISTEN}:
        out.add(State.CLOSE)
    return frozenset(out)


def destroy(rec: SocketRecord) -> None:
    with DiagSocket() as diag:
        diag.destroy(rec)


def netlink_available() -> bool:
    if os.environ.get("REBIND_FORCE_PROCFS"):
        return False
    try:
        with DiagSocket() as diag:
            for _ in diag.dump(Family.INET, Proto.TCP, [State.LISTEN], bytecode=codec.port_filter([1])):
                pass
    except (EnvironmentProblem, KernelError, OSError) as exc:
        # Kernel quirks, both meaning "no sock_diag for this here", not "broken":
        # * ENOENT: __sock_diag_cmd() found no handler for AF_INET even after
        #   sock_load_diag_module() asked for net-pf-2-proto-6 (inet_diag not built, or modules
        #   cannot be loaded); inet_diag answers the same for a protocol whose tcp_diag/udp_diag
        #   module is missing.
        # * EPROTONOSUPPORT: netlink_create()'s answer when NETLINK_SOCK_DIAG itself is not
        #   registered (no sock_diag); socket() raises it, DiagSocket() turns it into
        #   EnvironmentProblem, and the same errno in a netlink reply is taken the same way.
        if isinstance(exc, KernelError) and exc.errno not in (errno.ENOENT, errno.EPROTONOSUPPORT):
            raise
        return False
    return True
