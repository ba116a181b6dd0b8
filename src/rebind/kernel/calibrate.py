"""Rules that differ between builds of one kernel version, decided by experiment.

The UDP early stop (bind-rules.md §7): upstream ``udp_lib_lport_inuse()`` returns "free" at the
first same-uid SO_REUSEPORT socket in the port's hash chain; some 6.18.44 builds check every
socket. The experiment: in a throwaway network namespace, bind UDP ``127.0.0.1`` plain, then
``127.0.0.2`` with SO_REUSEPORT (now first in the chain), then ``0.0.0.0`` with SO_REUSEPORT:
ok means the early stop, EADDRINUSE means every socket is checked.

The namespace belongs to a short-lived thread (``unshare(CLONE_NEWNET)`` acts on the calling
thread) and dies with it: the host's sockets, ports and bucket caches are never touched. The
answer is cached per kernel build (``/proc/sys/kernel/osrelease`` + a hash of ``/proc/version``)
in a root-owned directory (``/var/cache/rebind``) or, for other users, ``$XDG_CACHE_HOME/rebind``;
files are created with O_EXCL|O_NOFOLLOW and renamed into place, and read back only when they are
regular files owned by us or root in a directory nobody else may write. Without the privilege to
create a network namespace (and no cache), the rule stays unknown (None): the model then reports
DEPENDS wherever the builds differ.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
from dataclasses import dataclass

from rebind.errors import RebindError

#: Bump when an experiment changes: older cache files are then ignored.
FORMAT = 1
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
_MAX_FILE = 4096


@dataclass(frozen=True, slots=True)
class Calibration:
    """The calibrated rules of one kernel build; None = not known."""

    udp_first_match: bool | None = None

    @property
    def known(self) -> bool:
        return self.udp_first_match is not None


def build_key(root: str = "/proc") -> str:
    """``<osrelease>-<sha256(/proc/version)[:16]>``: two builds of one release differ in it."""
    try:
        with open(f"{root}/sys/kernel/osrelease", "rb") as f:
            release = f.read(256).strip()
        with open(f"{root}/version", "rb") as f:
            version = f.read(4096)
    except OSError:
        return ""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in release.decode("ascii", "replace"))
    return f"{safe[:64]}-{_sha256_hex(version)[:16]}"


def _sha256_hex(data: bytes) -> str:
    """sha256 by the interpreter's own module where it has one: importing hashlib loads OpenSSL,
    ~2.5 ms of every `rebind why` for one digest of /proc/version."""
    import importlib

    for name in ("_sha256", "_sha2", "hashlib"):  # CPython 3.11, 3.12 on, anything else
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "sha256"):
            digest: str = module.sha256(data).hexdigest()
            return digest
    raise ImportError("no sha256")  # hashlib always has it


# --------------------------------------------------------------------------------------------
# The experiments (in their own network namespace).


def _udp_first_match() -> bool | None:
    """Run in a fresh netns (this thread's): True = early stop, False = every socket checked."""
    socks: list[socket.socket] = []
    try:
        port = 0
        plan = (("127.0.0.1", False), ("127.0.0.2", True), ("0.0.0.0", True))
        results: list[int | None] = []
        for addr, reuseport in plan:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            socks.append(s)
            if reuseport:
                s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            try:
                s.bind((addr, port))
                results.append(None)
            except OSError as exc:
                results.append(exc.errno)
            if port == 0:
                port = s.getsockname()[1]
        if results[:2] != [None, None] or results[2] not in (None, errno.EADDRINUSE):
            return None  # the setup itself failed: no answer rather than a wrong one
        return results[2] is None
    finally:
        for s in socks:
            s.close()


def _in_private_netns() -> Calibration:
    """Unshare this thread into a new network namespace (lo up) and run every experiment."""
    from rebind.kernel.netns import link_up, unshare_net

    unshare_net()
    link_up()
    return Calibration(udp_first_match=_udp_first_match())


def run_experiments() -> Calibration | None:
    """The experiments in a throwaway thread and namespace; None when no namespace can be made."""
    box: list[Calibration] = []

    def body() -> None:
        try:
            box.append(_in_private_netns())
        except (OSError, RebindError):
            pass  # EPERM: not privileged. The thread (and any namespace) ends here.

    t = threading.Thread(target=body, name="rebind-calibrate", daemon=True)
    t.start()
    t.join()
    return box[0] if box else None


# --------------------------------------------------------------------------------------------
# The cache.


ROOT_DIR = "/var/cache/rebind"


def cache_dir() -> str:
    if os.geteuid() == 0:
        return ROOT_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rebind")


def _trusted_dir(path: str) -> bool:
    """Owned by us or root, a real directory (no symlink), writable by nobody else.

    (Its parents are not walked: /var/cache and $XDG_CACHE_HOME belong to root or to us.)"""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid in (0, os.geteuid())
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _ensure_dir(path: str) -> bool:
    if not os.path.lexists(path):
        try:
            os.makedirs(path, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
        except OSError:
            return False
    return _trusted_dir(path)


def _file_for(directory: str, key: str) -> str:
    return os.path.join(directory, f"calibration-{key}.json")


def read_cached(key: str, directory: str | None = None) -> Calibration | None:
    """The cached calibration for this build, or None (missing, malformed or untrusted)."""
    d = directory or cache_dir()
    if not key or not _trusted_dir(d):
        return None
    try:
        fd = os.open(_file_for(d, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_size > _MAX_FILE:
            return None
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        raw = os.read(fd, _MAX_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _parse(raw, key)


def _parse(raw: bytes, key: str) -> Calibration | None:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or set(doc) != {"format", "build", "udp_first_match"}:
        return None
    if doc["format"] != FORMAT or doc["build"] != key:
        return None
    udp = doc["udp_first_match"]
    if not isinstance(udp, bool):
        return None
    return Calibration(udp_first_match=udp)


def write_cached(key: str, cal: Calibration, directory: str | None = None) -> bool:
    """Write atomically: a new file (O_EXCL|O_NOFOLLOW, mode 0644) renamed over the old one."""
    d = directory or cache_dir()
    if not key or not cal.known or not _ensure_dir(d):
        return False
    body = json.dumps({"format": FORMAT, "build": key, "udp_first_match": cal.udp_first_match}).encode()
    tmp = os.path.join(d, f".calibration-{key}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, _file_for(d, key))
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


_lock = threading.Lock()
_memo: dict[str, Calibration] = {}


def calibration(*, directory: str | None = None, run: bool = True) -> Calibration:
    """This kernel build's calibration: memory, then the cache file, then the experiment.

    Never raises; ``Calibration()`` (all unknown) when nothing could decide.
    """
    key = build_key()
    with _lock:
        if key in _memo:
            return _memo[key]
        cal = read_cached(key, directory)
        if cal is None and directory is None and os.geteuid() != 0:
            cal = read_cached(key, ROOT_DIR)  # root's answer is trusted (root-owned files only)
        if cal is None and run:
            cal = run_experiments()
            if cal is not None and cal.known:
                write_cached(key, cal, directory)
        cal = cal or Calibration()
        # Unknown too: a process that could not make a namespace will not be able to later
        # (and the exporter asks on every scrape).
        _memo[key] = cal
        return cal
