"""The one address parser: literal IP addresses, scope ids and ``HOST:PORT`` splitting. Pure.

Every value a user or an API caller gives as an address goes through here (the click parameter
types, ``BindRequest.create``, ``ConnectRequest``, ``--from``, ``--connect``, the exporter's
``--watch``/``--dest``/``--listen``, ``rebind run --listen``), so the same text means the same
thing everywhere and every mistake is one :class:`rebind.errors.UsageError` line (exit 2):

* brackets are optional around an address (``[::1]``) and required around an IPv6 address
  that is followed by a port (``[::1]:80``): ``::1:80`` is itself a valid IPv6 address, so
  guessing where the port starts would answer a different question;
* ``*`` and ``any`` mean the IPv4 wildcard where a wildcard makes sense;
* a scope id (``fe80::1%eth0``) is accepted only where the caller says so, only on IPv6 and
  only with an interface name after the ``%``.

Names (``localhost``) are not resolved here: that is I/O (``connect_diagnosis.resolve``).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal

from rebind.errors import UsageError
from rebind.model.validate import parse_port

IPAddress = IPv4Address | IPv6Address
AddrLike = str | IPv4Address | IPv6Address

WILDCARDS = frozenset({"*", "any"})
_EXAMPLE = "e.g. 127.0.0.1, 0.0.0.0, ::1, ::"


def _said(what: str, value: object) -> str:
    return f"{what} {value!r}" if what else repr(value)


def unbracket(text: str) -> str:
    """``[::1]`` -> ``::1``; anything else unchanged (after stripping white space)."""
    text = text.strip()
    return text[1:-1] if text.startswith("[") and text.endswith("]") else text


def parse_ip(value: AddrLike, *, what: str = "", wildcard: bool = False, scope: bool = False) -> IPAddress:
    """A literal IP address from text or an address object.

    ``wildcard``: ``*``/``any`` are 0.0.0.0. ``scope``: a ``%IFACE`` suffix is kept (as
    ``IPv6Address.scope_id``; :func:`split_scope` takes it apart), else it is a UsageError.
    """
    if isinstance(value, IPv4Address | IPv6Address):
        if not scope and isinstance(value, IPv6Address) and value.scope_id:
            raise UsageError(f"{_said(what, str(value))}: a scope id is not accepted here")
        return value
    text = unbracket(str(value))
    if wildcard and text in WILDCARDS:
        text = "0.0.0.0"
    host, sep, scope_id = text.partition("%")
    try:
        addr = ip_address(host)
    except ValueError:
        raise UsageError(f"{_said(what, value)} is not an IP address ({_EXAMPLE})") from None
    if not sep:
        return addr
    if not scope:
        raise UsageError(f"{_said(what, value)}: a scope id is not accepted here")
    if not scope_id or addr.version != 6:
        raise UsageError(
            f"{_said(what, value)}: a scope id (%IFACE) needs an IPv6 address and an interface name"
        )
    return IPv6Address(f"{addr}%{scope_id}")


def split_scope(value: AddrLike, *, what: str = "") -> tuple[IPAddress, str | None]:
    """``'fe80::1%eth0'`` -> (fe80::1, 'eth0'); brackets and ``*`` accepted; UsageError otherwise."""
    addr = parse_ip(value, what=what, wildcard=True, scope=True)
    if isinstance(addr, IPv6Address) and addr.scope_id:
        return IPv6Address(str(addr).split("%", 1)[0]), addr.scope_id
    return addr, None


Alone = Literal["port", "host", "guess"]


def split_host_port(text: str, *, what: str, alone: Alone = "port") -> tuple[str | None, str | None]:
    """``HOST:PORT``, ``[V6]:PORT``, ``[V6]``, or one part alone -> (host, port) as text.

    A part not given is None (``:PORT`` gives the host ``''``). ``alone`` says what a value
    without ``:`` is: the port, the host, or (``guess``) the port when it is ASCII digits.
    A bare IPv6 address is a host alone only when ``alone`` is ``host``; followed by a port
    it needs brackets. The parts are not validated: the caller parses them (:func:`parse_ip`,
    ``parse_port``, a resolver) and so words its own errors.
    """
    t = str(text).strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"{_said(what, text)}: bad bracketed IPv6 address (e.g. [::1]:8080)")
        return host, (rest[1:] if rest else None)
    if ":" not in t:
        as_port = alone == "port" or (alone == "guess" and t.isascii() and t.isdigit())
        return (None, t) if as_port else (t, None)
    host, _, port = t.rpartition(":")
    if ":" in host:
        if alone == "host":
            return t, None  # a bare IPv6 address (no port: that would need brackets)
        raise UsageError(f"{_said(what, text)}: write an IPv6 address in brackets, e.g. [::1]:8080")
    return host, port


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` of ``--connect`` (the host is not resolved here)."""
    host, port = split_host_port(text, what="--connect", alone="port")
    if not host or port is None:
        raise UsageError(f"{text!r} is not HOST:PORT")
    return host, parse_port(port, what="destination port")


def parse_source(text: str) -> tuple[IPAddress, int | None]:
    """``--from ADDR`` or ``--from ADDR:PORT`` (a fixed local port; 0: bind(ip, 0))."""
    host, port = split_host_port(text, what="--from", alone="host")
    addr = parse_ip(host or "", what="source address", scope=True)
    return addr, None if port is None else parse_port(port, what="local port", allow_zero=True)
