"""What the actions share: the address spelling of their keyword APIs (``pick``, ``wait``).

Bind requests are built in one place, :func:`rebind.diagnosis.default_request`; sockets and owners
become text in one place each, ``model.records.socket_label`` and ``owner_label``.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from rebind.errors import UsageError
from rebind.model.request import parse_proto, split_scope

__all__ = ["AddrLike", "IPAddress", "parse_addr", "parse_proto"]

IPAddress = IPv4Address | IPv6Address
AddrLike = str | IPAddress


def parse_addr(addr: AddrLike | None) -> IPAddress | None:
    if addr is None:
        return None
    a, scope = split_scope(addr)
    if scope:
        raise UsageError(f"{addr!r}: a scope id is not accepted here")
    return a
