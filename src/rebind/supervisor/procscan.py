"""Is a process tree *serving* a listening socket? Read from /proc, never by connecting.

A connect() to the port proves nothing while the supervisor holds the socket: the kernel
completes the handshake into the socket's accept queue whoever (if anyone) will accept it. What
does prove it is a process of the new generation waiting for connections on that socket:

* its epoll set watches the socket for input: /proc/PID/fdinfo/EPFD lists ``tfd: N events: M ...
  ino:HEX`` per watched file (fs/eventpoll.c ep_show_fdinfo), ``ino`` identifies the socket;
* a thread is blocked in accept()/accept4() on it (recvfrom()/recvmsg() for UDP), or in
  poll()/ppoll()/select()/pselect6() with it in the set: /proc/PID/task/TID/syscall gives the
  syscall number and arguments, and the pollfd array or fd_set is read from /proc/PID/mem (we are
  its ancestor, so ptrace access holds);
* it holds a connection it accepted from it: a TCP socket in /proc/net/tcp{,6}, not listening,
  with the listener's local port. A saturated blocking server is almost never *in* accept() when
  sampled (issue 13: ready after 0.19-29.3 s, twice killed as not ready within 30 s), but it
  always holds the connection it is answering. Only accept() creates such a socket in a new
  generation: it inherits the listening sockets and nothing else (everything of ours is CLOEXEC).
"""

from __future__ import annotations

import os
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from rebind.kernel.procfs import ProcFS
from rebind.kernel.procstat import PPID, stat_field

#: The supervisor reads its own children: always the live /proc.
_PROC = ProcFS()
EPOLLIN = 0x1
POLLIN = 0x1
_MAX_POLLFDS = 4096

# Syscall numbers differ per architecture (arch/*/entry/syscalls); aarch64 has no poll/select.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "accept": 43, "accept4": 288, "poll": 7, "ppoll": 271, "select": 23, "pselect6": 270,
        "recvfrom": 45, "recvmsg": 47,
    },
    "aarch64": {
        "accept": 202, "accept4": 242, "ppoll": 73, "pselect6": 72, "recvfrom": 207, "recvmsg": 212,
    },
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Serving:
    pid: int
    how: str  # "epoll", "accept", "poll", "select", "recv", "accepted"

    def __str__(self) -> str:
        if self.how == "accepted":
            return f"pid {self.pid} serves a connection it accepted"
        return f"pid {self.pid} waits for connections ({self.how})"


def _numbers() -> dict[int, str]:
    table = _SYSCALLS.get(platform.machine(), {})
    return {nr: name for name, nr in table.items()}


_BY_NR = _numbers()


def read_ppid(pid: int) -> int | None:
    return stat_field(pid, PPID, _PROC.root)


