"""The I/O parts of a bind request built from user input: interface names to their indexes in
this network namespace, and the caller's uid. The one constructor (``bind_request``) the CLI,
the Python API (``rebind.default_request``), the actions and top use; it lives in kernel/ so
that ``rebind.diagnosis`` reaches it without importing the actions (an import running back up).
"""

from __future__ import annotations

import os
import socket

from rebind.model.addr import AddrLike
from rebind.model.records import Proto
from rebind.model.request import BindRequest


def ifindex_of(name: str) -> int | None:
    """An interface name (or decimal index) in this netns to its ifindex; None if absent."""
    if name.isascii() and name.isdigit():
        index = int(name)
        try:
            socket.if_indextoname(index)
        except (OSError, OverflowError):
            return None
        return index
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def bind_request(
    port: int | str,
    *,
    addr: AddrLike | None = None,
    proto: Proto | str = Proto.TCP,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool | None = None,
    freebind: bool = False,
    device: str | None = None,
    uid: int | None = None,
) -> BindRequest:
    """The one constructor of bind requests from user input (CLI, API, actions); UsageError
    for every bad field. The socket's uid defaults to this process's (as its bind would be)."""
    return BindRequest.create(
        port,
        addr=addr,
        proto=proto,
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=v6only,
        freebind=freebind,
        device=device,
        uid=os.geteuid() if uid is None else uid,
        ifindex_of=ifindex_of,
    )
