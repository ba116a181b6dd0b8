"""`rebind wait` / rebind.wait_* across real TIME_WAIT and orphan FIN_WAIT2 sockets."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from ipaddress import IPv6Address

import pytest

from rebind.actions.wait import (
    NotWaitable,
    wait_bindable,
    wait_bindable_async,
    wait_listening,
    wait_listening_async,
)
from rebind.kernel.diag import destroy, iter_sockets
from rebind.model.records import State
from tests.kernel.helpers import LISTEN, TIME_WAIT


def _orphan_fin_wait2(port: int) -> socket.socket:
    """Server closes first, client never does: an orphan FIN_WAIT2 mini-socket on the port.

    Its timer is tcp_fin_timeout (per netns; set to 1 s here) instead of TIME_WAIT's 60 s timer (TCP_TIMEWAIT_LEN).
    Returns the client socket, which the caller closes.
    """
    with open("/proc/sys/net/ipv4/tcp_fin_timeout", "w") as f:
        f.write("1\n")
    srv = socket.create_server(("127.0.0.1", port))
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()
    acc.close()
    srv.close()
    # The server end passes FIN_WAIT1 before the peer's ACK turns it into the timed mini-socket;
    # on a loaded machine that can take a moment, so wait for the state the tests are about.
    for _ in range(200):
        if any(r.is_mini for r in iter_sockets(ports=[port], states=[State.FIN_WAIT2])):
            break
        time.sleep(0.005)
    return cli


def _env() -> dict[str, str]:
    import os

    e = dict(os.environ)
    e.update(NO_COLOR="1", COLUMNS="200")
    return e


def test_wait_across_orphan_fin_wait2_follows_its_timer(netns, procs):
    cli = _orphan_fin_wait2(18300)
    try:
        seen: list[int | None] = []
        res = wait_bindable(18300, timeout=30, on_progress=lambda d, _t: seen.append(d.frees_in_ms))
        assert res.ok and res.trial is not None and res.trial.ok
        # Progress was driven by the blocker's own timer (no live holder). The last report may
        # come after the timer fired: the trial bind still failed, and by the time the table was
        # read the leftover was gone (None: nothing timed left) -- a race, not a live holder.
        assert seen and all(ms is not None for ms in seen[:-1]) and seen[0] is not None, seen
    finally:
        cli.close()


def test_async_wait_across_orphan_fin_wait2(netns, procs):
    cli = _orphan_fin_wait2(18301)
    try:
        res = asyncio.run(wait_bindable_async(18301, timeout=30))
        assert res.ok
    finally:
        cli.close()


def test_cli_wait_across_time_wait_destroyed_meanwhile(netns, procs):
    p = procs.python(TIME_WAIT.format(port=18302, opts=""))
    procs.wait_line(p)
    w = procs.start(
        [sys.executable, "-m", "rebind", "wait", "18302", "--timeout", "50"],
        env=_env(),
        stdin=subprocess.DEVNULL,
    )
    assert w.stderr is not None
    line = w.stderr.readline()  # printed once the first trial bind has failed
    assert line.startswith("waiting for 0.0.0.0:18302/tcp:") and "TIME_WAIT" in line, line
    [tw] = [r for r in iter_sockets(ports=[18302]) if r.state is State.TIME_WAIT]
    destroy(tw)  # the same SOCK_DESTROY `rebind free` uses; 60 s would be too slow for a test
    out, err = w.communicate(timeout=20)
    assert w.returncode == 0, err
    assert out.startswith("0.0.0.0:18302/tcp is bindable")


def test_cli_wait_times_out_with_the_remaining_blockers(netns, procs, rebind_cli):
    p = procs.python(LISTEN.format(opts="", addr="0.0.0.0", port=18303))
    procs.wait_line(p)
    res = rebind_cli("wait", "18303", "--timeout", "0.3")
    assert res.returncode == 1
    assert "timed out" in res.stderr and "LISTEN 0.0.0.0:18303" in res.stderr and f"[{p.pid}]" in res.stderr
    quiet = rebind_cli("wait", "18303", "--timeout", "0", "--quiet")
    assert quiet.returncode == 1 and quiet.stdout == "" and quiet.stderr == ""
    # Another address that does not overlap is bindable right away.
    assert rebind_cli("wait", "18303", "--addr", "::", "--v6only", "--quiet").returncode == 0


def test_wait_fails_fast_when_waiting_cannot_help(netns, procs, rebind_cli):
    # A v4-mapped address on an IPv6-only socket: EINVAL now and forever (bind-rules.md 3).
    with pytest.raises(NotWaitable):
        wait_bindable(18304, addr="::ffff:127.0.0.1", v6only=True, timeout=5)
    res = rebind_cli("wait", "[::ffff:127.0.0.1]:18304", "--v6only", "--timeout", "5")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "Errno 22" in res.stderr


def test_until_listening_sees_an_ipv6_only_server(netns, procs):
    w = procs.start(
        [sys.executable, "-m", "rebind", "wait", "18305", "--until-listening", "--timeout", "50"],
        env=_env(),
        stdin=subprocess.DEVNULL,
    )
    assert w.stderr is not None
    assert "waiting for something to accept connections" in w.stderr.readline()
    v6 = "import socket, time\ns = socket.create_server(('::1', 18305), family=socket.AF_INET6)\n"
    srv = procs.python(v6 + "print('ready', flush=True)\ntime.sleep(600)\n")
    procs.wait_line(srv)
    out, err = w.communicate(timeout=20)
    assert w.returncode == 0, err
    assert out.strip() == "::1 port 18305 is accepting connections"


def test_until_listening_api_and_async(netns, procs):
    assert not wait_listening(18306, timeout=0).ok
    srv = socket.create_server(("127.0.0.1", 18306))
    try:
        res = wait_listening(18306, timeout=10)
        assert res.ok and str(res.answered) == "127.0.0.1"
        ares = asyncio.run(wait_listening_async(18306, timeout=10))
        assert ares.ok and str(ares.answered) == "127.0.0.1"
        assert not asyncio.run(wait_listening_async(18306, addr=IPv6Address("::1"), timeout=0)).ok
    finally:
        srv.close()


def test_until_listening_udp(netns, procs):
    assert not wait_listening(18307, proto="udp", timeout=0).ok
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("0.0.0.0", 18307))
        res = wait_listening(18307, proto="udp", timeout=5)
        assert res.ok and str(res.answered) == "127.0.0.1"
    finally:
        u.close()


def test_until_listening_keeps_a_link_local_scope(netns, rebind_cli):
    """The request keeps a link-local address's scope as its ifindex; --until-listening puts it
    back on the address it hands wait_listening, which refuses a scope (one line, exit 2) as it
    did before the request existed, instead of connecting to an unscoped fe80::1 until the
    timeout (EINVAL each time)."""
    res = rebind_cli("wait", "18308", "--addr", "fe80::1%lo", "--until-listening", "--timeout", "3")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "'fe80::1%lo': a scope id is not accepted here" in res.stderr.splitlines()[-1]
