"""Every network namespace on the host, and the sockets in each.

A network namespace has no global list in the kernel's user API: it is reachable through a
process that lives in it (``/proc/PID/ns/net``), through an nsfs bind mount that keeps it alive
with no process at all (``ip netns add`` → ``/run/netns/NAME``; Docker → ``/run/docker/netns/ID``;
Podman → ``/run/netns/netns-UUID``), or through a socket created in it and held by a process
that lives elsewhere (passed by SCM_RIGHTS: the socket's reference keeps its namespace alive,
sk->sk_net). We collect all three and deduplicate by (device, inode) — the namespace's identity,
the number ``ls -l /proc/PID/ns/net`` shows. The third needs root: each socket fd is copied with
pidfd_getfd (Linux 5.6) and asked ``ioctl(SIOCGSKNS)`` (Linux 4.9), which returns an fd of the
socket's namespace; that fd is what we then enter. It costs a readlink per fd and a copy per
distinct socket (measured here: about 6 s for 200,000 socket fds, well under 0.1 s for the few
thousand of a usual host); a BPF iterator reading sk->sk_net would make it one pass.

Reading a namespace's sockets: ``setns(fd, CLONE_NEWNET)`` acts on the calling *thread*, so each
namespace is read by a short-lived worker thread that enters it, opens its own NETLINK_SOCK_DIAG
socket there (a netlink socket answers for the namespace it was created in) and exits; the main
thread never changes namespace. ``setns`` needs CAP_SYS_ADMIN over the namespace's user namespace:
without it, ``/proc/PID/net/{tcp,udp}*`` of a readable process in that namespace gives the
listening and connected sockets (not bound-inactive ones), and what stays hidden is reported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from rebind.errors import EnvironmentProblem
from rebind.model.query import SocketQuery
from rebind.model.records import SocketRecord, State

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: ioctl(fd, NS_GET_NSTYPE) on an nsfs fd returns its CLONE_NEW* type (Linux 4.11+): an nsfs mount
#: may hold any kind of namespace (mnt, uts, ...), and only network ones matter here.
NS_GET_NSTYPE = 0xB703
#: Where engines and iproute2 keep their nsfs mounts; the names under /run/netns are user-chosen.
NAMED_DIRS = ("/run/netns", "/var/run/netns")
#: ioctl(socket fd, SIOCGSKNS): an fd of the socket's network namespace (sock_ioctl, Linux 4.9;
#: needs CAP_NET_ADMIN over that namespace's user namespace).
SIOCGSKNS = 0x894C


@dataclass(frozen=True, slots=True)
class Netns:
    """One network namespace and a way to enter it."""

    inode: int
    dev: int
    #: The name under /run/netns, or the engine's sandbox id (``docker:3d6a…``), or None.
    name: str | None
    #: A path that opens it: an nsfs mount, or /proc/PID/ns/net of a process living in it.
    path: str
    #: The pid behind ``path`` (None for a mount): checked again after opening (pid reuse).
    pid: int | None = None
    #: How many processes we saw in it (0: kept alive by a mount or a socket only).
    processes: int = 0
    #: Found only through a socket held from another namespace (``path`` is our fd of it).
    via_socket: bool = False


@dataclass(frozen=True, slots=True)
class NetnsScan:
    namespaces: tuple[Netns, ...]
    #: Processes whose namespace link we could not read (EACCES as non-root): their namespaces
    #: may be missing from the list.
    unreadable: int = 0
    #: The namespace rebind itself runs in.
    own: int | None = None
    #: Our fds of the namespaces found through sockets: closed by :meth:`close`.
    held: tuple[int, ...] = ()

    def close(self) -> None:
        for fd in self.held:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> NetnsScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class NetnsRecords:
    netns: Netns
    records: tuple[SocketRecord, ...]
    source: str  # "netlink" (setns) or "procfs" (/proc/PID/net, partial) or "none"
    warnings: tuple[str, ...] = field(default=())


def _unescape_mountinfo(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal (show_mountinfo)."""
    out, i = [], 0
    while i < len(field_text):
        code = field_text[i + 1 : i + 4]
        if field_text[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def nsfs_mounts(mountinfo: str) -> list[str]:
    """Mount points of every nsfs mount in a mountinfo text (fields: ... mountpoint ... - fstype)."""
    points = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("nsfs "):
            continue
        fields = left.split()
        if len(fields) >= 5:
            points.append(_unescape_mountinfo(fields[4]))
    return points


def _name_for(path: str) -> str | None:
    parent, _, base = path.rstrip("/").rpartition("/")
    if parent in NAMED_DIRS:
        return base
    if parent.endswith("/netns") and "docker" in parent:
        return f"docker:{base}"
    return None


def _is_netns_fd(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def list_namespaces(proc: str = "/proc", *, sockets: bool = True) -> NetnsScan:
    """Every network namespace reachable from processes, nsfs mounts and (as root, with
    ``sockets``) sockets held across namespaces, deduplicated. Call ``close()`` on the result
    when done with it (it may hold namespace fds)."""
    found: dict[tuple[int, int], Netns] = {}
    counts: dict[tuple[int, int], int] = {}
    unreadable = 0
    try:
        own_st = os.stat(f"{proc}/thread-self/ns/net")
        own: int | None = own_st.st_ino
    except OSError:
        own = None
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        path = f"{proc}/{entry.name}/ns/net"
        try:
            st = os.stat(path)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:  # vanished, or a kernel thread with no ns link
            continue
        key = (st.st_dev, st.st_ino)
        counts[key] = counts.get(key, 0) + 1
        if key not in found:
            found[key] = Netns(st.st_ino, st.st_dev, None, path, int(entry.name))
    try:
        with open(f"{proc}/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            points = nsfs_mounts(fh.read())
    except OSError:
        points = []
    for point in points:
        try:
            fd = os.open(point, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not _is_netns_fd(fd):
                continue
            st = os.fstat(fd)
        finally:
            os.close(fd)
        key = (st.st_dev, st.st_ino)
        name = _name_for(point)
        old = found.get(key)
        # A mount is the better handle (no pid to reuse); keep the first name seen.
        if old is None or old.pid is not None:
            found[key] = Netns(st.st_ino, st.st_dev, name or (old.name if old else None), point, None)
    held: list[int] = []
    if sockets and proc == "/proc" and os.geteuid() == 0:
        for key, fd in socket_namespaces(set(found), proc).items():
            held.append(fd)
            found[key] = Netns(key[1], key[0], None, f"/proc/self/fd/{fd}", None, via_socket=True)
    spaces = tuple(
        Netns(n.inode, n.dev, n.name, n.path, n.pid, counts.get((n.dev, n.inode), 0), n.via_socket)
        for n in sorted(found.values(), key=lambda n: (n.inode != own, n.inode))
    )
    return NetnsScan(spaces, unreadable=unreadable, own=own, held=tuple(held))


def socket_namespaces(known: set[tuple[int, int]], proc: str = "/proc") -> dict[tuple[int, int], int]:
    """Namespaces not in ``known`` that a socket held by some process belongs to: (dev, inode) ->
    an fd of it, ours to close. Each socket inode is asked once; processes that vanish or refuse
    (pidfd_getfd needs ptrace access) are skipped."""
    from rebind.kernel import pidfd
    from rebind.kernel.procfs import ProcFS

    out: dict[tuple[int, int], int] = {}
    seen: set[int] = set()
    procfs = ProcFS(proc)
    for pid in procfs.pids():
        fds = procfs.socket_fds(pid).fds  # what could be read: a refused table holds nothing we can dup
        pfd: int | None = None
        try:
            for fd, inode in fds.items():
                if inode in seen:
                    continue
                seen.add(inode)
                if pfd is None:
                    pfd = pidfd.pin(pid)
                    if pfd is None:
                        break  # exited
                key_fd = _socket_netns(pfd, fd)
                if key_fd is None:
                    continue
                key, nsfd = key_fd
                if key in known or key in out:
                    os.close(nsfd)
                else:
                    out[key] = nsfd
        except OSError:
            continue  # pidfd_open refused or the process is gone
        finally:
            if pfd is not None:
                os.close(pfd)
    return out


def _socket_netns(pfd: int, fd: int) -> tuple[tuple[int, int], int] | None:
    """((dev, inode), fd) of the network namespace of another process's socket fd, or None."""
    from rebind.kernel import pidfd

    try:
        dup = pidfd.getfd(pfd, fd)
    except OSError:
        return None  # closed meanwhile, or no ptrace access
    try:
        nsfd = fcntl.ioctl(dup, SIOCGSKNS)
    except OSError:
        return None  # not a socket any more (the fd number was reused), or not permitted
    finally:
        pidfd.close_dup(dup)
    try:
        st = os.fstat(nsfd)
    except OSError:
        os.close(nsfd)
        return None
    os.set_inheritable(nsfd, False)
    return (st.st_dev, st.st_ino), nsfd


def _open_checked(ns: Netns) -> int:
    """An fd for the namespace, verified to be the one listed (a pid may have been reused)."""
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (ns.dev, ns.inode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "namespace changed since it was listed", ns.path)
    return fd


def run_in(ns: Netns, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a worker thread that has entered ``ns``; raises EnvironmentProblem
    (permission) or OSError (the namespace is gone)."""
    from rebind.kernel.procstat import libc

    fd = _open_checked(ns)
    box: dict[str, object] = {}

    def work() -> None:
        try:
            import ctypes

            if libc().setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise EnvironmentProblem(f"setns into net:[{ns.inode}]: {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    try:
        t = threading.Thread(target=work, name=f"netns-{ns.inode}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _procfs_records(ns: Netns, proc: str, query: SocketQuery) -> tuple[SocketRecord, ...]:
    """The unprivileged view: /proc/PID/net/* of a process in the namespace."""
    from dataclasses import replace

    from rebind.kernel import procnet

    if ns.pid is None:
        raise PermissionError(errno.EPERM, "a namespace kept only by a mount has no /proc view")
    recs = procnet.iter_sockets(
        protos=query.protos,
        families=query.families,
        states=query.states,
        ports=query.ports,
        root=f"{proc}/{ns.pid}",
    )
    return tuple(replace(r, netns=ns.inode) for r in recs if query.matches(r))


def records_per_netns(
    scan: NetnsScan,
    query: SocketQuery | None = None,
    *,
    ports: Iterable[int] | None = None,
    proc: str = "/proc",
) -> Iterator[NetnsRecords]:
    """The sockets of every namespace in ``scan``: netlink through setns where permitted, else the
    partial /proc view, else nothing (with a warning naming the namespace). The query's own
    ``netns`` is not used: every namespace of ``scan`` is read."""
    from dataclasses import replace

    from rebind.kernel.walk import walk

    if query is None:
        query = SocketQuery.create(ports=ports, states=list(State))
    q = replace(query, netns=None) if query.netns is not None else query

    # The one walker, netlink only, from a thread that entered the namespace: never /proc/net
    # there (it shows the namespace of the thread group leader, not the thread's).
    def dump() -> tuple[SocketRecord, ...]:
        return tuple(walk(q, netlink_only=True).records)

    for ns in scan.namespaces:
        try:
            yield NetnsRecords(ns, run_in(ns, dump) if ns.inode != scan.own else dump(), "netlink")
            continue
        except FileNotFoundError:
            continue  # the namespace died since it was listed: nothing holds a port there now
        except (EnvironmentProblem, PermissionError, OSError) as exc:
            reason = str(exc)
        try:
            recs = _procfs_records(ns, proc, q)
        except OSError:
            yield NetnsRecords(ns, (), "none", (f"net:[{ns.inode}] could not be read ({reason})",))
            continue
        yield NetnsRecords(
            ns,
            recs,
            "procfs",
            (f"net:[{ns.inode}] read through /proc/{ns.pid}/net: bound-inactive sockets are not shown",),
        )
