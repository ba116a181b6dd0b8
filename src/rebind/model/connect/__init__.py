"""The client half of a port's life (pure): will connect() to HOST:PORT get a local port now?

Spec: docs/connect-rules.md (rules C1–C26, checked on Linux 6.18). The decision procedure of
its §0.2 (TCP) and §0.3 (UDP), with the range accounting `rebind why --connect` prints:

* the effective range: ``ip_local_port_range``, narrowed by a per-socket ``IP_LOCAL_PORT_RANGE``
  (C3), minus ``ip_local_reserved_ports`` (C2);
* bind(ip, 0) before connect() without IP_BIND_ADDRESS_NO_PORT needs a port no socket of any
  state overlaps on that address (``inet_csk_find_open_port``, C13) -> EADDRINUSE from bind();
* connect()'s own choice (``__inet_hash_connect``): a port is usable when nobody uses it, or its
  bind bucket is connect-only (no socket on it got the port from bind(): C6/C7) and the 4-tuple
  is free or held by a time-wait entry ``tcp_twsk_unique`` lets it take over (C8, C9);
* a socket that already has a port (fixed port) only checks its 4-tuple (C17);
* UDP autobind shares nothing by destination (``udp_lib_get_port``, C20–C23) -> EAGAIN.

Nothing here does I/O; :mod:`rebind.kernel.connect_facts` gathers the facts, and
:mod:`rebind.render.connect` renders the result as JSON (schema ``rebind.connect/1``).

Rooms: ``request`` (ConnectRequest, its addresses), ``facts`` (PortHolder, RangeBuckets, ConnectSettings),
``outcome`` (verdict, PortUse, accounting/capacity/fix records, ConnectResult), ``rules``
(effective range, 4-tuples, address overlap, PortMap, per-port classification), ``tw``
(TIME_WAIT takeover), ``modes`` (each way a client gets its port), ``accounting`` (the range,
consumers, capacity), ``fixes`` (ranked fixes, the widened range), ``evaluate``
(``evaluate_connect``). The names other modules use are importable from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rebind.model.addr import parse_source, parse_target
    from rebind.model.connect.evaluate import evaluate_connect
    from rebind.model.connect.facts import (
        TIME_WAIT_MS,
        ConnectSettings,
        PortHolder,
        RangeBuckets,
        summary_suffices,
    )
    from rebind.model.connect.fixes import widened_range
    from rebind.model.connect.outcome import (
        Accounting,
        Capacity,
        ConnectOutcome,
        ConnectResult,
        Consumer,
        Fix,
        PortUse,
        Stage,
        TimeWaitInfo,
        Verdict,
    )
    from rebind.model.connect.request import ConnectRequest, fmt_endpoint
    from rebind.model.connect.rules import effective_range
    from rebind.model.ephemeral import ephemeral_overlap_warning

#: Where each public name lives. The package imports nothing until a name is asked for: the
#: `why --connect` prefetch thread needs the request alone before its first kernel call, not
#: the whole model and the bind model behind it (docs/benchmarks.md, 2026-12-06).
_HOME = {
    "parse_source": "rebind.model.addr",
    "parse_target": "rebind.model.addr",
    "evaluate_connect": "rebind.model.connect.evaluate",
    "TIME_WAIT_MS": "rebind.model.connect.facts",
    "ConnectSettings": "rebind.model.connect.facts",
    "PortHolder": "rebind.model.connect.facts",
    "RangeBuckets": "rebind.model.connect.facts",
    "summary_suffices": "rebind.model.connect.facts",
    "widened_range": "rebind.model.connect.fixes",
    **dict.fromkeys(
        (
            "Accounting",
            "Capacity",
            "ConnectOutcome",
            "ConnectResult",
            "Consumer",
            "Fix",
            "PortUse",
            "Stage",
            "TimeWaitInfo",
            "Verdict",
        ),
        "rebind.model.connect.outcome",
    ),
    "ConnectRequest": "rebind.model.connect.request",
    "fmt_endpoint": "rebind.model.connect.request",
    "effective_range": "rebind.model.connect.rules",
    "ephemeral_overlap_warning": "rebind.model.ephemeral",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "TIME_WAIT_MS",
    "Accounting",
    "Capacity",
    "ConnectOutcome",
    "ConnectRequest",
    "ConnectResult",
    "ConnectSettings",
    "Consumer",
    "Fix",
    "PortHolder",
    "PortUse",
    "RangeBuckets",
    "Stage",
    "TimeWaitInfo",
    "Verdict",
    "effective_range",
    "ephemeral_overlap_warning",
    "evaluate_connect",
    "fmt_endpoint",
    "parse_source",
    "parse_target",
    "summary_suffices",
    "widened_range",
]
