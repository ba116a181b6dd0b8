"""pytest plugin: the `free_port` fixture (see rebind.actions.pick).

Opt-in (installing rebind registers nothing in other projects' test runs): enable it in your
top-level ``conftest.py``::

    pytest_plugins = ["rebind.pytest_plugin"]

or on the command line with ``pytest -p rebind.pytest_plugin``, then::

    def test_server(free_port):
        server = start_server(port=free_port)

The port is bindable on every address (TCP, 0.0.0.0 and [::]) when the test starts, lies
outside ip_local_port_range (no outgoing connection will take it), and concurrent workers
(pytest-xdist) get different ports through the picker's leases. When the range leaves no such
port (ip_local_port_range 1024-65535), the fixture still yields one, from pick_port's
fallbacks, and a PortRiskWarning in pytest's summary says why it is at risk.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port that is free now and safe from ephemeral use."""
    from rebind.actions.pick import pick_port

    return pick_port().port
