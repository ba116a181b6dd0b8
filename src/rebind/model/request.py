"""The questions rebind answers, as validated values. Pure: no I/O.

A question is one frozen request. ``BindRequest`` asks "would this bind() (and listen()) work?";
a ``ConnectRequest`` (client side, ``rebind why --connect``) sits beside it in its own module.
Every bad field raises :class:`rebind.errors.UsageError` here, once, whoever builds the request
(the CLI's shared options, the Python API, the actions): ``BindRequest(...)`` validates in
``__post_init__`` and :meth:`BindRequest.create` parses user input (strings, scope ids).
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rebind.errors import UsageError
from rebind.model.addr import AddrLike, split_scope
from rebind.model.records import IPAddress, Proto
from rebind.model.validate import parse_port

__all__ = ["AddrLike", "BindRequest", "IfindexOf", "TrialResult", "parse_proto", "split_scope"]

#: An interface name (or decimal index) to its ifindex; None when there is no such interface.
IfindexOf = Callable[[str], int | None]


def parse_proto(proto: Proto | str) -> Proto:
    try:
        return proto if isinstance(proto, Proto) else Proto(str(proto).lower())
    except ValueError:
        raise UsageError(f"unknown protocol {proto!r} (tcp or udp)") from None


@dataclass(frozen=True, slots=True)
class BindRequest:
    """One bind() the user asks about, with every option that changes the kernel's answer."""

    proto: Proto
    addr: IPAddress
    port: int
    reuseaddr: bool = False
    reuseport: bool = False
    #: None: the sysctl default (net.ipv6.bindv6only); ignored for IPv4.
    v6only: bool | None = None
    #: sk_bound_dev_if after bind(): SO_BINDTODEVICE, or the scope id of a link-local IPv6
    #: address, which overrides SO_BINDTODEVICE (__inet6_bind). What the model compares.
    ifindex: int = 0
    #: The socket's uid (sk_uid, fixed at socket() time): what the SO_REUSEPORT check compares.
    uid: int = 0
    #: TCP: whether listen() will follow (the kernel checks conflicts again there).
    listen: bool = True
    #: IP_FREEBIND / IPV6_FREEBIND: bind an address this host does not have (yet).
    freebind: bool = False
    #: SO_BINDTODEVICE set before bind() when a scope id then overrides it (0 otherwise): only
    #: the trial bind needs it, to set up its socket exactly as the user's.
    bindtodevice: int = 0

    def __post_init__(self) -> None:
        # Cheap checks on every construction (dataclasses.replace included): a request that
        # cannot be encoded never reaches the model or a socket call (struct.error, OverflowError).
        if not isinstance(self.proto, Proto):
            raise UsageError(f"unknown protocol {self.proto!r} (tcp or udp)")
        if not isinstance(self.addr, IPv4Address | IPv6Address):
            raise UsageError(f"{self.addr!r} is not an IP address")
        if isinstance(self.addr, IPv6Address) and self.addr.scope_id:
            raise UsageError(f"{self.addr}: give the scope as ifindex, not inside the address")
        parse_port(self.port, allow_zero=True)
        for name in ("ifindex", "uid", "bindtodevice"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise UsageError(f"{name} {value!r} is out of range (0-4294967295)")

    @classmethod
    def create(
        cls,
        port: int | str,
        *,
        addr: AddrLike | None = None,
        proto: Proto | str = Proto.TCP,
        reuseaddr: bool = False,
        reuseport: bool = False,
        v6only: bool | None = None,
        freebind: bool = False,
        device: str | None = None,
        uid: int = 0,
        listen: bool | None = None,
        ifindex_of: IfindexOf | None = None,
    ) -> BindRequest:
        """The one constructor from user input; UsageError for every bad field.

        ``addr`` may carry a scope (``fe80::1%eth0``); ``device`` is SO_BINDTODEVICE. Both are
        resolved with ``ifindex_of`` (the I/O layer passes if_nametoindex). ``v6only`` without an
        address means ``[::]``. ``listen`` defaults to True for TCP.
        """
        p = parse_proto(proto)
        if device is not None and not isinstance(device, str):
            raise UsageError(f"device must be an interface name (a string), not {device!r}")
        a, scope = split_scope(addr) if addr is not None else (None, None)
        if v6only is not None and a is None:
            a = IPv6Address("::")
        if v6only is not None and a is not None and a.version != 6:
            raise UsageError("v6only needs an IPv6 address (e.g. ::)")
        if scope is not None and not (isinstance(a, IPv6Address) and a.is_link_local):
            raise UsageError(f"{a}%{scope}: a scope id is only meaningful on a link-local address")
        scope_index = _resolve(scope, ifindex_of) if scope is not None else 0
        device_index = _resolve(device, ifindex_of) if device is not None else 0
        # __inet6_bind: a link-local address's scope id overrides SO_BINDTODEVICE ("Override any
        # existing binding, if another one is supplied by user"): the scope id wins.
        ifindex = scope_index or device_index
        bindtodevice = device_index if scope_index and device_index != scope_index else 0
        return cls(
            proto=p,
            addr=a if a is not None else IPv4Address("0.0.0.0"),
            port=parse_port(port, allow_zero=True),
            reuseaddr=bool(reuseaddr),
            reuseport=bool(reuseport),
            v6only=v6only,
            ifindex=ifindex,
            uid=uid,
            listen=(p is Proto.TCP) if listen is None else bool(listen and p is Proto.TCP),
            freebind=bool(freebind),
            bindtodevice=bindtodevice,
        )

    @property
    def where(self) -> str:
        """``0.0.0.0:8080/tcp`` (IPv6 in brackets)."""
        host = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        return f"{host}:{self.port}/{self.proto.value}"


def _resolve(name: str, ifindex_of: IfindexOf | None) -> int:
    found = (
        ifindex_of(name)
        if ifindex_of is not None
        else (int(name) if name.isascii() and name.isdigit() else None)
    )
    if not found:
        raise UsageError(f"no network interface {name!r} here")
    return found


@dataclass(frozen=True, slots=True)
class TrialResult:
    """The kernel's answer to one trial bind: ok, or the errno."""

    ok: bool
    errno: int | None = None

    @property
    def error_name(self) -> str | None:
        return _errno.errorcode.get(self.errno, str(self.errno)) if self.errno else None

    def __str__(self) -> str:
        if self.ok:
            return "bind() succeeded"
        return f"bind() failed: [Errno {self.errno}] {os.strerror(self.errno or 0)}"
