"""rebind: who holds a port, why bind() fails with EADDRINUSE, when it frees, and how to fix it.

``import rebind`` stays cheap: public names are resolved on first use through ``_LAZY``
(name -> module), so the CLI and scripts pay only for what they touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rebind._version import __version__

if TYPE_CHECKING:
    # actions API
    from rebind.actions.free import free, plan_free
    from rebind.actions.pick import pick_port
    from rebind.actions.wait import wait_bindable, wait_bindable_async, wait_listening, wait_listening_async
    # end actions API

if TYPE_CHECKING:
    # supervisor API
    from rebind.supervisor.listen import InheritedSocket as InheritedSocket
    from rebind.supervisor.listen import inherited_sockets as inherited_sockets
    from rebind.supervisor.listen import listen as listen
    from rebind.supervisor.listen import notify as notify
    from rebind.supervisor.listen import notify_ready as notify_ready
    from rebind.supervisor.listen import start_server as start_server
    # end supervisor API

_LAZY: dict[str, str] = {
    # actions API
    "wait_bindable": "rebind.actions.wait",
    "wait_listening": "rebind.actions.wait",
    "wait_bindable_async": "rebind.actions.wait",
    "wait_listening_async": "rebind.actions.wait",
    "free": "rebind.actions.free",
    "plan_free": "rebind.actions.free",
    "pick_port": "rebind.actions.pick",
    # end actions API
    # supervisor API
    "listen": "rebind.supervisor.listen",
    "start_server": "rebind.supervisor.listen",
    "inherited_sockets": "rebind.supervisor.listen",
    "InheritedSocket": "rebind.supervisor.listen",
    "notify": "rebind.supervisor.listen",
    "notify_ready": "rebind.supervisor.listen",
    # end supervisor API
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
