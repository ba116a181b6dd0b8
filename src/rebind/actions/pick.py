"""Pick a port that is bindable now and that outgoing connections will not take.

Three things keep a picked port from being taken between "pick" and the app's bind():

* **Outside the ephemeral range.** connect() and bind(port 0) choose from ip_local_port_range
  and skip ip_local_reserved_ports (inet_csk_find_open_port, __inet_hash_connect), so a port
  outside the first or inside the second is never handed out automatically. When the range
  leaves no such port (``ip_local_port_range = 1024 65535`` is a common setting), the picker
  falls back to a reserved port, then to one inside the range, and says why that port is at
  risk (:class:`PortRiskWarning`, ``PickedPort.risk``) instead of failing.
* **The kernel as the lock.** Each candidate is claimed with a *plain* bind() (no
  SO_REUSEADDR): it succeeds only if no overlapping socket exists in any state, and while the
  claim is held every other picker's plain bind() of that port fails.
* **Leases.** Pickers record what they handed out in a small flock()ed file and skip ports
  leased in the last ``lease`` seconds, so two pickers that run one after the other (neither
  holding) still get different ports.

With ``hold`` the claim is kept: SO_REUSEADDR is switched on *after* the bind (the conflict
check reads the flag live, bind-rules.md 1.10 J2), the socket never listens, so an app that
binds with SO_REUSEADDR gets the port while nobody without it can. See docs/actions.md for
the trade-off.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from types import TracebackType

from rebind.actions.common import AddrLike, IPAddress, parse_addr, parse_proto
from rebind.errors import EnvironmentProblem, RebindError, UsageError
from rebind.model.conflict import KernelSettings
from rebind.model.records import Proto
from rebind.model.validate import MAX_SECONDS, parse_port, parse_seconds

#: Below this sit well-known and commonly configured service ports (3306, 5432, 8080, ...).
DEFAULT_RANGE = (10000, 65535)
#: How long a picked port stays off-limits to other pickers (seconds).
LEASE_SECONDS = 30.0
LEASE_ENV = "REBIND_PICK_LEASES"
IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)


class NoPortFree(RebindError):
    """Every candidate port is busy or leased (exit 1: a normal, scriptable "no")."""

    @property
    def exit_code(self) -> int:
        return 1


class PortRiskWarning(UserWarning):
    """The picked port is not safe from automatic use: no safe port was left in the range."""


@dataclass(frozen=True, slots=True)
class PickedPort:
    """A picked port; with ``hold``, the bound (not listening) sockets that reserve it."""

    port: int
    protos: tuple[Proto, ...]
    sockets: tuple[socket.socket, ...] = ()
    #: None for a port outside ip_local_port_range and ip_local_reserved_ports; otherwise why
    #: the port is at risk (it came from a fallback tier, see pick_port).
    risk: str | None = None

    def release(self) -> None:
        """Close the holding sockets (a bound, never-listening socket leaves no TIME_WAIT)."""
        for s in self.sockets:
            s.close()

    def __int__(self) -> int:
        return self.port

    def __enter__(self) -> PickedPort:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def parse_range(text: str) -> tuple[int, int]:
    """``20000-21000`` (or a single port) -> (20000, 21000)."""
    lo_text, sep, hi_text = str(text).strip().partition("-")
    try:
        lo = parse_port(lo_text, what="range start")
        hi = parse_port(hi_text, what="range end") if sep else lo
    except UsageError as exc:
        raise UsageError(f"{text!r} is not a port range (e.g. 20000-21000): {exc}") from None
    return check_range((lo, hi))


def check_range(rng: object) -> tuple[int, int]:
    """A (low, high) pair of ports with low <= high; anything else is a UsageError."""
    if isinstance(rng, str | bytes) or not isinstance(rng, tuple | list) or len(rng) != 2:
        raise UsageError(f"port range {rng!r} must be a (low, high) pair of ports")
    lo = parse_port(rng[0], what="range start")
    hi = parse_port(rng[1], what="range end")
    if lo > hi:
        raise UsageError(f"port range {lo}-{hi} is empty (low > high)")
    return lo, hi


def candidates(rng: tuple[int, int], settings: KernelSettings) -> list[int]:
    """Ports in rng that autobind never hands out and that this process may bind."""
    return _tiers(rng, settings)[0][0]


def _tiers(rng: tuple[int, int], settings: KernelSettings) -> list[tuple[list[int], str | None]]:
    """Candidate ports in rng, safest first, each tier with why its ports are at risk.

    1. outside ip_local_port_range and not reserved: nothing takes them automatically;
    2. in ip_local_reserved_ports: autobind skips them too (inet_is_local_reserved_port),
       but the administrator reserved them, maybe for another service;
    3. inside ip_local_port_range: connect() or bind(port 0) may be handed the port between
       the pick and the app's bind() (__inet_hash_connect skips only ports with a bind bucket).
    """
    lo, hi = rng
    eph_lo, eph_hi = settings.ip_local_port_range
    reserved = settings.ip_local_reserved_ports
    floor = 1 if settings.cap_net_bind_service else settings.unprivileged_port_start
    ports = range(max(lo, floor), hi + 1)
    return [
        ([p for p in ports if not eph_lo <= p <= eph_hi and p not in reserved], None),
        (
            [p for p in ports if p in reserved],
            "port {port} is in net.ipv4.ip_local_reserved_ports: no outgoing connection takes it, "
            "but it may be reserved for another service (no unreserved port outside "
            f"ip_local_port_range {eph_lo}-{eph_hi} was free in {lo}-{hi})",
        ),
        (
            [p for p in ports if eph_lo <= p <= eph_hi and p not in reserved],
            f"port {{port}} is inside net.ipv4.ip_local_port_range ({eph_lo}-{eph_hi}): an outgoing "
            "connection or bind(port 0) may take it before your server binds it; bind it at once "
            "or hold it, or reserve ports with net.ipv4.ip_local_reserved_ports",
        ),
    ]


def _protos(proto: Proto | str) -> tuple[Proto, ...]:
    if isinstance(proto, str) and proto.lower() == "both":
        return (Proto.TCP, Proto.UDP)
    return (parse_proto(proto),)


def _endpoints(addr: IPAddress | None, v6only: bool | None) -> list[tuple[IPAddress, bool | None]]:
    if addr is not None:
        return [(addr, v6only if addr.version == 6 else None)]
    # No address: the port must be free for every address of both families, so that the app
    # can bind whichever it likes. [::] with v6only covers IPv6 without re-checking IPv4.
    out: list[tuple[IPAddress, bool | None]] = [(IPv4Address("0.0.0.0"), None)]
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        out.append((IPv6Address("::"), True))
    return out


def _claim(
    port: int, protos: tuple[Proto, ...], eps: list[tuple[IPAddress, bool | None]]
) -> list[socket.socket]:
    """Bind every (proto, address) plainly; [] if any of them is taken."""
    held: list[socket.socket] = []
    try:
        for proto in protos:
            kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
            for addr, v6only in eps:
                family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
                s = socket.socket(family, kind | socket.SOCK_CLOEXEC)
                held.append(s)
                if v6only is not None:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, int(v6only))
                try:
                    s.bind((str(addr), port))
                except OSError as exc:
                    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                        raise _Taken from None
                    raise UsageError(f"cannot bind {addr}: {exc.strerror}") from None
                # After the bind: an app that sets SO_REUSEADDR can now bind over this claim
                # (both flags set, ours not listening); the check reads the flag live.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException as exc:
        for s in held:
            s.close()
        if isinstance(exc, _Taken):
            return []
        raise
    return held


class _Taken(Exception):
    pass


def pick_port(
    proto: Proto | str = Proto.TCP,
    *,
    addr: AddrLike | None = None,
    port_range: tuple[int, int] | None = None,
    v6only: bool | None = None,
    hold: bool = False,
    lease: float = LEASE_SECONDS,
    settings: KernelSettings | None = None,
) -> PickedPort:
    """A port bindable now for ``proto`` ("tcp", "udp" or "both") outside the ephemeral range.

    ``addr`` None means "free on every address" (0.0.0.0 and [::]). With ``hold=True`` the
    returned object keeps SO_REUSEADDR sockets bound on the port (never listening) until
    :meth:`PickedPort.release`: bind yours with SO_REUSEADDR, then release. Concurrent pickers
    get different ports. Raises :class:`NoPortFree` when nothing in range is free,
    :class:`~rebind.errors.EnvironmentProblem` when every port in range is privileged, and
    :class:`~rebind.errors.UsageError` for bad arguments.

    When no free port in range lies outside ip_local_port_range and ip_local_reserved_ports, a
    reserved port, then one inside the ephemeral range, is returned instead; ``risk`` says why
    it is at risk and a :class:`PortRiskWarning` is issued.
    """
    from rebind.kernel.sysctl import kernel_settings

    protos = _protos(proto)
    a = parse_addr(addr)
    if v6only is not None and a is not None and a.version != 6:
        raise UsageError("v6only needs an IPv6 address (e.g. ::)")
    rng = check_range(port_range) if port_range is not None else DEFAULT_RANGE
    lease = parse_seconds(lease, what="lease", maximum=MAX_SECONDS)
    if settings is not None and not isinstance(settings, KernelSettings):
        raise UsageError(f"settings must be a KernelSettings (or None to read the host's), not {settings!r}")
    settings = settings or kernel_settings()
    tiers = _tiers(rng, settings)
    if not any(pool for pool, _ in tiers):
        # Every port in the range is privileged (the others would at least be in tier 3).
        raise EnvironmentProblem(
            f"ports {rng[0]}-{rng[1]} are below net.ipv4.ip_unprivileged_port_start "
            f"({settings.unprivileged_port_start}): binding them needs root or CAP_NET_BIND_SERVICE"
        )
    eps = _endpoints(a, v6only)
    with _leases(lease) as leased:
        for pool, risk in tiers:
            random.shuffle(pool)
            for port in pool:
                if port in leased:
                    continue
                held = _claim(port, protos, eps)
                if held:
                    leased[port] = time.time() + lease
                    if not hold:
                        for s in held:
                            s.close()
                        held = []
                    why = risk.format(port=port) if risk else None
                    if why and held and "ip_local_port_range" in why:
                        # A bound socket's bind bucket makes __inet_hash_connect skip the port.
                        why += " (held now: no outgoing connection takes it until the hold ends)"
                    picked = PickedPort(port, protos, tuple(held), why)
                    if picked.risk:
                        warnings.warn(picked.risk, PortRiskWarning, stacklevel=2)
                    return picked
    raise NoPortFree(f"no bindable port in {rng[0]}-{rng[1]} (all busy, reserved or recently picked)")


# ---------------------------------------------------------------------------------------------
# Leases


def lease_path() -> Path | None:
    """Where leases live: $REBIND_PICK_LEASES ("" disables), else a per-user runtime file."""
    env = os.environ.get(LEASE_ENV)
    if env is not None:
        return Path(env) if env else None
    uid = os.geteuid()
    if uid == 0 and os.access("/run", os.W_OK):
        return Path("/run/rebind/pick.leases")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "rebind-pick.leases"
    return Path(f"/tmp/rebind-{uid}/pick.leases")


def _open_private(path: Path) -> int:
    # A world-writable parent (/tmp) needs a private directory owned by us (no symlink games).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.parent.stat()
    if st.st_uid != os.geteuid() and path.parent.parent == Path("/tmp"):
        raise PermissionError(f"{path.parent} belongs to uid {st.st_uid}")
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


@contextlib.contextmanager
def _leases(seconds: float) -> Iterator[dict[int, float]]:
    """Active leases (port -> expiry) under an exclusive flock; changes are written back."""
    path = lease_path() if seconds > 0 else None
    fd = -1
    if path is not None:
        try:
            fd = _open_private(path)
        except OSError:
            fd = -1  # no lease file: the kernel-side claim still separates concurrent pickers
    if fd < 0:
        yield {}
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        now = time.time()
        active = {p: t for p, t in _parse(os.pread(fd, 1 << 20, 0)).items() if t > now}
        yield active
        data = "".join(f"{p} {t:.3f}\n" for p, t in sorted(active.items())).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)  # drops the flock


def _parse(raw: bytes) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in raw.decode(errors="replace").splitlines():
        parts = line.split()
        try:
            out[int(parts[0])] = float(parts[1])
        except (IndexError, ValueError):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# Holding from the CLI


def someone_else_bound(port: int, protos: tuple[Proto, ...], ours: set[int]) -> bool:
    """Is there a socket on ``port`` that is not one of ours (by inode)?"""
    from rebind.kernel.walk import records
    from rebind.model.query import SocketQuery

    return any(r.inode not in ours for r in records(SocketQuery.create(ports=[port], protos=protos)))


def hold_until(picked: PickedPort, seconds: float, poll: float = 0.1) -> None:
    """Keep the claim until ``seconds`` pass or another socket binds the port (the app arrived)."""
    ours = {os.fstat(s.fileno()).st_ino for s in picked.sockets}
    deadline = time.monotonic() + seconds
    watch = True
    try:
        while time.monotonic() < deadline:
            if watch:
                try:
                    if someone_else_bound(picked.port, picked.protos, ours):
                        break
                except (RebindError, OSError):
                    watch = False  # no sock_diag here: just hold for the full time
            time.sleep(min(poll, max(deadline - time.monotonic(), 0)))
    finally:
        picked.release()
