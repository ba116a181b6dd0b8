"""What the actions share: the address spelling of their keyword APIs (``pick``, ``wait``).

Bind requests are built in one place, :func:`rebind.diagnosis.default_request`; addresses are
parsed in one place, ``model/addr.py``; sockets and owners become text in one place each,
``model.records.socket_label`` and ``owner_label``.
"""

from __future__ import annotations

from rebind.model.addr import AddrLike, IPAddress, parse_ip
from rebind.model.request import parse_proto

__all__ = ["AddrLike", "IPAddress", "parse_addr", "parse_proto"]


def parse_addr(addr: AddrLike | None) -> IPAddress | None:
    return None if addr is None else parse_ip(addr, wildcard=True)
