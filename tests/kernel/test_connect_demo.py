"""`rebind demo --client` replays the client pitfalls for real, each step explained."""

from __future__ import annotations


def test_client_demo(rebind_cli, netns):
    res = rebind_cli("demo", "--client", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "second client: bind() works (SO_REUSEADDR), then connect: [Errno 99]" in out
    assert "connections, then: [Errno 99] Cannot assign requested address" in out
    assert out.count("$ rebind why --connect") >= 5
    assert (
        "would fail with EADDRINUSE" in out
        and "IP_BIND_ADDRESS_NO_PORT + bind(127.0.0.1, 0) + connect(): local port" in out
    )
    assert "\x1b[" not in out
