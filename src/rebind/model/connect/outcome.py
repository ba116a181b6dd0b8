"""The answer: verdict, stage and errno, how each port of the range stands (:class:`PortUse`),
the range accounting, the consumers, the capacity, the fixes, all in one :class:`ConnectResult`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rebind.model.connect.facts import ConnectSettings, PortHolder
from rebind.model.connect.request import ConnectRequest

EADDRINUSE = 98
EADDRNOTAVAIL = 99
EAGAIN = 11
EINPROGRESS = 115
ERRNO_NAMES = {EADDRINUSE: "EADDRINUSE", EADDRNOTAVAIL: "EADDRNOTAVAIL", EAGAIN: "EAGAIN"}


class Verdict(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    #: Depends on hidden kernel state (odd-sized range, C1) or on an unreadable fact.
    MAY_FAIL = "may-fail"


class Stage(enum.StrEnum):
    BIND = "bind"
    CONNECT = "connect"


class PortUse(enum.StrEnum):
    """Why a port of the range is, or is not, usable for this connect()."""

    FREE = "free"  # no socket on the port
    #: TIME_WAIT to this destination whose takeover hinges on its unread TCP timestamps: counted
    #: as not usable (the worst case).
    TIME_WAIT_UNKNOWN = "time-wait-unknown"
    SHARED = "shared"  # connect-only bucket, 4-tuple free: usable
    TIME_WAIT_REUSABLE = "time-wait-reusable"  # usable: tcp_twsk_unique takes the entry over
    RESERVED = "reserved"
    LISTENER = "listener"
    BOUND_INACTIVE = "bound-inactive"
    BIND_BEFORE_CONNECT = "bind-before-connect"  # a client that bound its port (explicit)
    IN_USE_TO_DESTINATION = "in-use-to-destination"
    TIME_WAIT_TO_DESTINATION = "time-wait-to-destination"
    #: bind(ip, 0) / UDP autobind: some socket on the port overlaps the address.
    OVERLAPPING_OWNER = "overlapping-owner"
    #: Usable only if a client socket on it got its port from connect(), which nothing here can
    #: tell (connect-rules §8): counted as not usable, the worst case.
    UNKNOWN_ORIGIN = "unknown-origin"

    @property
    def usable(self) -> bool:
        return self in (PortUse.FREE, PortUse.SHARED, PortUse.TIME_WAIT_REUSABLE)

    @property
    def by_bind(self) -> bool:
        return self in (PortUse.LISTENER, PortUse.BOUND_INACTIVE, PortUse.BIND_BEFORE_CONNECT)


@dataclass(frozen=True, slots=True)
class TimeWaitInfo:
    """A time-wait entry with this request's 4-tuple and whether connect() can take it over."""

    holder: PortHolder
    left_ms: int | None
    #: None: it depends on the entry's own TCP timestamps, which nobody could read.
    reusable: bool | None
    why: str


@dataclass(frozen=True, slots=True)
class Accounting:
    """Where the range went, port by port (each port counted once, under its first reason)."""

    total: int
    usable: int
    counts: dict[str, int]
    #: connect()'s parity half (C10): usable ports with lo's parity / all of them.
    first_half_usable: int
    first_half_total: int
    #: Client sockets in the range whose port origin inet_diag cannot show.
    ambiguous: int = 0
    #: ``usable`` is already the worst case (every ambiguous socket bound its port); this is the
    #: count if every one of them had its port from connect() instead (None: no ambiguity).
    usable_best: int | None = None

    @property
    def usable_worst(self) -> int | None:
        """The worst case, which ``usable`` is (kept for the JSON key)."""
        return self.usable if self.ambiguous else None


@dataclass(frozen=True, slots=True)
class Consumer:
    """A process holding ports of the range, ranked by how many."""

    pid: int
    name: str
    user: str | None
    cmdline: tuple[str, ...]
    to_destination: int
    by_bind: int
    #: None: not counted. Connections elsewhere on connect()-made ports are read one by one
    #: only when no bind-hash summary answered for the range (RangeBuckets): counting them
    #: would need every client socket of the range and its owner, the cost the summary avoids.
    other: int | None
    #: systemd unit or container, where another part of rebind can tell (not filled here).
    unit: str | None = None

    @property
    def total(self) -> int | None:
        return None if self.other is None else self.to_destination + self.by_bind + self.other


@dataclass(frozen=True, slots=True)
class Capacity:
    usable_for_destination: int
    time_wait_seconds: float
    #: Sustainable new connections per second to this destination (ports / TIME_WAIT length).
    sustainable_per_s: float
    #: Closes to this destination per second over the last minute (TIME_WAIT entries / 60 s).
    observed_per_s: float | None
    slow_path: bool
    used_fraction_first_half: float
    note: str


@dataclass(frozen=True, slots=True)
class Fix:
    title: str
    why: str
    python: str | None = None
    c: str | None = None
    command: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectOutcome:
    verdict: Verdict
    errno: int | None
    stage: Stage | None
    explanation: str
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    @property
    def errno_name(self) -> str | None:
        return ERRNO_NAMES.get(self.errno) if self.errno is not None else None


@dataclass(frozen=True, slots=True)
class ConnectResult:
    request: ConnectRequest
    settings: ConnectSettings
    effective_range: tuple[int, int]
    outcome: ConnectOutcome
    accounting: Accounting
    time_waits: tuple[TimeWaitInfo, ...]
    consumers: tuple[Consumer, ...]
    capacity: Capacity | None
    fixes: tuple[Fix, ...]
    headline: str
