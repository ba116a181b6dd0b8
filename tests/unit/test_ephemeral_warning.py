"""The server-side warning of issue 10 (C26): pure parts and the /proc gatherer on a fake root."""

from __future__ import annotations

from ipaddress import ip_address

from rebind.kernel.ephemeral import server_port_warnings
from rebind.model.ephemeral import parse_port_range, parse_reserved, server_ports_warning
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State


def test_parsers():
    assert parse_port_range("32768\t60999\n") == (32768, 60999)  # /proc separates with a tab
    assert parse_port_range("1024 2048") == (1024, 2048)
    assert parse_port_range("garbage") == (32768, 60999)
    assert parse_reserved("8080,9000-9002\n") == {8080, 9000, 9001, 9002}
    assert parse_reserved("") == frozenset() and parse_reserved("x,5") == {5}


def test_server_ports_warning_groups():
    assert server_ports_warning([8080], (32768, 60999)) is None
    one = server_ports_warning([40000, 8080], (32768, 60999))
    assert one is not None and "port 40000" in one
    many = server_ports_warning(range(40000, 40020), (32768, 60999), {40001}, limit=3)
    assert many is not None and "40000, 40002, 40003 and 16 more" in many


def _rec(port: int, state: State, proto: Proto = Proto.TCP, rport: int = 0) -> SocketRecord:
    return SocketRecord(
        proto,
        Family.INET,
        state,
        Endpoint(ip_address("127.0.0.1"), port),
        Endpoint(ip_address("0.0.0.0"), rport),
        0,
        1,
    )


def test_gatherer_reads_this_namespace(tmp_path):
    d = tmp_path / "sys" / "net" / "ipv4"
    d.mkdir(parents=True)
    (d / "ip_local_port_range").write_text("40000\t40100\n")
    (d / "ip_local_reserved_ports").write_text("40001\n")
    recs = [
        _rec(40000, State.LISTEN),
        _rec(40001, State.LISTEN),  # reserved
        _rec(40002, State.ESTABLISHED, rport=80),  # a client: not a server port
        _rec(40003, State.CLOSE, Proto.UDP),
    ]
    (w,) = server_port_warnings(recs, root=str(tmp_path))
    # The named ports are the unreserved ones; the fix line merges them with what is reserved now.
    named = w.split(" lie inside")[0]
    assert "40000, 40003" in named and "40001" not in named and "40002" not in named
    assert "ip_local_reserved_ports=40000-40001,40003" in w
    assert server_port_warnings(recs[1:3], root=str(tmp_path)) == ()
