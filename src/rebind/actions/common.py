"""What the actions share: one validated bind request, the trial bind, and socket wording."""

from __future__ import annotations

import errno

from rebind.errors import UsageError
from rebind.kernel.request import bind_request as bind_request  # its home: kernel/request.py
from rebind.kernel.request import ifindex_of as ifindex_of
from rebind.kernel.trial import TrialResult, try_request
from rebind.model.addr import AddrLike, IPAddress, parse_ip
from rebind.model.records import Proto, SocketRecord
from rebind.model.request import BindRequest, parse_proto
from rebind.model.validate import parse_port

__all__ = [
    "TRANSIENT_ERRNOS",
    "AddrLike",
    "IPAddress",
    "as_request",
    "bind_request",
    "parse_addr",
    "parse_proto",
    "try_bind",
    "where",
]
from rebind.model.records import owner_label as owner_label  # the one owner label (escapes hostile names)

#: bind() errors that can go away by themselves: a holder leaves (EADDRINUSE), or an address
#: finishes IPv6 duplicate address detection or gets configured (EADDRNOTAVAIL).
TRANSIENT_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


def parse_addr(addr: AddrLike | None) -> IPAddress | None:
    return None if addr is None else parse_ip(addr, wildcard=True)


def check_port(port: int) -> int:
    return parse_port(port)


def as_request(
    port: int | str | BindRequest,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
) -> BindRequest:
    """A :class:`BindRequest` given where a port is accepted passes through (then the options
    must be left alone: they are the request's); a port is built into one by
    :func:`bind_request`. Lets the public functions take a request (``wait_bindable(req)``,
    ``plan_free(req)``) while keeping their keyword form."""
    if not isinstance(port, BindRequest):
        return bind_request(
            port, addr=addr, proto=proto, reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only
        )
    if (addr, proto, reuseaddr, reuseport, v6only) != (None, Proto.TCP, False, False, None):
        raise UsageError("give either a BindRequest or a port with options, not both")
    return port


def try_bind(req: BindRequest) -> TrialResult:
    return try_request(req)


def where(req: BindRequest) -> str:
    """``0.0.0.0:8080/tcp`` (IPv6 in brackets)."""
    return req.where


def socket_label(r: SocketRecord) -> str:
    remote = "" if r.remote.port == 0 and r.remote.addr.is_unspecified else f" -> {r.remote}"
    return f"{r.proto.value} {r.state.label} {r.local}{remote}"
