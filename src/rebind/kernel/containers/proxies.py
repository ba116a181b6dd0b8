"""Which container a port-holding proxy serves (docker-proxy, dockerd, conmon; rootless:
rootlessport, pasta, slirp4netns).

A rootless proxy serves a container only if a conmon of its own user, in its namespace, points
at that user's Podman state, which lists the container; the fix then runs as that user.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence

from rebind.kernel.containers.engines import EngineState, podman_names
from rebind.kernel.containers.trust import dirs_owned_by, is_engine_process
from rebind.model.containers import ContainerRef, Engine, ProxyInfo, ProxyKind, classify_proxy, valid_user

_ROOTLESS = frozenset({ProxyKind.ROOTLESSPORT, ProxyKind.PASTA, ProxyKind.SLIRP4NETNS})


def resolve_proxy(
    pid: int, comm: str, cmdline: tuple[str, ...], uid: int | None, engines: EngineState, proc: str = "/proc"
) -> tuple[ProxyInfo, ContainerRef | None] | None:
    """The proxy a port holder is and the container it serves, or None when it is no proxy.

    Rootful proxies (docker-proxy, dockerd, conmon) must run as root (``uid`` is the real uid)
    to be believed. Rootless ones (rootlessport, pasta, slirp4netns) run as their user, and are
    believed only with a container of that same user behind them: a conmon running wholly as
    that user (by its executable, not its name) in the proxy's network namespace, whose
    container id is listed by that user's own Podman state. A process of another user gains
    nothing by its name: it is then no proxy at all, and never names a container.
    """
    info = classify_proxy(comm, cmdline)
    if info is None:
        return None
    if info.kind not in _ROOTLESS:
        if uid != 0:
            return None
        if info.kind is ProxyKind.CONMON and info.container_id:
            return info, engines.ref(info.container_id, Engine.PODMAN).with_name(info.container_name)
        if info.kind is ProxyKind.DOCKER_PROXY and info.container_ip is not None:
            cid = engines.by_ip.get(info.container_ip)
            return info, engines.ref(cid, Engine.DOCKER) if cid else None
        return info, None
    if uid is None or not is_engine_process(pid, info.kind, uid, proc):
        return None
    served = _container_in_netns_of(pid, uid, proc)
    return (info, served) if served is not None else None


def _netns_inodes(pid: int, proc: str) -> set[int]:
    """The network namespaces a proxy works in: its main thread's (rootlessport's is the
    container's), and every namespace it holds open (pasta and slirp4netns keep the
    container's namespace fd while living in the host's)."""
    from rebind.kernel.procfs import ProcFS

    found: set[int] = set()
    with contextlib.suppress(OSError):
        found.add(os.stat(f"{proc}/{pid}/ns/net").st_ino)
    links, _read = ProcFS(proc).fd_links(pid, limit=4096)
    for link in links.values():
        if link.startswith("net:[") and link.endswith("]"):
            with contextlib.suppress(ValueError):
                found.add(int(link[5:-1]))
    return found


def _container_in_netns_of(pid: int, uid: int, proc: str) -> ContainerRef | None:
    """The container of user ``uid`` whose conmon's child lives in a network namespace of the
    proxy ``pid``; None unless the conmon and the state it points at are that user's."""
    targets = _netns_inodes(pid, proc)
    try:
        own = os.stat(f"{proc}/self/ns/net").st_ino
    except OSError:
        own = None
    targets.discard(own or -1)  # the host's namespace holds everything: no evidence
    if not targets:
        return None
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            if os.stat(f"{proc}/{entry.name}/ns/net").st_ino not in targets:
                continue
            with open(f"{proc}/{entry.name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"{proc}/{ppid}/cmdline", "rb") as fh:
                argv = tuple(a.decode("utf-8", "replace") for a in fh.read(1 << 20).split(b"\0") if a)
            with open(f"{proc}/{ppid}/comm", encoding="utf-8", errors="replace") as fh:
                comm = fh.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        parent = classify_proxy(comm, argv)
        if parent is None or parent.kind is not ProxyKind.CONMON or not parent.container_id:
            continue
        if not is_engine_process(ppid, ProxyKind.CONMON, uid, proc):
            continue
        ref = _podman_container(parent.container_id, _arg(argv, "-b", "--bundle"), uid)
        if ref is not None:
            return ref
    return None


def _arg(argv: Sequence[str], *flags: str) -> str | None:
    for i, a in enumerate(argv):
        if a in flags and i + 1 < len(argv):
            return argv[i + 1]
        for f in flags:
            if f.startswith("--") and a.startswith(f + "="):
                return a[len(f) + 1 :]
    return None


def _podman_container(cid: str, bundle: str | None, uid: int) -> ContainerRef | None:
    """The container ``cid`` as user ``uid``'s Podman records it: its bundle
    (``<graphroot>/<driver>-containers/<ID>/userdata``) and that directory's ``containers.json``
    must be owned by ``uid`` in directories nobody else may write, and list ``cid`` by name."""
    if bundle is None or not os.path.isabs(bundle):
        return None
    bundle = os.path.normpath(bundle)
    cdir, _, leaf = bundle.rpartition("/")
    store, _, idpart = cdir.rpartition("/")
    if leaf != "userdata" or idpart != cid or not store.endswith("-containers"):
        return None
    if dirs_owned_by(bundle, uid) is not None:
        return None
    state = f"{store}/containers.json"
    try:
        st = os.lstat(state)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        return None
    names = podman_names(state)
    name = names.get(cid) if names else None
    if name is None:
        return None
    user: str | None = None
    if uid != 0:
        import pwd

        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return None  # no name to run its own engine as: do not guess
        if not valid_user(user):
            return None
    return ContainerRef(Engine.PODMAN, cid, name, user)
