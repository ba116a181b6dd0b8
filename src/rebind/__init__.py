"""rebind: who holds a port, why bind() fails with EADDRINUSE, when it frees, and how to fix it.

``import rebind`` stays cheap: public names are resolved on first use through ``_LAZY``
(name -> module), so the CLI and scripts pay only for what they touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rebind._version import __version__

if TYPE_CHECKING:  # for type checkers only; at run time names resolve lazily through _LAZY
    from rebind.actions.free import free as free
    from rebind.actions.free import plan_free as plan_free
    from rebind.actions.pick import pick_port as pick_port
    from rebind.actions.wait import wait_bindable as wait_bindable
    from rebind.actions.wait import wait_bindable_async as wait_bindable_async
    from rebind.actions.wait import wait_listening as wait_listening
    from rebind.actions.wait import wait_listening_async as wait_listening_async
    from rebind.diagnosis import default_request as default_request
    from rebind.diagnosis import diagnose as diagnose
    from rebind.sockets import socket_table as socket_table
    from rebind.supervisor.listen import InheritedSocket as InheritedSocket
    from rebind.supervisor.listen import inherited_sockets as inherited_sockets
    from rebind.supervisor.listen import listen as listen
    from rebind.supervisor.listen import notify as notify
    from rebind.supervisor.listen import notify_ready as notify_ready
    from rebind.supervisor.listen import start_server as start_server

_LAZY: dict[str, str] = {
    # the socket table and diagnosis
    "socket_table": "rebind.sockets",
    "diagnose": "rebind.diagnosis",
    "default_request": "rebind.diagnosis",
    # actions
    "wait_bindable": "rebind.actions.wait",
    "wait_listening": "rebind.actions.wait",
    "wait_bindable_async": "rebind.actions.wait",
    "wait_listening_async": "rebind.actions.wait",
    "free": "rebind.actions.free",
    "plan_free": "rebind.actions.free",
    "pick_port": "rebind.actions.pick",
    # supervisor
    "listen": "rebind.supervisor.listen",
    "start_server": "rebind.supervisor.listen",
    "inherited_sockets": "rebind.supervisor.listen",
    "InheritedSocket": "rebind.supervisor.listen",
    "notify": "rebind.supervisor.listen",
    "notify_ready": "rebind.supervisor.listen",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rebind' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
