"""`rebind wait|free|pick` from the command line: bad input, confirmation, dry runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.helpers import LISTEN, TIME_WAIT

BAD = [
    ("wait", "abc"),
    ("wait", "70000"),
    ("wait", "8080", "--timeout", "-1"),
    ("wait", "8080", "--addr", "nope"),
    ("wait", "127.0.0.1:8080", "--v6only"),
    ("wait", "127.0.0.1:8080", "--addr", "127.0.0.2"),
    ("wait", "8080", "--until-listening", "--reuseaddr"),
    ("free", "0"),
    ("free", "8080", "--signal", "FOO"),
    ("free", "8080", "--grace", "-1"),
    ("free",),
    ("pick", "--range", "30-20"),
    ("pick", "--range", "abc"),
    ("pick", "--range", "1-70000"),
    ("pick", "--udp", "--both"),
    ("pick", "--hold", "0"),
    ("pick", "--v6only"),
    ("pick", "--addr", "127.0.0.1", "--v6only"),
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_one_line_and_exit_2(netns, procs, rebind_cli, args):
    res = rebind_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rebind: error:"), res.stderr


def test_free_refuses_without_terminal_or_yes(netns, procs, rebind_cli):
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18400))
    procs.wait_line(p)
    res = rebind_cli("free", "18400")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "--yes" in res.stderr
    assert p.poll() is None


def test_free_dry_run_prints_the_plan_and_does_nothing(netns, procs, rebind_cli):
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18401))
    procs.wait_line(p)
    t = procs.python(SRV_TW)
    procs.wait_line(t)
    res = rebind_cli("free", "18401", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "stop     python" in res.stdout and f"[{p.pid}]" in res.stdout
    assert "SIGTERM, SIGKILL after 5s" in res.stdout
    assert "destroy  tcp TIME_WAIT 127.0.0.2:18401" in res.stdout
    assert p.poll() is None


# A TIME_WAIT on 127.0.0.2 (its own address, so the listener on 127.0.0.1 can coexist).
SRV_TW = TIME_WAIT.format(port=18401, opts="").replace("'127.0.0.1'", "'127.0.0.2'")


def test_free_yes_stops_holder_and_destroys_time_wait(netns, procs, rebind_cli):
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18402))
    procs.wait_line(p)
    t = procs.python(TIME_WAIT.format(port=18402, opts="").replace("'127.0.0.1'", "'127.0.0.2'"))
    procs.wait_line(t)
    res = rebind_cli("free", "18402", "--yes", "--grace", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sent SIGTERM to python" in res.stdout and "destroyed tcp TIME_WAIT 127.0.0.2:18402" in res.stdout
    assert "0.0.0.0:18402/tcp is bindable now" in res.stdout
    assert p.wait(5) == -15
    again = rebind_cli("free", "18402")
    assert again.returncode == 0 and "already bindable" in again.stdout


def test_free_refuses_its_own_ancestor(netns, procs, rebind_cli):
    import os
    import socket

    srv = socket.create_server(("127.0.0.1", 18403))  # held by pytest: rebind's parent
    try:
        res = rebind_cli("free", "18403", "--yes")
        assert res.returncode == 5  # refused (documented in docs/actions.md)
        assert f"[{os.getpid()}]" in res.stdout and "ancestor of rebind" in res.stdout
        assert "nothing done" in res.stderr
    finally:
        srv.close()


def test_pick_prints_one_port(netns, procs, rebind_cli, tmp_path):
    res = rebind_cli("pick", "--both", env={"REBIND_PICK_LEASES": str(tmp_path / "l")})
    assert res.returncode == 0, res.stderr
    port = int(res.stdout)
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert 10000 <= port <= 65535 and not lo <= port <= hi


def test_wait_help_does_not_promise_a_fixed_time_wait(rebind_cli):
    """TIME_WAIT's timer is 60 s, but the port can free earlier (reuse, SOCK_DESTROY, RST) or
    later (a retransmitted FIN re-arms it): the help says so, and that no --timeout = no limit."""
    text = " ".join(rebind_cli("wait", "--help").stdout.split())
    assert "TIME_WAIT lasts" not in text and "fixed 60" not in text
    assert "can free earlier" in text and "Default: wait without limit" in text
    doc = " ".join((Path(__file__).resolve().parents[2] / "docs" / "actions.md").read_text().split())
    assert "fixed 60" not in doc and "**earlier**" in doc and "**later**" in doc
