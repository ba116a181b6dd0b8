"""`rebind demo`: the origin post replayed with real processes, and what rebind says at each step.

Runs in a private network namespace, so nothing on the machine can collide with it and nothing
leaks out. Where namespaces are not permitted, it uses free high ports on 127.0.0.1 instead.
The 60 s TIME_WAIT is never waited out: leftovers are removed with SOCK_DESTROY (Linux 6.0+), or,
without CAP_NET_ADMIN, each step takes a fresh port.

Rooms: ``stage.py`` (narration and plumbing), ``server.py`` (the post's server story, and its
``--trace`` variant), ``client.py`` (``--client``: the client half).
"""

from __future__ import annotations

from rebind.demo.client import run_client_demo
from rebind.demo.server import run_demo, run_trace_demo

__all__ = ["run_client_demo", "run_demo", "run_trace_demo"]
