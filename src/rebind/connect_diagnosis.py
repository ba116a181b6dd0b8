"""`rebind why --connect` as a Python API: the same facts as the JSON (schema rebind.connect/1).

    import rebind.connect_diagnosis as cd
    res = cd.connect_diagnose("127.0.0.1", 8080)
    res.outcome.verdict, res.accounting.usable, res.fixes

Without ``probe`` nothing is sent: the answer comes from the model and the socket table.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import Any

from rebind.model.connect import (
    ConnectRequest,
    ConnectResult,
    Stage,
    Verdict,
    fmt_endpoint,
)
from rebind.model.records import IPAddress, Proto

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE = 51


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One real attempt: ``ok`` when the kernel gave the socket a local port."""

    ok: bool
    stage: Stage | None
    errno: int | None
    local_port: int | None
    agrees: bool | None = None

    @property
    def error_name(self) -> str | None:
        return errno.errorcode.get(self.errno) if self.errno else None

    def json(self) -> dict[str, Any]:
        return {
            "sent": True,
            "ok": self.ok,
            "stage": self.stage.value if self.stage else None,
            "errno": self.error_name,
            "local_port": self.local_port,
            "agrees_with_model": self.agrees,
        }


@dataclass(frozen=True, slots=True)
class ConnectDiagnosis:
    result: ConnectResult
    probe: ProbeResult | None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        if self.probe is not None:
            return self.probe.ok
        return self.result.outcome.verdict is Verdict.OK

    @property
    def disagreement(self) -> str | None:
        if self.probe is None or self.probe.agrees is not False:
            return None
        return f"the model said {self.result.outcome.verdict.value}, the probe " + (
            "got a port" if self.probe.ok else f"failed with {self.probe.error_name}"
        )

    def json(self) -> dict[str, Any]:
        from rebind.render.connect import result_json

        doc = result_json(self.result, probe=self.probe.json() if self.probe else {"sent": False})
        doc["disagreement"] = self.disagreement
        doc["warnings"] = list(self.warnings)
        return doc


def resolve(host: str, *, udp: bool = False, what: str = "") -> IPAddress:
    """HOST as an address, or a name resolved once (the first answer, as connect() callers do)."""
    from rebind.kernel.resolver import resolve_host

    return resolve_host(host, udp=udp, what=what)


def probe(req: ConnectRequest) -> ProbeResult:
    """One real non-blocking connect(), aborted at once with SO_LINGER 0 (an RST, no data).

    For TCP this sends a SYN (and the RST); UDP connect() sends nothing.
    """
    fam = socket.AF_INET if req.dst.version == 4 else socket.AF_INET6
    kind = socket.SOCK_DGRAM if req.proto is Proto.UDP else socket.SOCK_STREAM
    with socket.socket(fam, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as s:
        if req.proto is Proto.TCP:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if req.reuseaddr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if req.port_range is not None:
            lo, hi = req.port_range
            s.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", (hi << 16) | lo))
        if req.local_port is not None or req.bind_before_connect:
            if req.bind_address_no_port:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            addr = str(req.src) if req.src is not None else ("0.0.0.0" if fam == socket.AF_INET else "::")
            try:
                s.bind((addr, req.local_port or 0))
            except OSError as exc:
                return ProbeResult(False, Stage.BIND, exc.errno, None)
        err = s.connect_ex((str(req.dst), req.dport))
        # Refused, unreachable...: the port question was answered (a port was taken) -> ok.
        if err in (errno.EADDRNOTAVAIL, errno.EAGAIN, errno.EADDRINUSE):
            return ProbeResult(False, Stage.CONNECT, err, None)
        try:
            port = int(s.getsockname()[1])
        except OSError:
            port = None
        return ProbeResult(True, None, err or None, port)


def connect_diagnose(
    host: str | IPAddress,
    port: Any,
    *,
    source: str | IPAddress | None = None,
    local_port: Any = None,
    bind_before_connect: bool = False,
    bind_address_no_port: bool = False,
    reuseaddr: bool = False,
    udp: bool = False,
    port_range: tuple[Any, Any] | None = None,
    with_probe: bool = False,
    owners: bool = True,
) -> ConnectDiagnosis:
    """Would connect() to ``host:port`` get a local port now? The facts behind the answer."""
    dst = resolve(host, udp=udp) if isinstance(host, str) else host
    req = ConnectRequest.create(
        dst,
        port,
        src=source,
        proto=Proto.UDP if udp else Proto.TCP,
        bind_before_connect=bind_before_connect,
        bind_address_no_port=bind_address_no_port,
        local_port=local_port,
        reuseaddr=reuseaddr,
        port_range=port_range,
    )
    return diagnose_request(req, with_probe=with_probe, owners=owners)


def diagnose_request(
    req: ConnectRequest, *, with_probe: bool = False, owners: bool = True
) -> ConnectDiagnosis:
    from rebind.kernel import connect_prefetch
    from rebind.kernel.connect_facts import gather

    # the named sockets by lookups where HZ is known without measuring (kernel/connect_lookup.py,
    # kernel/hz.py), else from the first dump the prefetch started
    facts = gather(req, owners=owners, summary=True, first=connect_prefetch.take(req), lookups=True)
    res = facts.evaluate(req)
    pr = None
    if with_probe:
        p = probe(res.request)
        model_ok = res.outcome.verdict is Verdict.OK
        agrees = None if res.outcome.verdict is Verdict.MAY_FAIL else (p.ok == model_ok)
        pr = ProbeResult(p.ok, p.stage, p.errno, p.local_port, agrees)
    return ConnectDiagnosis(res, pr, facts.warnings)


__all__ = [
    "ConnectDiagnosis",
    "ConnectRequest",
    "ProbeResult",
    "connect_diagnose",
    "diagnose_request",
    "fmt_endpoint",
    "probe",
    "resolve",
]
