"""How this host resolves ``localhost``: the system resolver's order and the /etc/hosts lines
that explain it, plus whether ::1 exists on lo (model/localhost.py decides the rest).

The order is the resolver's own answer (``getaddrinfo`` applies /etc/hosts, nsswitch, and the
RFC 6724 sorting of /etc/gai.conf): reading /etc/hosts alone would miss gai.conf and
nss-myhostname. The hosts lines are only the explanation shown to the user.
"""

from __future__ import annotations

import socket
from ipaddress import ip_address

from rebind.errors import UsageError
from rebind.model.addr import IPAddress, unbracket
from rebind.model.localhost import HostsLine, LocalhostResolution
from rebind.model.records import Family

HOSTS = "/etc/hosts"
#: /etc/hosts is a small file; a huge one (an ad-block list) is read only this far for the
#: explanation: the resolver's order above is what counts.
_MAX_HOSTS_BYTES = 1 << 20


def resolve_host(host: str, *, udp: bool = False, what: str = "") -> IPAddress:
    """HOST as a literal address, or a name resolved once: the resolver's first answer, as a
    connect() caller takes it (its scope id dropped). One UsageError line for every failure."""
    said = f"{what} {host!r}" if what else repr(host)
    text = unbracket(host)
    try:
        return ip_address(text)
    except ValueError:
        pass
    if not text or len(text) > 253 or any(c.isspace() or ord(c) < 32 for c in text):
        raise UsageError(f"{said} is not a host name or address")
    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"cannot resolve {said}: {exc}") from None
    if not infos:
        raise UsageError(f"cannot resolve {said}")
    return ip_address(str(infos[0][4][0]).split("%")[0])


def resolver_order(port: int, name: str = "localhost") -> tuple[Family, ...]:
    """Families in the order getaddrinfo(name, port, SOCK_STREAM) returns them (each once)."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return ()
    out: list[Family] = []
    for fam, *_ in infos:
        f = Family.INET if fam == socket.AF_INET else Family.INET6 if fam == socket.AF_INET6 else None
        if f is not None and f not in out:
            out.append(f)
    return tuple(out)


def hosts_lines(path: str = HOSTS, name: str = "localhost") -> tuple[HostsLine, ...]:
    """The lines of /etc/hosts that name ``name`` (comments stripped), in file order."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_HOSTS_BYTES)
    except OSError:
        return ()
    out = []
    for i, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        fields = raw.split("#", 1)[0].split()
        if len(fields) >= 2 and name in fields[1:]:
            out.append(HostsLine(i, fields[0], tuple(fields[1:])))
    return tuple(out)


def _ipv6_loopback(path: str = "/proc/net/if_inet6") -> bool:
    """::1 is configured in this namespace (IPv6 enabled and lo up with its address): read, not
    probed, so asking binds nothing (top and the exporter stay observer-free)."""
    try:
        with open(path) as f:
            return any(line.startswith("00000000000000000000000000000001 ") for line in f)
    except OSError:
        return False


def _lo_ifindex() -> int:
    try:
        return socket.if_nametoindex("lo")
    except OSError:
        return 1


def localhost_resolution(port: int) -> LocalhostResolution:
    return LocalhostResolution(
        order=resolver_order(port),
        hosts=hosts_lines(),
        ipv6_loopback=_ipv6_loopback(),
        lo_ifindex=_lo_ifindex(),
    )
