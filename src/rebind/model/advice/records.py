"""What `rebind why`'s advice is made of: the gathered facts it starts from, the verdict, each
blocker with its kind and how its flags are known, the alternatives tried, a model/kernel
disagreement, and the diagnosis that carries them all to the renderers."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from rebind.model.assess import HolderFacts, Provenance
from rebind.model.conflict import Blocker, KernelSettings, Outcome, PortState, SockOpts, Stage, Verdict
from rebind.model.diagnosis import Fix, HolderKind, ProcessHint
from rebind.model.records import SocketEntry, SocketTable
from rebind.model.request import BindRequest, TrialResult
from rebind.model.sockstate import SockStates, Unavailable


class WhyVerdict(enum.StrEnum):
    """The answer, one word; ``Diagnosis.headline`` is the sentence."""

    FREE = "free"  # bind() works now (and listen(), when asked)
    LISTEN_FAILS = "listen-fails"  # bind() works, listen() fails with EADDRINUSE
    BUSY = "busy"  # EADDRINUSE: sockets hold the port
    CANNOT_BIND = "cannot-bind"  # no socket involved: EACCES, EADDRNOTAVAIL, EINVAL
    UNCERTAIN = "uncertain"  # depends on flags nobody could read, and no trial could decide

    @property
    def bindable(self) -> bool:
        return self is WhyVerdict.FREE


class OwnerView(enum.StrEnum):
    """How much of a socket's owners rebind could see."""

    SEEN = "seen"
    NONE_NEEDED = "none-needed"  # timewait mini-sockets have no owner
    NOT_SCANNED = "not-scanned"
    OUTSIDE = "outside-pid-namespace"  # root read every fd here: the holder is elsewhere
    UNKNOWN = "unknown"  # not root, or some processes could not be read


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything `why` knows, gathered by kernel/facts.py (or built by hand in tests)."""

    request: BindRequest
    holders: tuple[HolderFacts, ...]
    settings: KernelSettings
    table: SocketTable = field(default_factory=lambda: SocketTable(()))
    hints: Mapping[int, ProcessHint] = field(default_factory=dict)
    #: Trial binds that ran (only harmless ones: conflict.probe_is_harmless), keyed by request.
    trials: Mapping[BindRequest, TrialResult] = field(default_factory=dict)
    #: Why the as-asked trial did not run ("" when it ran, or trials were off).
    trial_skipped: str = ""
    #: The port's kernel state beside its sockets (bucket cache, UDP chain order); None = unknown.
    port: PortState | None = None
    can_destroy: bool = False
    #: Root read every process's fds (a socket without owners is held outside this PID namespace).
    owners_complete: bool = False
    #: What the BPF socket iterator read for the port, or why it could not (None: not asked).
    kernel: SockStates | Unavailable | None = None


@dataclass(frozen=True, slots=True)
class BlockerInfo:
    """One blocking socket as `why` shows it: its blocker, kind, flags and owners."""

    entry: SocketEntry
    blocker: Blocker
    kind: HolderKind
    opts: SockOpts
    provenance: Provenance
    owners: OwnerView = OwnerView.SEEN
    #: Blockers identical but for their remote end (TIME_WAITs of one server): how many share
    #: this one's group (the model judged one representative).
    group: int = 1

    @property
    def opts_source(self) -> str:
        return self.provenance.value


@dataclass(frozen=True, slots=True)
class Attempt:
    """One way to bind: the model's prediction, and the kernel's trial when one ran."""

    label: str
    request: BindRequest
    outcome: Outcome
    trial: TrialResult | None = None

    @property
    def works(self) -> bool:
        if self.trial is not None and not self.trial.ok:
            return False
        if self.trial is not None and self.outcome.stage is Stage.BIND:
            return True  # the kernel overrules a bind-stage prediction
        return self.outcome.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class Disagreement:
    """The model and the kernel's trial bind disagree (a limit of the model, or a bug)."""

    text: str
    #: What could explain it (a documented limitation or kernel cache), or "" for a model bug.
    explanation: str = ""

    @property
    def is_bug(self) -> bool:
        return not self.explanation


@dataclass(frozen=True, slots=True)
class Assessment:
    """The observer-free answer (no trial bind): what the exporter and `why` build on."""

    request: BindRequest
    outcome: Outcome
    holders: tuple[HolderFacts, ...]
    groups: tuple[tuple[HolderFacts, ...], ...]

    @property
    def bindable(self) -> bool | None:
        if self.outcome.verdict is Verdict.DEPENDS:
            return None
        return self.outcome.verdict is Verdict.OK


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The whole answer of `rebind why`."""

    request: BindRequest
    outcome: Outcome
    #: The as-asked trial bind; None when it could not run harmlessly.
    trial: TrialResult | None
    blockers: tuple[BlockerInfo, ...]
    attempts: tuple[Attempt, ...]
    fixes: tuple[Fix, ...]
    frees_in_ms: int | None
    verdict: WhyVerdict
    headline: str
    table: SocketTable
    settings: KernelSettings
    disagreement: Disagreement | None = None
    notes: tuple[str, ...] = ()

    @property
    def bindable(self) -> bool:
        return self.verdict.bindable
