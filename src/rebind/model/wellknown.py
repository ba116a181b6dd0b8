"""Well-known holders (systemd-resolved on 53, avahi on 5353, cupsd on 631, ...): the catalogue's
shape, and recognising a holder from kernel facts. Pure: the catalogue's text and each process's
facts come in as data (kernel/wellknown.py reads them).

Recognition trusts only what a process cannot choose: the executable behind /proc/PID/exe, that
file's owner and mode, and the process's uid. Its name (comm, argv[0]) and command line are the
process's own choice -- a hostile user's script named ``avahi-daemon`` must not make root edit
avahi's configuration -- so a name match alone yields a *lookalike* note and no advice.
"""

from __future__ import annotations

import re
import shlex
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rebind.model.findings import Findings as Findings  # re-exported: its old home
from rebind.model.records import Proto, process_label
from rebind.textsafe import visible

#: Kubernetes object names (RFC 1123 labels, DNS subdomains for namespaces): nothing else is
#: ever put into a printed command, and what passes is shell-quoted anyway.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PORT = re.compile(r"(\*|[0-9]{1,5})/(tcp|udp)")
_PLACEHOLDERS = frozenset({"port", "proto", "namespace", "service"})


class CatalogueError(ValueError):
    """The catalogue file is malformed (a packaging bug: tests catch it)."""


@dataclass(frozen=True, slots=True)
class PortMatch:
    """A port the catalogue entry holds ("53/udp"; "*/tcp": any port)."""

    port: int | None  # None: any port
    proto: Proto

    def matches(self, port: int, proto: Proto) -> bool:
        return self.proto is proto and (self.port is None or self.port == port)


@dataclass(frozen=True, slots=True)
class WellKnown:
    """One catalogue entry (rebind/data/wellknown.toml): a daemon, how to recognise it, its fix."""

    id: str
    name: str
    package: str
    exe: tuple[str, ...]
    users: tuple[str, ...]
    ports: tuple[PortMatch, ...]
    explain: str
    fix_title: str
    fix: tuple[str, ...]
    revert: tuple[str, ...] = ()
    cmdline: str | None = None
    units: tuple[str, ...] = ()
    nat_chain: str | None = None

    def holds(self, port: int, proto: Proto) -> bool:
        return any(p.matches(port, proto) for p in self.ports)

    @property
    def basenames(self) -> frozenset[str]:
        return frozenset(e.rsplit("/", 1)[-1] for e in self.exe)