def in_tree(pid: int, root: int) -> bool:
    """True when PID is ROOT or descends from it (walks the ppid chain)."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        parent = read_ppid(pid)
        if parent is None:
            return False
        pid, seen = parent, seen + 1
    return pid == root


def _children(pid: int) -> list[int] | None:
    """Children from /proc/PID/task/*/children (CONFIG_PROC_CHILDREN); None if unavailable."""
    out: list[int] = []
    try:
        tids = os.listdir(_PROC.path(pid, "task"))
    except OSError:
        return []
    for tid in tids:
        try:
            with open(_PROC.path(pid, "task", tid, "children")) as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return out


def process_tree(root: int) -> list[int]:
    """ROOT and its descendants."""
    out, todo = [], [root]
    by_parent: dict[int, list[int]] | None = None
    while todo:
        pid = todo.pop()
        out.append(pid)
        kids = _children(pid) if by_parent is None else None
        if kids is None:
            by_parent = by_parent or _scan_parents()
            kids = by_parent.get(pid, [])
        todo.extend(kids)
    return out


def _scan_parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid in _PROC.pids():
        ppid = read_ppid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    return children


def socket_fds(pid: int, inodes: frozenset[int]) -> dict[int, int]:
    """fd -> inode for the fds of PID that refer to one of INODES."""
    return {fd: ino for fd, ino in _PROC.socket_fds(pid).fds.items() if ino in inodes}


def epoll_watches(pid: int) -> set[int]:
    """Inodes that an epoll instance of PID watches for input."""
    watched: set[int] = set()
    links, _read = _PROC.fd_links(pid)
    for fd, link in links.items():
        if link != "anon_inode:[eventpoll]":
            continue
        try:
            with open(_PROC.path(pid, "fdinfo", str(fd))) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        watched.update(_parse_epoll_fdinfo(lines))
    return watched


def _parse_epoll_fdinfo(lines: Iterable[str]) -> set[int]:
    out: set[int] = set()
    for line in lines:
        if not line.startswith("tfd:"):
            continue
        parts = line.split()
        try:
            events = int(parts[parts.index("events:") + 1], 16)
            ino = next(int(p[4:], 16) for p in parts if p.startswith("ino:"))
        except (ValueError, StopIteration, IndexError):
            continue
        if events & EPOLLIN:
            out.add(ino)
    return out


def _read_syscall(pid: int, tid: str) -> tuple[int, list[int]] | None:
    try:
        with open(_PROC.path(pid, "task", tid, "syscall")) as f:
            parts = f.read().split()
    except OSError:
        return None
    if len(parts) < 7 or parts[0] in ("running", "-1"):
        return None
    return int(parts[0]), [int(p, 16) for p in parts[1:7]]


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    try:
        fd = os.open(_PROC.path(pid, "mem"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, addr)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _waited_fds(pid: int, name: str, args: list[int]) -> set[int]:
    if name in ("accept", "accept4", "recvfrom", "recvmsg"):
        return {args[0]}
    if name in ("poll", "ppoll"):
        nfds = min(args[1], _MAX_POLLFDS)
        raw = _read_mem(pid, args[0], nfds * 8)
        entries = [struct.unpack_from("ihh", raw, i * 8) for i in range(len(raw) // 8)]
        return {fd for fd, events, _ in entries if events & POLLIN}
    if name in ("select", "pselect6"):
        nfds = min(args[0], 1024)
        raw = _read_mem(pid, args[1], (nfds + 7) // 8) if args[1] else b""
        return {i for i in range(min(nfds, len(raw) * 8)) if raw[i // 8] >> (i % 8) & 1}
    return set()


def blocked_waiting(pid: int) -> dict[int, str]:
    """fd -> how a thread of PID is blocked waiting for input on it right now."""
    out: dict[int, str] = {}
    try:
        tids = os.listdir(_PROC.path(pid, "task"))
    except OSError:
        return out
    for tid in tids:
        call = _read_syscall(pid, tid)
        if call is None or call[0] not in _BY_NR:
            continue
        name = _BY_NR[call[0]]
        fds = _waited_fds(pid, name, call[1])
        # Re-read: the thread may have left the call while we read its memory.
        if fds and _read_syscall(pid, tid) == call:
            how = _HOW[name]
            out.update((fd, how) for fd in fds)
    return out


_HOW = {"accept": "accept", "accept4": "accept", "poll": "poll", "ppoll": "poll"}
_HOW |= {"select": "select", "pselect6": "select", "recvfrom": "recv", "recvmsg": "recv"}


def connections_by_port(ports: Iterable[int]) -> dict[int, int]:
    """inode -> local port of every TCP socket that is not listening, on one of PORTS.

    One walk (kernel/walk.py), filtered by port and state in the kernel over inet_diag: under
    load /proc/net/tcp lists every TIME_WAIT socket of the port (tens of thousands), read at
    every scan; /proc only where inet_diag is missing."""
    from rebind.errors import RebindError
    from rebind.kernel.walk import walk
    from rebind.model.query import SocketQuery
    from rebind.model.records import Proto, State

    wanted = set(ports)
    if not wanted:
        return {}
    states = frozenset(State) - {State.LISTEN, State.TIME_WAIT, State.CLOSE, State.SYN_RECV}
    try:
        recs = walk(SocketQuery.create(ports=wanted, protos=[Proto.TCP], states=states)).records
        return {r.inode: r.local.port for r in recs if r.inode}
    except (OSError, ValueError, RebindError):  # EMFILE, or a port that is not one
        return {}


def serving(root: int, inodes: frozenset[int], tcp_ports: dict[int, int] | None = None) -> dict[int, Serving]:
    """inode -> who in ROOT's process tree serves it (only served ones).

    TCP_PORTS (listening inode -> port) enables the "holds a connection it accepted" proof."""
    found: dict[int, Serving] = {}
    tree = process_tree(root)
    holders: list[tuple[int, dict[int, int]]] = []
    for pid in tree:
        fds = socket_fds(pid, inodes)
        if not fds:
            continue
        holders.append((pid, fds))
        for ino in epoll_watches(pid) & set(fds.values()):
            found.setdefault(ino, Serving(pid, "epoll"))
        if set(fds.values()) - set(found):
            for fd, how in blocked_waiting(pid).items():
                if fd in fds:
                    found.setdefault(fds[fd], Serving(pid, how))
        if len(found) == len(inodes):
            return found
    if tcp_ports and holders:
        _accepted(holders, {i: p for i, p in tcp_ports.items() if i not in found}, found)
    return found


def _accepted(
    holders: list[tuple[int, dict[int, int]]], ports: dict[int, int], found: dict[int, Serving]
) -> None:
    """Listeners still unproven: does a holder of one hold a connection on its port?"""
    if not ports:
        return
    conns = connections_by_port(ports.values())
    if not conns:
        return
    for pid, fds in holders:
        held_ports = {conns[i] for i in _PROC.socket_fds(pid).inodes() if i in conns}
        for ino in set(fds.values()):
            if ino in ports and ports[ino] in held_ports:
                found.setdefault(ino, Serving(pid, "accepted"))
