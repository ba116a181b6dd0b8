"""Who a process really is, and which paths only root controls: the kernel's word, never the
process's own (issue 18).

* a process is its real uid (all four ``Uid:`` fields of /proc/PID/status, not the owner of
  /proc/PID, which a setuid program started by anyone makes root) and its executable
  (``/proc/PID/exe``: a root-owned file nobody else may write, named as the engine's program),
  never its comm or argv[0];
* a socket or state file is believed only when every directory above it is root's (or the
  user's own) and writable by nobody else.
"""

from __future__ import annotations

import contextlib
import os
import stat

from rebind.model.containers import ProxyKind

#: The program names of the engines' port-holding processes, as the kernel knows their
#: executable (``/proc/PID/exe``), never as the process calls itself (comm, argv[0]).
ENGINE_EXES: dict[ProxyKind, frozenset[str]] = {
    ProxyKind.DOCKERD: frozenset({"dockerd"}),
    ProxyKind.DOCKER_PROXY: frozenset({"docker-proxy"}),
    ProxyKind.CONMON: frozenset({"conmon"}),
    # podman 4 ships /usr/lib/podman/rootlessport; podman 3 re-executed itself under that name.
    ProxyKind.ROOTLESSPORT: frozenset({"rootlessport", "podman"}),
    ProxyKind.PASTA: frozenset({"pasta", "pasta.avx2"}),
    ProxyKind.SLIRP4NETNS: frozenset({"slirp4netns"}),
}


def real_uid(pid: int, proc: str = "/proc") -> int | None:
    """The uid of a process when its real, effective, saved and filesystem uids all agree
    (``Uid:`` of /proc/PID/status), else None. The owner of /proc/PID is the *effective* uid, so
    a setuid-root program started by any user looks like root there; its real uid does not."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as fh:
            text = fh.read(8192)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            ids = set(line.split()[1:])
            if len(ids) == 1:
                with contextlib.suppress(ValueError):
                    return int(ids.pop())
            return None
    return None


def root_owned_exe(pid: int, proc: str = "/proc") -> str | None:
    """The basename of a process's executable when the kernel's link (/proc/PID/exe) leads to a
    regular file owned by root and writable by nobody else, else None. Unlike comm and argv[0],
    which the process picks, this is the file the kernel executed: a symlink named ``dockerd``
    to /usr/bin/su shows here as ``su``."""
    try:
        target = os.readlink(f"{proc}/{pid}/exe")
        st = os.stat(f"{proc}/{pid}/exe")  # follows the kernel's link to the very inode
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return None
    # A binary replaced by a package upgrade while running reads "/usr/bin/x (deleted)".
    return target.removesuffix(" (deleted)").rsplit("/", 1)[-1]


def is_engine_process(pid: int, kind: ProxyKind, uid: int, proc: str = "/proc") -> bool:
    """Is ``pid`` the engine program ``kind`` (by its executable) running wholly as ``uid``?"""
    return real_uid(pid, proc) == uid and root_owned_exe(pid, proc) in ENGINE_EXES[kind]


def root_only_path(path: str) -> str | None:
    """Why an API socket path is not one only root controls, or None when it is.

    Every directory from / down must be root's and not writable by group or others (a
    root-owned sticky directory such as /tmp is allowed: nobody else may rename or remove root's
    entries in it), and the socket itself root's. The socket's own mode only says who may
    connect (Docker's is 0660 root:docker), not who serves it, so it is not judged.
    """
    if not os.path.isabs(path):
        return "not an absolute path"
    parts = [p for p in path.split("/") if p]
    at = "/"
    for i, part in enumerate(["", *parts]):
        at = os.path.join(at, part) if part else "/"
        try:
            st = os.lstat(at)
        except OSError as exc:
            return f"{at}: {exc.strerror}"
        last = i == len(parts)
        if st.st_uid != 0:
            return f"{at} is owned by uid {st.st_uid}, not root"
        if last:
            return None if stat.S_ISSOCK(st.st_mode) else f"{at} is not a socket"
        if not stat.S_ISDIR(st.st_mode):
            return f"{at} is not a directory"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{at} is writable by group or others"
    return None


def root_only_path_file(path: str) -> str | None:
    """As root_only_path, for a regular file (a root engine's state file)."""
    parent, _, _base = path.rpartition("/")
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return f"{path} is not a root-owned regular file"
    why = dirs_owned_by(parent or "/", 0)
    return why


def dirs_owned_by(path: str, uid: int) -> str | None:
    """Every directory from / to ``path``: owned by root or ``uid``, and writable by nobody else
    (a root-owned sticky directory such as /tmp excepted: others cannot rename its entries)."""
    at = "/"
    for part in ["", *(p for p in path.split("/") if p)]:
        at = os.path.join(at, part) if part else "/"
        try:
            st = os.lstat(at)
        except OSError as exc:
            return f"{at}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{at} is not a directory"
        if st.st_uid not in (0, uid):
            return f"{at} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
            return f"{at} is writable by group or others"
    return None