def _strs(doc: Mapping[str, Any], key: str, where: str, required: bool = True) -> tuple[str, ...]:
    v = doc.get(key, None if required else [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CatalogueError(f"{where}: {key} must be a list of strings")
    return tuple(v)


def _str(doc: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    v = doc.get(key, default)
    if not isinstance(v, str):
        raise CatalogueError(f"{where}: {key} must be a string")
    return v


def _check_placeholders(lines: Iterable[str], where: str) -> None:
    for line in lines:
        for m in re.finditer(r"(?<!\{)\{([a-z_]*)\}(?!\})", line):
            if m.group(1) not in _PLACEHOLDERS:
                raise CatalogueError(f"{where}: unknown placeholder {{{m.group(1)}}}")


def parse_catalogue(text: str) -> tuple[WellKnown, ...]:
    """The entries of wellknown.toml, validated (CatalogueError names the entry and field)."""
    import tomllib  # here: `why` on a port no process holds (TIME_WAITs only) never parses it

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"wellknown.toml: {exc}") from None
    out: list[WellKnown] = []
    seen: set[str] = set()
    for i, h in enumerate(doc.get("holder", [])):
        where = f"holder #{i + 1}"
        ident = _str(h, "id", where)
        where = f"holder {ident!r}"
        if ident in seen:
            raise CatalogueError(f"{where}: duplicate id")
        seen.add(ident)
        ports = []
        for p in _strs(h, "ports", where):
            m = _PORT.fullmatch(p)
            if m is None:
                raise CatalogueError(f"{where}: bad port {p!r} (PORT/tcp, PORT/udp, */tcp)")
            ports.append(PortMatch(None if m.group(1) == "*" else int(m.group(1)), Proto(m.group(2))))
        exe = _strs(h, "exe", where)
        nat = h.get("nat_chain")
        if not exe and not isinstance(nat, str):
            raise CatalogueError(f"{where}: needs exe or nat_chain")
        if any(not e.startswith("/") for e in exe):
            raise CatalogueError(f"{where}: exe paths must be absolute")
        cmd = h.get("cmdline")
        if cmd is not None:
            re.compile(cmd)
        fix, revert = _strs(h, "fix", where), _strs(h, "revert", where, required=False)
        _check_placeholders((*fix, *revert), where)
        out.append(
            WellKnown(
                id=ident,
                name=_str(h, "name", where),
                package=_str(h, "package", where, ""),
                exe=exe,
                users=_strs(h, "users", where, required=False),
                ports=tuple(ports),
                explain=" ".join(_str(h, "explain", where).split()),
                fix_title=_str(h, "fix_title", where),
                fix=fix,
                revert=revert,
                cmdline=cmd if isinstance(cmd, str) else None,
                units=_strs(h, "units", where, required=False),
                nat_chain=nat if isinstance(nat, str) else None,
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Recognition


@dataclass(frozen=True, slots=True)
class ProcFacts:
    """What the kernel says about one holder process (kernel/wellknown.py: exe_facts)."""

    pid: int
    #: readlink(/proc/PID/exe); a replaced binary reads "PATH (deleted)".
    exe: str | None
    #: stat(/proc/PID/exe): the running image's owner and mode (the deleted one's too).
    exe_uid: int | None
    exe_mode: int | None
    #: The process's real uid (/proc/PID/status), not the socket's.
    uid: int | None
    name: str = ""
    cmdline: tuple[str, ...] = ()
    unit: str | None = None
    #: rebind found the container a port proxy serves (docker-proxy's fix differs then).
    container: str | None = None


@dataclass(frozen=True, slots=True)
class Recognised:
    """A well-known holder of the port, with its owner's fix ready to print."""

    entry: WellKnown
    port: int
    proto: Proto
    pid: int | None
    fix: tuple[str, ...]
    revert: tuple[str, ...]
    unit: str | None = None
    #: Why the catalogue's fix is withheld (e.g. docker-proxy for a live container).
    withheld: str | None = None
    #: Where it was recognised from: "exe" or the NAT chain.
    via: str = "exe"

    def lines(self) -> tuple[str, ...]:
        unit = f", unit {visible(self.unit)}" if self.unit else ""
        who = f"pid {self.pid}{unit}" if self.pid is not None else f"NAT rule in {self.via}"
        return (f"{self.port}/{self.proto.value} is held by {self.entry.name} ({who})", self.entry.explain)


@dataclass(frozen=True, slots=True)
class Lookalike:
    """A holder named like a well-known daemon whose executable is not the packaged one."""

    pid: int
    name: str
    entry: WellKnown
    reason: str

    def line(self) -> str:
        return (
            f"{process_label(self.name, self.pid)} is named like {self.entry.name} but {self.reason}: "
            "not the system's daemon, so no advice to change its configuration"
        )


def trust_problem(p: ProcFacts, e: WellKnown, system_uids: Mapping[str, int]) -> str | None:
    """None when ``p`` runs ``e``'s packaged executable as root or the package's account;
    otherwise what is wrong, in words."""
    if p.exe is None or p.exe_uid is None or p.exe_mode is None:
        return "its executable cannot be read"
    path = p.exe.removesuffix(" (deleted)")
    if path not in e.exe:
        return f"its executable is {visible(path)}"
    if p.exe_uid != 0 or p.exe_mode & (stat.S_IWGRP | stat.S_IWOTH) or not stat.S_ISREG(p.exe_mode):
        return f"{visible(path)} is not a root-owned file only root can write"
    allowed = {0} | {system_uids[u] for u in e.users if u in system_uids}
    if p.uid not in allowed:
        return f"it runs as uid {p.uid}, not as root or {', '.join(e.users) or 'root'}"
    if e.cmdline is not None and not re.search(e.cmdline, "\0".join(p.cmdline)):
        return "its command line does not match"
    return None


def _render(lines: Sequence[str], values: Mapping[str, str | int]) -> tuple[str, ...]:
    quoted = {k: v if isinstance(v, int) else shlex.quote(v) for k, v in values.items()}
    return tuple(line.format(**quoted) for line in lines)


def recognise(
    catalogue: Sequence[WellKnown],
    p: ProcFacts,
    port: int,
    proto: Proto,
    system_uids: Mapping[str, int],
) -> Recognised | Lookalike | None:
    """The first catalogue entry ``p`` is (for this port), a lookalike, or None."""
    lookalike: Lookalike | None = None
    for e in catalogue:
        if not e.exe or not e.holds(port, proto):
            continue
        problem = trust_problem(p, e, system_uids)
        if problem is None:
            values: dict[str, str | int] = {"port": port, "proto": proto.value}
            withheld = None
            if e.id == "docker-proxy" and p.container:
                withheld = (
                    f"the proxy serves container {visible(p.container)}, which still exists: "
                    "stop or re-map the container (see the fixes) instead of restarting dockerd"
                )
            return Recognised(
                e, port, proto, p.pid, _render(e.fix, values), _render(e.revert, values), p.unit, withheld
            )
        named = p.name in e.basenames or (
            bool(p.cmdline) and p.cmdline[0].rsplit("/", 1)[-1].split(":")[0] in e.basenames
        )
        if named and lookalike is None and e.cmdline is None:
            lookalike = Lookalike(p.pid, p.name, e, problem)
    return lookalike


def service_of_comment(comment: str | None) -> tuple[str, str] | None:
    """kube-proxy's rule comment ``namespace/service:port-name`` (or ``namespace/service``) as
    (namespace, service), only when both are valid Kubernetes names."""
    if not comment:
        return None
    ns, sep, rest = comment.strip().partition("/")
    svc = rest.split(":", 1)[0]
    if not sep or not _K8S_NAME.fullmatch(ns) or not _K8S_NAME.fullmatch(svc):
        return None
    return ns, svc


def recognise_nat(
    catalogue: Sequence[WellKnown], chain: str, comment: str | None, port: int, proto: Proto
) -> Recognised | None:
    for e in catalogue:
        if e.nat_chain != chain or not e.holds(port, proto):
            continue
        svc = service_of_comment(comment)
        if svc is None:
            return Recognised(e, port, proto, None, (), (), withheld="the rule names no Service", via=chain)
        values: dict[str, str | int] = {"port": port, "proto": proto.value}
        values.update(namespace=svc[0], service=svc[1])
        return Recognised(
            e, port, proto, None, _render(e.fix, values), _render(e.revert, values), unit=None, via=chain
        )
    return None
