"""`rebind why --connect`: exit codes, one-line errors, JSON as documented, hostile text escaped."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

DOC = (Path(__file__).resolve().parents[2] / "docs" / "json.md").read_text()


def fields(section: str) -> set[str]:
    m = re.search(rf"^#+ {re.escape(section)}\n(.*?)(?=^#|\Z)", DOC, re.S | re.M)
    assert m, section
    return set(re.findall(r"^\| `(\w+)` \|", m.group(1), re.M))


def set_range(lo: int, hi: int) -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{lo} {hi}")


def test_bad_input_is_one_line_exit_2(rebind_cli):
    for args in (
        ["why", "--connect", "127.0.0.1:99999"],
        ["why", "--connect", "127.0.0.1"],
        ["why", "--connect", "127.0.0.1:²"],
        ["why", "--connect", "0.0.0.0:80"],
        ["why", "--connect", "::1:80"],
        ["why", "--connect", "127.0.0.1:80", "--from", "::1"],
        ["why", "--connect", "127.0.0.1:80", "8080"],
        ["why", "--connect", "bad host name:80"],
        ["why"],
    ):
        res = rebind_cli(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert "Traceback" not in res.stderr


def test_exit_codes_and_json(netns, rebind_cli, procs):
    set_range(40000, 40003)
    srv = socket.create_server(("127.0.0.1", 9000))
    # A client process named with a terminal escape holds the whole range to 127.0.0.1:9000.
    code = (
        "import socket, sys, time\n"
        "cs = [socket.create_connection(('127.0.0.1', 9000)) for _ in range(4)]\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = procs.start([sys.executable, "-u", "-c", code, "\x1b[2Jevil"])
    assert procs.wait_line(p) == "ready"
    try:
        res = rebind_cli("why", "--connect", "127.0.0.1:9000", "--json")
        assert res.returncode == 1, res.stderr
        doc = json.loads(res.stdout)
        assert set(doc) == fields("connect: top level")
        assert set(doc["request"]) == fields("connect request")
        assert set(doc["settings"]) == fields("connect settings")
        assert set(doc["range"]) == fields("connect range")
        assert set(doc["consumers"][0]) == fields("connect consumer")
        assert set(doc["capacity"]) == fields("connect capacity")
        assert set(doc["fixes"][0]) == fields("connect fix")
        assert doc["errno"] == "EADDRNOTAVAIL" and doc["range"]["usable"] == 0
        assert doc["consumers"][0]["pid"] == p.pid and doc["consumers"][0]["to_destination"] == 4
        assert "\x1b" not in res.stdout and doc["probe"] == {"sent": False}
        assert doc["consumers"][0]["cmdline"][-1] == "\\x1b[2Jevil"

        res = rebind_cli("why", "--connect", "127.0.0.1:9000", "--probe")
        assert res.returncode == 1
        assert "EADDRNOTAVAIL" in res.stdout and "SO_LINGER 0" in res.stdout
        assert "\x1b" not in res.stdout
        assert "DISAGREEMENT" not in res.stdout

        # Another destination shares the ports if connect() chose them: the kernel's bind
        # buckets say so (BPF iterator, as root); without them inet_diag cannot show it, so the
        # model answers the worst case (issue 17) and the probe the real one.
        res = rebind_cli("why", "--connect", "127.0.0.1:9001", env={"REBIND_NO_BPF": "1"})
        assert res.returncode == 1, res.stdout
        assert "may fail" in res.stdout and "worst case" in res.stdout and "worst case" in res.stderr
        res = rebind_cli("why", "--connect", "127.0.0.1:9001", "--probe", env={"REBIND_NO_BPF": "1"})
        assert res.returncode == 0 and "got local port" in res.stdout, res.stdout
        res = rebind_cli("why", "--connect", "127.0.0.1:9001")
        if "worst case" not in res.stderr:  # the iterator ran
            assert res.returncode == 0 and "would get a local port" in res.stdout, res.stdout

        res = rebind_cli("why", "--connect", "127.0.0.1:9001", "--bind-before-connect", "--from", "127.0.0.1")
        assert res.returncode == 1 and "EADDRINUSE" in res.stdout and "IP_BIND_ADDRESS_NO_PORT" in res.stdout

        # A fixed port on another source: no overlap with 127.0.0.1's sockets, another 4-tuple.
        res = rebind_cli(
            "why", "--connect", "localhost:9000", "--from", "127.0.0.2:40001", "--probe", "--json"
        )
        doc = json.loads(res.stdout)
        assert res.returncode == 0 and doc["ok"] and doc["probe"]["agrees_with_model"] is True
        assert doc["request"]["local_port"] == 40001 and doc["fixes"][0]["title"].startswith("Never bind")
    finally:
        srv.close()


def test_ls_warns_about_server_ports_in_the_ephemeral_range(netns, rebind_cli):
    set_range(40000, 40100)
    inside = socket.create_server(("127.0.0.1", 40050))
    outside = socket.create_server(("127.0.0.1", 8080))
    try:
        res = rebind_cli("ls")
        assert res.returncode == 0 and "port 40050 lies inside the ephemeral range 40000-40100" in res.stderr
        res = rebind_cli("ls", "8080", "--json")
        assert json.loads(res.stdout)["warnings"] == []
        with open("/proc/sys/net/ipv4/ip_local_reserved_ports", "w") as f:
            f.write("40050")
        assert "ephemeral" not in rebind_cli("ls").stderr
    finally:
        inside.close()
        outside.close()
