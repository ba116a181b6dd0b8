"""`rebind why` as a function: gather the facts (kernel/facts.py), then advise (model/advice.py).

The trial bind is ground truth for the bind() stage; the model explains it and predicts the
listen() stage. Only trials that cannot change the kernel's answer to the user's next bind run
(conflict.probe_is_harmless): asking never changes the answer.
"""

from __future__ import annotations

from rebind.model.advice import (
    Assessment,
    Attempt,
    BlockerInfo,
    Diagnosis,
    Disagreement,
    OwnerView,
    Provenance,
    WhyVerdict,
    advise,
    assess,
)
from rebind.model.records import Proto, SocketTable
from rebind.model.request import AddrLike, BindRequest

__all__ = [
    "Assessment",
    "Attempt",
    "BlockerInfo",
    "Diagnosis",
    "Disagreement",
    "OwnerView",
    "Provenance",
    "WhyVerdict",
    "assess_now",
    "default_request",
    "diagnose",
    "explain_bind_failure",
]


def default_request(
    port: int,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
    freebind: bool = False,
    device: str | None = None,
) -> BindRequest:
    """A bind request as this process would make it (alias of actions.common.bind_request)."""
    from rebind.actions.common import bind_request

    return bind_request(
        port,
        addr=addr,
        proto=proto,
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=v6only,
        freebind=freebind,
        device=device,
    )


def diagnose(req: BindRequest, *, owners: bool = True, table: SocketTable | None = None) -> Diagnosis:
    """Everything `rebind why` says about ``req``."""
    from rebind.kernel.facts import gather

    return advise(gather(req, owners=owners, table=table))


def assess_now(req: BindRequest, *, table: SocketTable | None = None) -> Assessment:
    """Observer-free "bindable now?" (no trial bind, no owner scan): for the exporter and top.

    ``Assessment.bindable`` is None when the answer depends on flags nobody can read.
    """
    from rebind.kernel.facts import gather

    facts = gather(req, owners=False, table=table, trials=False)
    return assess(req, facts)


def explain_bind_failure(
    host: str, port: int, proto: str = "tcp", reuseaddr: bool = True, reuseport: bool = False
) -> str:
    """A short multi-line explanation for a failed bind, for other commands (e.g. `rebind run`)."""
    try:
        d = diagnose(default_request(port, addr=host, proto=proto, reuseaddr=reuseaddr, reuseport=reuseport))
    except Exception as exc:  # explaining must never hide the original failure
        return f"(could not diagnose: {exc})"
    lines = [d.headline]
    for b in d.blockers[:5]:
        lines.append(f"  - {b.blocker.reason}")
    if d.fixes:
        f = d.fixes[0]
        lines.append(f"  fix: {f.title}" + (f": {f.command}" if f.command else ""))
    return "\n".join(lines)
