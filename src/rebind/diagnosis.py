"""`rebind why` as a function: gather the facts (kernel/facts.py), then advise (model/advice/).

The trial bind is ground truth for the bind() stage; the model explains it and predicts the
listen() stage. Only trials that cannot change the kernel's answer to any later bind run
(conflict.probe_is_harmless): asking never changes the answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypedDict, Unpack

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
    "BindOptions",
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
    "request_for",
]


class BindOptions(TypedDict, total=False):
    """The bind options of a request given as keywords (the functions that take a
    :class:`BindRequest` or a port: :func:`default_request`, ``plan_free``, ``free``,
    ``wait_bindable``); each one as in :meth:`BindRequest.create`."""

    addr: AddrLike | None
    proto: Proto | str
    reuseaddr: bool
    reuseport: bool
    v6only: bool | None
    freebind: bool
    device: str | None


def default_request(port: int | str, **options: Unpack[BindOptions]) -> BindRequest:
    """A bind request as this process would make it: the one place a :class:`BindRequest` is
    built from user input (the CLI's bind options, the API, top's keys). UsageError for every bad
    field; interface names are resolved here, and the socket's uid is this process's."""
    import os

    from rebind.kernel.addrs import ifindex_of

    return BindRequest.create(port, **options, uid=os.geteuid(), ifindex_of=ifindex_of)


def request_for(req: BindRequest | int | str, **options: Unpack[BindOptions]) -> BindRequest:
    """A ready :class:`BindRequest` as it is, or a port and its keyword options through
    :func:`default_request` (the public functions accept both)."""
    from rebind.errors import UsageError

    if not isinstance(req, BindRequest):
        return default_request(req, **options)
    if options:
        given = ", ".join(sorted(options))
        raise UsageError(f"the bind options belong in the BindRequest, not beside it (got {given})")
    return req


def diagnose(req: BindRequest, *, owners: bool = True, table: SocketTable | None = None) -> Diagnosis:
    """Everything `rebind why` says about ``req``.

    ``req`` must be a :class:`BindRequest` (:func:`default_request` builds one from a port);
    anything else is a UsageError before anything is read.
    """
    from rebind.errors import UsageError
    from rebind.kernel.facts import gather

    if not isinstance(req, BindRequest):
        raise UsageError(
            f"diagnose() needs a BindRequest, not {type(req).__name__} (build one with default_request(PORT))"
        )
    if table is not None and not isinstance(table, SocketTable):
        raise UsageError(f"diagnose(table=...) needs a SocketTable or None, not {type(table).__name__}")

    d = advise(gather(req, owners=owners, table=table))
    notes = _context_notes(d)
    return replace(d, notes=(*d.notes, *notes)) if notes else d


def _context_notes(d: Diagnosis) -> tuple[str, ...]:
    """What the port's surroundings add: a server port that outgoing connections may take first,
    and a NAT rule that sends the port's traffic elsewhere although no socket holds it."""
    from rebind.model.ephemeral import ephemeral_overlap_warning

    req, notes = d.request, []
    warning = ephemeral_overlap_warning(
        req.port, d.settings.ip_local_port_range, d.settings.ip_local_reserved_ports
    )
    if warning:
        notes.append(warning)
    if not d.table.entries and d.verdict.bindable:
        notes.extend(_nat_notes(req))
    return tuple(notes)


def _nat_notes(req: BindRequest) -> list[str]:
    """A published container port (DOCKER, NETAVARK-HOSTPORT-DNAT, CNI-HOSTPORT-DNAT) or a
    Kubernetes NodePort (KUBE-NODEPORTS) with nothing bound: bind() works, the traffic does not
    reach it (kube-proxy in iptables mode holds no socket at all, k3s#8989)."""
    from rebind.kernel.containers import captures_for, engine_state
    from rebind.textsafe import visible

    addr = None if req.addr.is_unspecified else req.addr
    caps = captures_for(req.port, req.proto.value, addr)
    if not caps:
        return []
    engines = engine_state()
    out = []
    for c in caps:
        cid = c.container_id or (engines.by_ip.get(c.to_addr) if c.to_addr is not None else None)
        who = f", container {visible(engines.ref(cid, c.engine).label)} ({c.engine.value})" if cid else ""
        out.append(
            f"your bind() works, but a NAT rule (chain {c.chain.value}) sends traffic for "
            f"{req.port}/{req.proto.value} to {visible(c.destination)}{who}: connections that match it "
            "never reach your server. Stop or re-map what publishes the port, or pick another one."
        )
    return out


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
