"""From a conflict outcome to words: what holds the port, the one-line verdict, ranked fixes.

Pure: every fact (owners, flags, process tree hints, trial results) comes in as data.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rebind.model.containers import ContainerRef, stop_command
from rebind.model.ephemeral import reserve_command
from rebind.model.records import Owner, Proto, SocketEntry, SocketRecord, State
from rebind.textsafe import visible

#: Processes that hold ports on behalf of containers or VMs (the real server is elsewhere).
CONTAINER_PROXIES = frozenset(
    {
        "docker-proxy",
        "rootlessport",
        "rootlesskit",
        "slirp4netns",
        "pasta",
        "pasta.avx2",
        "conmon",
        "containerd-shim",
        "kubectl",
        "vpnkit",
        "qemu-system-x86_64",
    }
)


#: Names kernel/containers/ believes only with proof (the process's real uid and executable,
#: and for rootless ones its user's container): a name alone proves nothing.
JUDGED_PROXY_NAMES = frozenset(
    {"docker-proxy", "dockerd", "conmon", "rootlessport", "pasta", "pasta.avx2", "slirp4netns"}
)


class HolderKind(enum.StrEnum):
    LISTENER = "listener"
    SHARED_LISTENER = "shared-listener"  # parent and forked children hold one listener
    INHERITED_LISTENER = "inherited-listener"  # the creating parent is gone, a child kept it
    CONTAINER_PROXY = "container-proxy"
    BOUND_INACTIVE = "bound-inactive"
    TIME_WAIT = "time-wait"
    ORPHAN_FIN_WAIT2 = "orphan-fin-wait2"
    CLOSING_LEFTOVER = "closing-leftover"  # CLOSE_WAIT, LAST_ACK, FIN_WAIT1, CLOSING, FIN_WAIT2
    CONNECTION = "connection"  # an accepted connection still open
    OUTGOING = "outgoing"  # a client connection whose ephemeral local port is this port
    UDP = "udp"
    PRIVILEGED_PORT = "privileged-port"  # EACCES: no socket involved
    ADDRESS_NOT_LOCAL = "address-not-local"  # EADDRNOTAVAIL: no socket involved
    ADDRESS_TENTATIVE = "address-tentative"  # EADDRNOTAVAIL: IPv6 DAD running or failed
    INVALID_ADDRESS = "invalid-address"  # EINVAL: link-local without device, mapped on v6only


#: Kinds that are not sockets at all, so there is no holder to show.
NO_SOCKET_KINDS = frozenset(
    {
        HolderKind.PRIVILEGED_PORT,
        HolderKind.ADDRESS_NOT_LOCAL,
        HolderKind.ADDRESS_TENTATIVE,
        HolderKind.INVALID_ADDRESS,
    }
)


@dataclass(frozen=True, slots=True)
class ProcessHint:
    """Process-tree facts about one owner, gathered by the I/O layer."""

    pid: int
    parent_alive: bool
    parent_holds: bool
    parent_name: str | None
    #: Process-group leader that started this process, when it is gone (orphaned worker).
    lost_group_leader: int | None = None


def classify(
    entry: SocketEntry,
    *,
    hints: Mapping[int, ProcessHint],
    listener_on_port: bool,
    ephemeral: tuple[int, int],
) -> HolderKind:
    r = entry.socket
    # o.proxy is set by the owner annotation (kernel/containers/proxies.py: a docker-proxy, dockerd or
    # conmon run by root, a rootlessport/pasta/slirp4netns with its own user's container behind
    # it). The names the annotation judges count only through it: a user's process calling itself
    # "rootlessport" is that user's process, and `free` must say so. Other proxies' names (vpnkit,
    # qemu, ...) only ever make rebind *refuse* to act.
    names = {o.name for o in entry.owners} - JUDGED_PROXY_NAMES
    if any(o.proxy is not None for o in entry.owners) or names & CONTAINER_PROXIES:
        return HolderKind.CONTAINER_PROXY
    if r.proto is Proto.UDP:
        return HolderKind.UDP
    if r.state is State.LISTEN:
        return _listener_kind(entry.owners, hints)
    if r.state is State.BOUND_INACTIVE:
        return HolderKind.BOUND_INACTIVE
    if r.is_mini:
        return HolderKind.TIME_WAIT if r.state is State.TIME_WAIT else HolderKind.ORPHAN_FIN_WAIT2
    if r.state in (State.ESTABLISHED, State.SYN_SENT) and not listener_on_port:
        lo, hi = ephemeral
        if lo <= r.local.port <= hi or r.state is State.SYN_SENT:
            return HolderKind.OUTGOING
    if r.state in (State.ESTABLISHED, State.SYN_RECV, State.NEW_SYN_RECV):
        return HolderKind.CONNECTION
    return HolderKind.CLOSING_LEFTOVER


def _listener_kind(owners: tuple[Owner, ...], hints: Mapping[int, ProcessHint]) -> HolderKind:
    pids = {o.pid for o in owners}
    if len(pids) > 1 and any(hints.get(p) and hints[p].parent_holds for p in pids):
        return HolderKind.SHARED_LISTENER
    if pids and all((h := hints.get(p)) is not None and h.lost_group_leader is not None for p in pids):
        return HolderKind.INHERITED_LISTENER
    return HolderKind.LISTENER


def describe_owner(owners: tuple[Owner, ...], limit: int = 3) -> str:
    """'python3 (pid 12, user root)' or 'python3 (pids 12, 13, 14 and 198 more; user root)'."""
    if not owners:
        return "no process (kernel-owned)"
    groups: dict[tuple[str, str | None], list[int]] = {}
    for o in owners:
        pids = groups.setdefault((o.name, o.user), [])
        if o.pid not in pids:
            pids.append(o.pid)
    parts = []
    for (name, user), pids in groups.items():
        shown = ", ".join(str(p) for p in pids[:limit])
        more = f" and {len(pids) - limit} more" if len(pids) > limit else ""
        who = f"; user {user}" if user else ""
        parts.append(f"{name} (pid{'s' if len(pids) > 1 else ''} {shown}{more}{who})")
    return ", ".join(parts[:limit]) + (
        f" and {len(parts) - limit} other programs" if len(parts) > limit else ""
    )


def kind_phrase(kind: HolderKind, rec: SocketRecord, reuseaddr: bool | None) -> str:
    flag = {True: " with SO_REUSEADDR", False: " without SO_REUSEADDR", None: ""}[reuseaddr]
    return {
        HolderKind.LISTENER: "a live listener",
        HolderKind.SHARED_LISTENER: "a listener shared by a parent and its forked children",
        HolderKind.INHERITED_LISTENER: "a listener inherited by a child whose parent has exited",
        HolderKind.CONTAINER_PROXY: "a container runtime's port proxy",
        HolderKind.BOUND_INACTIVE: "a socket that is bound but not listening",
        HolderKind.TIME_WAIT: f"TIME_WAIT left by a server{flag}",
        HolderKind.ORPHAN_FIN_WAIT2: f"an orphaned FIN_WAIT2 left by a server{flag}",
        HolderKind.CLOSING_LEFTOVER: f"a {rec.state.label} connection{flag}",
        HolderKind.CONNECTION: f"an open connection{flag}",
        HolderKind.OUTGOING: "an outgoing connection whose ephemeral local port is this port",
        HolderKind.UDP: "a bound UDP socket",
        HolderKind.PRIVILEGED_PORT: "a privileged port and no CAP_NET_BIND_SERVICE",
        HolderKind.ADDRESS_NOT_LOCAL: "the address is not on this host",
        HolderKind.ADDRESS_TENTATIVE: "the IPv6 address is not usable yet (duplicate address detection)",
        HolderKind.INVALID_ADDRESS: "the address cannot be bound as given",
    }[kind]


def fmt_seconds(ms: int, *, compact: bool = False) -> str:
    """The one duration formatter: ``9.5 s``/``41 s`` in sentences; ``compact`` for table cells
    (``9.5s``, ``41s``, ``2m03s``)."""
    ms = max(ms, 0)
    if not compact:
        s = ms / 1000
        return f"{s:.1f} s" if s < 10 else f"{round(s)} s"
    if ms < 10_000:
        return f"{ms / 1000:.1f}s"
    if ms < 120_000:
        return f"{ms // 1000}s"
    return f"{ms // 60_000}m{(ms // 1000) % 60:02d}s"


@dataclass(frozen=True, slots=True)
class Fix:
    """One way out, with its command and code where there is one."""

    title: str
    why: str
    command: str | None = None
    python: str | None = None
    c: str | None = None


def fixes_for(
    kinds: list[HolderKind],
    *,
    port: int,
    proto: Proto,
    frees_in_ms: int | None,
    old_reuseaddr: bool | None,
    pids: list[int],
    can_destroy: bool,
    new_reuseaddr: bool = False,
    holder_hidden: bool = False,
    addr: str = "",
    containers: Sequence[ContainerRef] = (),
    reserved: frozenset[int] = frozenset(),
) -> list[Fix]:
    """Ranked fixes for the blockers present: what helps now first, prevention after.

    ``reserved``: this netns's ip_local_reserved_ports now; a printed sysctl keeps them (a write
    replaces the whole list)."""
    ks = set(kinds)
    udp = " --udp" if proto is Proto.UDP else ""
    timed = ks & {HolderKind.TIME_WAIT, HolderKind.ORPHAN_FIN_WAIT2}
    live = ks - timed - {HolderKind.CLOSING_LEFTOVER}
    out = _fixes_now(ks, timed, live, port, udp, frees_in_ms, old_reuseaddr, new_reuseaddr, can_destroy)
    out += _fixes_for_holders(ks, port, udp, pids, holder_hidden, containers, reserved)
    out += _fixes_without_socket(ks, port, addr)
    if ks and ks <= NO_SOCKET_KINDS:
        return out
    out.append(
        Fix("Use another port", "One that is free now and outside the ephemeral range.", "rebind pick")
    )
    if ks & {HolderKind.LISTENER, HolderKind.SHARED_LISTENER, HolderKind.INHERITED_LISTENER}:
        out.append(
            Fix(
                "Share the port on purpose with SO_REUSEPORT (same user, both sockets)",
                "Only if you control both servers: the one holding it must set SO_REUSEPORT too. "
                "Linux has SO_REUSEPORT since 3.9: the kernel load-balances between the listeners.",
                python="s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)",
                c="setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);",
            )
        )
    out.append(
        Fix(
            "Never close the listening socket on restart",
            "A supervisor binds once and hands the socket to each new generation (LISTEN_FDS).",
            f"rebind run --listen {port} -- YOUR-SERVER",
            python=f"sock = rebind.listen('0.0.0.0', {port})  # uses LISTEN_FDS when present",
        )
    )
    return out


def _fixes_now(
    ks: set[HolderKind],
    timed: set[HolderKind],
    live: set[HolderKind],
    port: int,
    udp: str,
    frees_in_ms: int | None,
    old_reuseaddr: bool | None,
    new_reuseaddr: bool,
    can_destroy: bool,
) -> list[Fix]:
    out: list[Fix] = []
    if timed and old_reuseaddr is True and not new_reuseaddr and not live:
        out.append(
            Fix(
                "Set SO_REUSEADDR on your socket, before bind()",
                "The leftover was closed with SO_REUSEADDR set: a bind that sets it too works now "
                "(both sockets need it; neither may be listening).",
                python="s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
                c="int one = 1; setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);",
            )
        )
    if timed and not live and frees_in_ms is not None:
        out.append(
            Fix(
                f"Wait {fmt_seconds(frees_in_ms)}",
                "The leftover's own timer frees the port by itself (TIME_WAIT: TCP_TIMEWAIT_LEN; an "
                "orphaned FIN_WAIT2: net.ipv4.tcp_fin_timeout); that is when the last one expires.",
                f"rebind wait {port}{udp}",
            )
        )
    if timed:
        out.append(
            Fix(
                "Destroy the leftover sockets now",
                "SOCK_DESTROY removes TIME_WAIT entries (Linux 6.0+, needs CAP_NET_ADMIN)"
                + ("" if can_destroy else "; not permitted for you here"),
                f"rebind free {port}",
            )
        )
    if timed and old_reuseaddr is not True:
        out.append(
            Fix(
                "Set SO_REUSEADDR on the server's listening socket, before bind()",
                "A TIME_WAIT keeps the closing socket's flag: the restart binds over it only if the "
                "old socket *and* the new one set SO_REUSEADDR. Fixes every restart after the next.",
                python="s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
                c="int one = 1; setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);",
            )
        )
    return out


def _fixes_for_holders(
    ks: set[HolderKind],
    port: int,
    udp: str,
    pids: list[int],
    holder_hidden: bool,
    containers: Sequence[ContainerRef] = (),
    reserved: frozenset[int] = frozenset(),
) -> list[Fix]:
    out: list[Fix] = []
    if ks & {HolderKind.LISTENER, HolderKind.SHARED_LISTENER, HolderKind.BOUND_INACTIVE, HolderKind.UDP}:
        if holder_hidden and not pids:
            out.append(
                Fix(
                    "Stop the holder from the PID namespace it lives in",
                    "No process visible here holds the socket, although rebind read every fd as root: "
                    "it belongs to a process outside this PID namespace (a container or host sharing "
                    "this network namespace). rebind cannot signal it from here.",
                )
            )
        else:
            who = " ".join(str(p) for p in pids[:5])
            out.append(
                Fix(
                    "Stop the process holding the port",
                    "Only closing every fd that refers to the socket frees an explicitly bound port.",
                    f"rebind free {port}{udp}" + (f"   # or: kill {who}" if who else ""),
                )
            )
    if HolderKind.INHERITED_LISTENER in ks:
        out.append(
            Fix(
                "Stop the orphaned child, then mark the listener close-on-exec in the parent",
                "The child got the listening fd through fork/exec; the parent exited but the child's "
                "copy keeps the port. Python sockets are non-inheritable by default across exec, but "
                "a fork() shares them: close the listener in the child after fork.",
                f"rebind free {port}",
                python="os.set_inheritable(sock.fileno(), False)  # and sock.close() in forked children",
                c="int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);"
                "  /* or fcntl(s, F_SETFD, FD_CLOEXEC) */",
            )
        )
    if HolderKind.CONTAINER_PROXY in ks:
        for ref in containers:
            out.append(
                Fix(
                    f"Stop or re-map container {visible(ref.label)} ({ref.engine.value}"
                    + (f", rootless, user {visible(ref.user)}" if ref.user else "")
                    + f"), which publishes {port}",
                    "The process holding the port is the engine's port proxy (or a reservation "
                    "socket for its NAT rule); the server is inside the container. Killing the proxy "
                    "cuts the container off and the engine may not recreate it: stop the container, "
                    "or publish it on another host port (-p OTHER:CONTAINER_PORT).",
                    stop_command(ref),
                )
            )
        if not containers:
            out.append(
                Fix(
                    "Stop or re-map the container that publishes this port",
                    "The proxy process only forwards to a container; killing it breaks that container.",
                    f"docker ps --filter publish={port}   # or: podman ps; rebind ls --all-netns {port}",
                )
            )
    if HolderKind.OUTGOING in ks and (cmd := reserve_command(reserved, {port})) is not None:
        out.append(
            Fix(
                "Reserve the port so outgoing connections never take it",
                "Ports in ip_local_port_range are handed to connect(); reserved ports are skipped. "
                "The line keeps the ports reserved now (a write replaces the whole list).",
                cmd,
            )
        )
    return out


def _fixes_without_socket(ks: set[HolderKind], port: int, addr: str) -> list[Fix]:
    out: list[Fix] = []
    if HolderKind.PRIVILEGED_PORT in ks:
        out.append(
            Fix(
                "Give the server CAP_NET_BIND_SERVICE, or lower the privileged range",
                "Ports below net.ipv4.ip_unprivileged_port_start (per network namespace) need the "
                "capability in the namespace's user namespace.",
                "sudo setcap cap_net_bind_service=+ep /path/to/server   "
                f"# or: sysctl -w net.ipv4.ip_unprivileged_port_start={port}",
            )
        )
        out.append(
            Fix(
                "Let a privileged supervisor bind it and hand the socket over",
                "systemd socket activation or `rebind run` bind once as root; the app gets fd 3.",
                f"sudo rebind run --listen {port} -- YOUR-SERVER",
            )
        )
    if HolderKind.ADDRESS_TENTATIVE in ks:
        out.append(
            Fix(
                "Wait for duplicate address detection to finish",
                "The address becomes usable when DAD ends (IFA_F_TENTATIVE clears); a failed DAD "
                "(IFA_F_DADFAILED) needs another address. IPV6_FREEBIND binds it anyway.",
                f"rebind wait {port} --addr {addr}",
                python="s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND",
            )
        )
    if HolderKind.ADDRESS_NOT_LOCAL in ks:
        out.append(
            Fix(
                "Bind an address this host has, or the wildcard",
                "bind() accepts only local addresses unless IP_FREEBIND or net.ipv4.ip_nonlocal_bind "
                "is set (useful for an address that appears later, e.g. a VIP).",
                f"rebind why {port} --addr 0.0.0.0",
                python="s.setsockopt(socket.SOL_IP, socket.IP_FREEBIND, 1)  # if the address comes later",
            )
        )
    if HolderKind.INVALID_ADDRESS in ks:
        out.append(
            Fix(
                "Give the address as the kernel accepts it",
                "A link-local address needs its interface (scope id or SO_BINDTODEVICE); a v4-mapped "
                "address cannot be bound by an IPV6_V6ONLY socket; TCP cannot bind multicast.",
                f"rebind why {port} --addr {addr or 'fe80::1'}%IFACE",
            )
        )
    return out
