"""`--listen [udp:][HOST:]PORT[/NAME]`: what `rebind run` binds once and hands to every generation."""

from __future__ import annotations

import string
from dataclasses import dataclass

from rebind.errors import UsageError
from rebind.model.addr import split_host_port
from rebind.model.validate import parse_port

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.@")
_EXAMPLE = "expected [udp:][HOST:]PORT[/NAME], e.g. 8080, 127.0.0.1:8080, [::1]:8080/web, udp:5353/dns"


@dataclass(frozen=True, slots=True)
class ListenSpec:
    host: str  # "" = every address (dual-stack [::] when IPv6 works, like systemd's ListenStream=PORT)
    port: int
    name: str
    proto: str = "tcp"  # "tcp" (a listening stream socket) or "udp" (a bound datagram socket)

    def __post_init__(self) -> None:
        # Built by the API too, not only by parse_listen: never let a wrapped port reach bind().
        parse_port(self.port, what=f"--listen {self.host}:{self.port!r}")
        if self.proto not in ("tcp", "udp"):
            raise UsageError(f"--listen: protocol {self.proto!r} is not tcp or udp")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else (self.host or "*")
        prefix = "udp:" if self.proto == "udp" else ""
        return f"{prefix}{host}:{self.port}/{self.name}"


def parse_listen(text: str, index: int = 0) -> ListenSpec:
    """Parse one --listen value; NAME defaults to ``listen<index>`` (goes into LISTEN_FDNAMES)."""
    raw = text.strip()
    proto = "tcp"
    for candidate in ("udp", "tcp"):
        if raw.lower().startswith(candidate + ":"):
            proto, raw = candidate, raw[len(candidate) + 1 :]
    body, _, name = raw.partition("/")
    if not name:
        name = f"listen{index}"
    # LISTEN_FDNAMES is ':'-separated; systemd limits names to printable ASCII without ':'.
    if len(name) > 255 or not set(name) <= _NAME_CHARS:
        raise UsageError(f"--listen {text!r}: name {name!r} must be letters, digits, '-', '_', '.', '@'")
    host, port_text = _split_host(body, text)
    if not port_text:
        raise UsageError(f"--listen {text!r}: no port ({_EXAMPLE})")
    try:
        port = parse_port(port_text, what=f"--listen {text!r}:")
    except UsageError as exc:
        raise UsageError(f"{exc} ({_EXAMPLE})") from None
    return ListenSpec(host, port, name, proto)


def _split_host(body: str, text: str) -> tuple[str, str]:
    host, port = split_host_port(body, what="--listen", alone="guess")
    if host is not None and port is not None and host == "*":
        host = ""
    return host or "", port or ""


def check_unique(specs: tuple[ListenSpec, ...]) -> None:
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"--listen: name {sorted(dup)[0]!r} is used twice")
    addrs = [(s.proto, s.host, s.port) for s in specs]
    if len(set(addrs)) != len(addrs):
        raise UsageError("--listen: the same address is given twice")
