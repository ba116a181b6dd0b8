"""What the conflict model answers: the verdict, the stage and errno, each blocking socket with
the kernel rule that decided and the unknown facts it hinges on, and the alternatives."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rebind.model.conflict.inputs import Holder
from rebind.model.request import BindRequest


class Stage(enum.StrEnum):
    BIND = "bind"
    LISTEN = "listen"


class Verdict(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    #: Depends on a flag nobody could read (Holder.opts has None); both outcomes are reported.
    DEPENDS = "depends"


class Rule(enum.StrEnum):
    """Which kernel rule decided (named after the check in the kernel source)."""

    ADDRESS_NOT_LOCAL = "address-not-local"  # __inet_bind / __inet6_bind: EADDRNOTAVAIL
    ADDRESS_TENTATIVE = "address-tentative"  # ipv6_chk_addr bans IFA_F_TENTATIVE: EADDRNOTAVAIL
    PRIVILEGED_PORT = "privileged-port"  # inet_port_requires_bind_service: EACCES
    INVALID_ADDRESS = "invalid-address"  # __inet6_bind: EINVAL (mapped on v6only, mcast TCP, scope)
    LISTENER_NEVER_YIELDS = "listener-never-yields"  # inet_bind_conflict: sk2 in LISTEN
    REUSEADDR_MISSING_NEW = "reuseaddr-missing-new"
    REUSEADDR_MISSING_OLD = "reuseaddr-missing-old"
    REUSEPORT_MISSING_NEW = "reuseport-missing-new"  # it has SO_REUSEPORT (your uid), you do not
    REUSEPORT_MISSING_OLD = "reuseport-missing-old"
    REUSEPORT_OTHER_UID = "reuseport-other-uid"  # sk_uid differs (TIME_WAIT exempt)
    PLAIN_OVERLAP = "plain-overlap"  # neither exemption applies
    UDP_OVERLAP = "udp-overlap"  # udp_lib_lport_inuse


class Flag(enum.StrEnum):
    """A fact about an existing socket that the answer may hinge on."""

    REUSEADDR = "SO_REUSEADDR"
    REUSEPORT = "SO_REUSEPORT"
    UID = "socket uid"
    V6ONLY = "IPV6_V6ONLY"
    #: tb->fastreuseport/fastuid/fast_rcv_saddr: only a BPF iterator reads them.
    BUCKET = "port's SO_REUSEPORT cache"
    #: Which udp_lib_lport_inuse this kernel build has (not calibrated: no network namespace).
    UDP_RULE = "kernel build's UDP rule"
    #: The UDP hash chain's order (the early stop makes the first relevant socket decide).
    CHAIN_ORDER = "UDP hash-chain order"


@dataclass(frozen=True, slots=True)
class Blocker:
    """One holder that refuses the request, at which stage and by which rule."""

    holder: Holder
    stage: Stage
    rule: Rule
    #: False when the answer depends on a flag nobody could read (Holder.opts has None).
    certain: bool
    reason: str
    #: The unknown facts of the holder that decide whether it blocks (empty when certain).
    decided_by: tuple[Flag, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """The model's answer to one request: verdict, errno, stage, blockers, notes."""

    verdict: Verdict
    errno: int | None = None
    stage: Stage | None = None
    blockers: tuple[Blocker, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class Alternative:
    """One way to bind that `rebind why` can offer, with the model's prediction."""

    label: str
    request: BindRequest
    outcome: Outcome

    @property
    def works(self) -> bool:
        return self.outcome.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class Check:
    """One get_port() conflict check (bind() or listen()), before it becomes an Outcome."""

    verdict: Verdict
    blockers: tuple[Blocker, ...] = ()
    notes: tuple[str, ...] = ()
