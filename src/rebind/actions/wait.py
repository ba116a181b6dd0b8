"""Wait until a port is bindable (trial bind) or served (something accepts connections).

wait-for-it and wait-on test *connect*: they say "free" while a TIME_WAIT still makes the
restart's bind() fail. Here "bindable" means a real bind() with the caller's options succeeds
(a probe that never listens), and progress comes from the blockers' own timers.

Each wait is one generator of steps (sleep this long, try this connect), driven by a sync or an
async loop, so both variants share every decision.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Unpack

from rebind.actions.common import AddrLike, parse_addr, parse_proto
from rebind.diagnosis import BindOptions, Diagnosis, diagnose, request_for
from rebind.errors import Fault, RebindError, UsageError
from rebind.kernel.trial import TrialResult, trial_bind
from rebind.model.conflict import BindRequest
from rebind.model.records import Proto
from rebind.model.validate import parse_port, parse_seconds

#: How often the trial bind runs: one socket() + bind() + close(), cheap enough for 10 Hz.
POLL_INTERVAL = 0.1
#: How often blockers are re-read for progress (a netlink dump of one port, no owner scan).
REFRESH_INTERVAL = 1.0
#: Addresses --until-listening tries when none is given: servers bind one family or both.
LOOPBACKS: tuple[IPv4Address | IPv6Address, ...] = (IPv4Address("127.0.0.1"), IPv6Address("::1"))

Progress = Callable[[Diagnosis, float], None]


@dataclass(frozen=True, slots=True)
class Connect:
    """A step asking the driver to try a TCP connect (:func:`accepts`) and send back the answer."""

    addr: IPv4Address | IPv6Address
    port: int


#: Each wait is a generator of steps: seconds to sleep, or a connect to try (its answer is sent in).
Steps = Generator["float | Connect", "bool | None", "WaitResult"]


#: bind() errors that can go away by themselves: a holder leaves (EADDRINUSE), or an address
#: finishes IPv6 duplicate address detection or gets configured (EADDRNOTAVAIL).
TRANSIENT_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})
#: bind() errors that mean a missing permission or kernel feature (exit 3), not bad input.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})


class NotWaitable(RebindError):
    """bind() fails for a reason that waiting cannot fix (EACCES, EINVAL, ...).

    Its fault (and the CLI's exit code) follows the errno: EACCES/EPERM or a missing address
    family is the environment's (exit 3), anything else the request's (exit 2).
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.fault = Fault.ENVIRONMENT if errno_ in _ENVIRONMENT_ERRNOS else Fault.USER


@dataclass(frozen=True, slots=True)
class WaitResult:
    ok: bool
    #: Seconds spent waiting.
    elapsed: float
    request: BindRequest | None = None
    #: The last trial bind (wait_bindable).
    trial: TrialResult | None = None
    #: On timeout: what still blocks (wait_bindable), with owners.
    diagnosis: Diagnosis | None = None
    #: The address that accepted a connection / holds a bound UDP socket (wait_listening).
    answered: IPv4Address | IPv6Address | None = None


# ---------------------------------------------------------------------------------------------
# Bindable


def wait_bindable(
    req: BindRequest | int | str,
    *,
    timeout: float | None = None,
    interval: float = POLL_INTERVAL,
    on_progress: Progress | None = None,
    **options: Unpack[BindOptions],
) -> WaitResult:
    """Block until ``req``'s bind() would succeed: a :class:`BindRequest`, or a port with the
    bind options as keywords (``addr`` default 0.0.0.0, ``proto``, ``reuseaddr``, ...).

    Returns ``ok=False`` with the remaining blockers after ``timeout`` seconds. Raises
    :class:`NotWaitable` when bind() fails for a reason time cannot fix (e.g. EACCES).
    ``on_progress(diagnosis, elapsed)`` is called about once a second while blocked;
    ``diagnosis.frees_in_ms`` says when the last timed blocker (TIME_WAIT) expires.
    """
    return _run(_bindable(req, timeout, interval, on_progress, options))


async def wait_bindable_async(
    req: BindRequest | int | str,
    *,
    timeout: float | None = None,
    interval: float = POLL_INTERVAL,
    on_progress: Progress | None = None,
    **options: Unpack[BindOptions],
) -> WaitResult:
    """:func:`wait_bindable` for asyncio: sleeps with ``asyncio.sleep`` between trial binds."""
    return await _run_async(_bindable(req, timeout, interval, on_progress, options))


def _bindable(
    req: BindRequest | int | str,
    timeout: float | None,
    interval: float,
    on_progress: Progress | None,
    options: BindOptions,
) -> Steps:
    """Every argument checked (UsageError) before the first trial bind, then the steps."""
    _check_timing(timeout, interval)
    _check_callback(on_progress)
    return _bindable_steps(request_for(req, **options), timeout, interval, on_progress)


def _check_timing(timeout: float | None, interval: float) -> None:
    """Finite, bounded numbers: ``None`` is the way to wait without limit (inf and nan are
    UsageErrors, as is anything beyond MAX_SECONDS, which select()/poll() cannot take)."""
    if timeout is not None:
        parse_seconds(timeout, what="timeout")
    if parse_seconds(interval, what="interval") <= 0:
        raise UsageError(f"interval must be > 0, not {interval}")


def _check_callback(on_progress: object) -> None:
    """A callback that is not callable would fail only once the port is busy, seconds later."""
    if on_progress is not None and not callable(on_progress):
        raise UsageError(f"on_progress must be callable (diagnosis, elapsed) or None, not {on_progress!r}")


def _bindable_steps(
    req: BindRequest, timeout: float | None, interval: float, on_progress: Progress | None
) -> Steps:
    start = time.monotonic()
    refreshed = -REFRESH_INTERVAL
    while True:
        trial = trial_bind(req)
        elapsed = time.monotonic() - start
        if trial.ok:
            return WaitResult(True, elapsed, req, trial)
        if trial.errno not in TRANSIENT_ERRNOS:
            raise NotWaitable(f"{trial}; waiting will not change that", trial.errno)
        if on_progress is not None and elapsed - refreshed >= REFRESH_INTERVAL:
            refreshed = elapsed
            on_progress(diagnose(req, owners=False), elapsed)
        if timeout is not None and elapsed >= timeout:
            return WaitResult(False, elapsed, req, trial, diagnose(req, owners=True))
        yield _next_delay(elapsed, timeout, interval)


# ---------------------------------------------------------------------------------------------
# Listening


def _targets(addr: AddrLike | None) -> tuple[IPv4Address | IPv6Address, ...]:
    a = parse_addr(addr)
    if a is None or a.is_unspecified:
        return LOOPBACKS
    return (a,)


def accepts(addr: IPv4Address | IPv6Address, port: int, timeout: float = 1.0) -> bool:
    """Does a TCP connect to addr:port complete? Closed at once, like ``nc -z``."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False  # e.g. IPv6 disabled
    with s:
        s.settimeout(timeout)
        if s.connect_ex((str(addr), port)) != 0:
            return False
        return not _self_connected(s)


def _self_connected(s: socket.socket) -> bool:
    # A loopback connect to a port in the ephemeral range can pick that very port as its source
    # and complete a TCP simultaneous open with itself: connected, yet nobody listens.
    try:
        return bool(s.getsockname()[:2] == s.getpeername()[:2])
    except OSError:
        return True


async def accepts_async(addr: IPv4Address | IPv6Address, port: int, timeout: float = 1.0) -> bool:
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    with s:
        s.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (str(addr), port)), timeout)
        except (OSError, TimeoutError):
            return False
        return not _self_connected(s)


def udp_bound(addrs: tuple[IPv4Address | IPv6Address, ...], port: int) -> IPv4Address | IPv6Address | None:
    """A bound UDP socket on port that receives on one of addrs (UDP has nothing to connect to)."""
    from rebind.kernel.walk import records
    from rebind.model.conflict import overlap
    from rebind.model.query import SocketQuery
    from rebind.model.records import State

    for r in records(SocketQuery.create(ports=[port], protos=[Proto.UDP], states=[State.CLOSE])):
        for a in addrs:
            if overlap(r.local.addr, bool(r.v6only), a, a.version == 6):
                return a
    return None


def wait_listening(
    port: int,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    timeout: float | None = None,
    interval: float = POLL_INTERVAL,
) -> WaitResult:
    """Block until something accepts TCP connections on port (127.0.0.1 or ::1 unless ``addr``).

    For UDP, until a bound UDP socket receives on one of those addresses.
    """
    return _run(_listening(port, addr, proto, timeout, interval))


async def wait_listening_async(
    port: int,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    timeout: float | None = None,
    interval: float = POLL_INTERVAL,
) -> WaitResult:
    """:func:`wait_listening` for asyncio (non-blocking connects)."""
    return await _run_async(_listening(port, addr, proto, timeout, interval))


def _listening(
    port: int, addr: AddrLike | None, proto: Proto | str, timeout: float | None, interval: float
) -> Steps:
    """Every argument checked (UsageError) before the first connect, then the steps."""
    _check_timing(timeout, interval)
    return _listening_steps(parse_proto(proto), _targets(addr), parse_port(port), timeout, interval)


def _listening_steps(
    p: Proto, addrs: tuple[IPv4Address | IPv6Address, ...], port: int, timeout: float | None, interval: float
) -> Steps:
    start = time.monotonic()
    while True:
        hit: IPv4Address | IPv6Address | None = None
        if p is Proto.UDP:
            hit = udp_bound(addrs, port)
        else:
            for a in addrs:
                if (yield Connect(a, port)):  # the driver connects, sync or async
                    hit = a
                    break
        elapsed = time.monotonic() - start
        if hit is not None or (timeout is not None and elapsed >= timeout):
            return WaitResult(hit is not None, elapsed, answered=hit)
        yield _next_delay(elapsed, timeout, interval)


def _next_delay(elapsed: float, timeout: float | None, interval: float) -> float:
    return interval if timeout is None else min(interval, max(timeout - elapsed, 0.0))


# ---------------------------------------------------------------------------------------------
# Drivers


def _run(steps: Steps) -> WaitResult:
    answer: bool | None = None
    try:
        while True:
            ask = steps.send(answer)
            answer = None
            if isinstance(ask, Connect):
                answer = accepts(ask.addr, ask.port)
            else:
                time.sleep(ask)
    except StopIteration as stop:
        result: WaitResult = stop.value
        return result


async def _run_async(steps: Steps) -> WaitResult:
    answer: bool | None = None
    try:
        while True:
            ask = steps.send(answer)
            answer = None
            if isinstance(ask, Connect):
                answer = await accepts_async(ask.addr, ask.port)
            else:
                await asyncio.sleep(ask)
    except StopIteration as stop:
        result: WaitResult = stop.value
        return result
