"""Facts for the well-known-holder catalogue and the localhost split-brain check: each holder's
executable as the kernel sees it, the package accounts' uids, kube-proxy's NodePort rules and the
resolver's answer for localhost. The decisions are pure (model/wellknown.py, model/localhost.py).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING

from rebind.model.findings import Findings
from rebind.model.localhost import find_split
from rebind.model.records import Owner, Proto, SocketEntry, State

if TYPE_CHECKING:
    # The catalogue's model is imported where it is used: a port no process holds (its
    # TIME_WAITs) needs none of it.
    from rebind.model.wellknown import Lookalike, ProcFacts, Recognised, WellKnown


@cache
def catalogue() -> tuple[WellKnown, ...]:
    """The shipped catalogue (rebind/data/wellknown.toml, package data)."""
    # Through the package's loader (a file, or a member of a zip), not importlib.resources:
    # importing that (and pathlib, zipfile behind it) was ~7 ms of every `rebind why`.
    import rebind
    from rebind.model.wellknown import parse_catalogue

    spec = rebind.__spec__
    get_data = getattr(spec.loader, "get_data", None) if spec is not None and spec.origin else None
    if get_data is None or spec is None or spec.origin is None:
        from importlib import resources

        raw = resources.files("rebind").joinpath("data/wellknown.toml").read_bytes()
    else:
        raw = get_data(os.path.join(os.path.dirname(spec.origin), "data", "wellknown.toml"))
    # universal newlines, as importlib.resources' read_text gave it
    return parse_catalogue(raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n"))


def system_uids(entries: Iterable[WellKnown]) -> dict[str, int]:
    """uid of each package account the catalogue names that exists here."""
    out: dict[str, int] = {}
    for e in entries:
        for user in e.users:
            try:
                out[user] = pwd.getpwnam(user).pw_uid
            except KeyError:
                continue
    return out


def _real_uid(pid: int, proc: str) -> int | None:
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def exe_facts(o: Owner, proc: str = "/proc") -> ProcFacts:
    """The kernel's view of ``o``: readlink and stat of /proc/PID/exe (the image the process
    runs, deleted or not), and its real uid. Unreadable parts stay None (never guessed)."""
    from rebind.model.wellknown import ProcFacts

    path = f"{proc}/{o.pid}/exe"
    try:
        exe: str | None = os.readlink(path)
        st = os.stat(path)
        exe_uid, exe_mode = st.st_uid, st.st_mode
    except OSError:
        exe, exe_uid, exe_mode = None, None, None
    return ProcFacts(
        pid=o.pid,
        exe=exe,
        exe_uid=exe_uid,
        exe_mode=exe_mode,
        uid=_real_uid(o.pid, proc),
        name=o.name,
        cmdline=o.cmdline,
        unit=o.unit,
        container=o.container.label if o.container is not None else None,
    )


def recognise_holders(
    entries: Sequence[SocketEntry], port: int, proto: Proto, proc: str = "/proc"
) -> tuple[tuple[Recognised, ...], tuple[Lookalike, ...]]:
    """Well-known daemons among the owners of the sockets holding ``port``/``proto``."""
    owners = _holding_owners(entries, port, proto)
    if not owners:  # ten thousand TIME_WAITs have none: no catalogue, no account lookups
        return (), ()
    from rebind.model.wellknown import Lookalike, Recognised, recognise

    # The entries recognise() would weigh for this port, in catalogue order (it skips the rest).
    cat = tuple(e for e in catalogue() if e.exe and e.holds(port, proto))
    exes = frozenset(x for e in cat for x in e.exe)
    names = frozenset(n for e in cat for n in e.basenames)
    uids: dict[str, int] | None = None
    found: dict[str, Recognised] = {}
    fakes: dict[int, Lookalike] = {}
    for o in owners:
        if not _may_be(o, exes, names, proc):
            continue  # recognise() would say None: neither its image nor its name is one of them
        if uids is None:
            uids = system_uids(catalogue())
        got = recognise(cat, exe_facts(o, proc), port, proto, uids)
        if isinstance(got, Recognised):
            found.setdefault(got.entry.id, got)
        elif isinstance(got, Lookalike):
            fakes.setdefault(got.pid, got)
    return tuple(found.values()), tuple(fakes.values())


def _holding_owners(entries: Sequence[SocketEntry], port: int, proto: Proto) -> list[Owner]:
    """Each process owning a socket of ``port``/``proto`` once (first seen first)."""
    seen: set[int] = set()
    out: list[Owner] = []
    for e in entries:
        if not e.owners:  # first: most of a busy port is ownerless leftovers
            continue
        r = e.socket
        if r.proto is not proto or r.port != port or r.is_mini:
            continue
        for o in e.owners:
            if o.pid not in seen:
                seen.add(o.pid)
                out.append(o)
    return out


def _may_be(o: Owner, exes: frozenset[str], names: frozenset[str], proc: str) -> bool:
    """False only where recognise() must return None whatever the rest of exe_facts says: a
    Recognised needs the image to be one of ``exes`` (trust_problem), a Lookalike the name or
    the command's basename to be one of ``names``. Saves the stat and the status read of every
    other owner (a forked server has hundreds)."""
    if o.name in names or (o.cmdline and o.cmdline[0].rsplit("/", 1)[-1].split(":")[0] in names):
        return True
    try:
        exe = os.readlink(f"{proc}/{o.pid}/exe")
    except OSError:
        return False  # unreadable: trust_problem refuses it, and it is not named like one
    return exe.removesuffix(" (deleted)") in exes


def recognise_nodeports(port: int, proto: Proto) -> tuple[Recognised, ...]:
    """kube-proxy NodePorts: rules of KUBE-NODEPORTS that capture the port (iptables-save)."""
    from rebind.kernel.containers import captures_for
    from rebind.model.wellknown import recognise_nat

    out = []
    for c in captures_for(port, proto.value, None):
        got = recognise_nat(catalogue(), c.chain.value, c.comment, port, proto)
        if got is not None:
            out.append(got)
    return tuple(out)


def findings(entries: Sequence[SocketEntry], port: int, proto: Proto, *, nat: bool = True) -> Findings:
    """What `why PORT` adds: localhost split-brain (TCP) and well-known holders (or NodePorts when
    no socket holds the port: kube-proxy in iptables mode holds none)."""
    from rebind.kernel.resolver import localhost_resolution

    split = find_split(port, entries, localhost_resolution(port)) if proto is Proto.TCP else None
    holders, fakes = recognise_holders(entries, port, proto)
    if nat and not holders and not _holding(entries, port):
        holders = recognise_nodeports(port, proto)
    return Findings(split, holders, fakes)


def _holding(entries: Sequence[SocketEntry], port: int) -> bool:
    """A socket that holds the port itself (so no NAT rule is what takes it)."""
    return any(
        e.socket.state in (State.LISTEN, State.CLOSE, State.BOUND_INACTIVE) and e.socket.port == port
        for e in entries
    )
