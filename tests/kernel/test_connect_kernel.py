"""The client-side gatherer and CLI-free API in throwaway namespaces, with real sockets."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest

from rebind.connect_diagnosis import connect_diagnose, probe
from rebind.errors import EnvironmentProblem
from rebind.kernel import sysctl
from rebind.kernel.connect_facts import connect_settings, route_source
from rebind.model.connect import TIME_WAIT_MS, ConnectRequest, Stage, Verdict
from rebind.model.records import Proto


def write(name: str, value: str) -> None:
    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:
        f.write(value)


def test_sysctl_readers(netns):
    write("ip_local_port_range", "40000 40123")
    write("ip_local_reserved_ports", "40001,40010-40012")
    write("tcp_tw_reuse", "1")
    write("tcp_timestamps", "0")
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert "\t" in f.read()  # the reason read_port_range() splits on any whitespace
    assert sysctl.host_settings().port_range == (40000, 40123)
    assert sysctl.host_settings().reserved_ports == frozenset({40001, 40010, 40011, 40012})
    s = connect_settings()
    assert (s.tw_reuse, s.tcp_timestamps, s.port_range) == (1, 0, (40000, 40123))


def test_route_source_takes_no_udp_port(netns):
    """Regression: with every UDP port of the range taken, the route lookup still works (a UDP
    connect() would fail with EAGAIN, and would take a port when one is left)."""
    write("ip_local_port_range", "40000 40001")
    held = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in held:
        s.bind(("0.0.0.0", 0))
    try:
        assert route_source(IPv4Address("127.0.0.5"), 53) == IPv4Address("127.0.0.1")
        assert route_source(IPv6Address("::1"), 53) == IPv6Address("::1")
        assert route_source(IPv4Address("127.0.0.5"), 53, bound=IPv4Address("127.0.0.9")) == IPv4Address(
            "127.0.0.9"
        )
        with pytest.raises(EnvironmentProblem, match="no route"):
            route_source(IPv4Address("192.0.2.1"), 80)
    finally:
        for s in held:
            s.close()


def test_exhaustion_diagnosed_with_owners_and_probe(netns):
    write("ip_local_port_range", "40000 40003")
    srv = socket.create_server(("127.0.0.1", 9000))
    clients = [socket.create_connection(("127.0.0.1", 9000)) for _ in range(4)]
    try:
        d = connect_diagnose("127.0.0.1", 9000, with_probe=True)
        res = d.result
        assert res.outcome.verdict is Verdict.FAIL and res.outcome.errno_name == "EADDRNOTAVAIL"
        assert res.accounting.counts == {"in-use-to-destination": 4}
        assert res.consumers and res.consumers[0].to_destination == 4
        assert d.probe is not None and not d.probe.ok and d.probe.error_name == "EADDRNOTAVAIL"
        assert d.disagreement is None and not d.ok
        # Another destination shares the ports (C5): the kernel's bind buckets say connect()
        # chose them (BPF iterator); without it the model gives the worst case (may fail).
        d = connect_diagnose("127.0.0.1", 9001, with_probe=True)
        assert d.probe is not None and d.probe.ok and d.ok and d.disagreement is None
        if bpf_works():
            assert d.result.outcome.ok and d.result.accounting.counts == {"shared": 4}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REBIND_NO_BPF", "1")
            d = connect_diagnose("127.0.0.1", 9001, with_probe=True)
            assert d.result.outcome.verdict is Verdict.MAY_FAIL and d.result.accounting.usable_best == 4
            assert any("worst case" in w for w in d.warnings)
            assert d.probe is not None and d.probe.ok and d.ok and d.disagreement is None
        # bind(ip, 0) first: EADDRINUSE even towards the other destination (C13).
        d = connect_diagnose("127.0.0.1", 9001, source="127.0.0.1", bind_before_connect=True, with_probe=True)
        assert d.result.outcome.errno_name == "EADDRINUSE" and d.probe and d.probe.error_name == "EADDRINUSE"
        doc = d.json()
        assert doc["schema"] == "rebind.connect/1" and doc["probe"]["sent"] is True
    finally:
        for s in [*clients, srv]:
            s.close()


def test_probe_on_success_aborts_at_once(netns):
    srv = socket.create_server(("127.0.0.1", 9000))
    try:
        p = probe(ConnectRequest.create("127.0.0.1", 9000))
        assert p.ok and p.local_port
        srv.settimeout(2)
        conn, _ = srv.accept()  # the SYN was answered by the kernel; the RST came right after
        with conn:
            conn.settimeout(2)
            with pytest.raises((ConnectionResetError, TimeoutError)):
                while conn.recv(1):
                    pass
    finally:
        srv.close()


def bpf_works() -> bool:
    from rebind.kernel.bpf.sockiter import read_socket_states
    from rebind.model.sockstate import SockStates

    return isinstance(read_socket_states([9], [Proto.TCP]), SockStates)


def _real_bind(src: str, port: int = 0) -> int:
    """errno of a real bind(src, port) with IP_BIND_ADDRESS_NO_PORT (0: it worked)."""
    with socket.socket() as s:
        s.setsockopt(socket.IPPROTO_IP, 24, 1)
        try:
            s.bind((src, port))
        except OSError as exc:
            return exc.errno or -1
    return 0


def test_non_local_source_is_eaddrnotavail_like_the_kernel(netns):
    """Issue 17: `--from 10.99.0.1` (no such address here) said ok; the kernel refuses the bind."""
    import errno

    srv = socket.create_server(("127.0.0.1", 9000))
    try:
        for local_port in (None, 40000):
            d = connect_diagnose("127.0.0.1", 9000, source="10.99.0.1", local_port=local_port)
            o = d.result.outcome
            assert (o.verdict, o.errno_name, o.stage) == (Verdict.FAIL, "EADDRNOTAVAIL", Stage.BIND)
            assert "not local" in d.result.headline and not d.result.fixes
            assert _real_bind("10.99.0.1", local_port or 0) == errno.EADDRNOTAVAIL
        # ip_nonlocal_bind=1: the kernel binds it, and the model says so.
        write("ip_nonlocal_bind", "1")
        assert _real_bind("10.99.0.1") == 0
        d = connect_diagnose("127.0.0.1", 9000, source="10.99.0.1")
        assert d.result.outcome.errno_name != "EADDRNOTAVAIL" or d.result.outcome.stage is not Stage.BIND
        write("ip_nonlocal_bind", "0")
        # Once the address is configured it is local.
        import subprocess

        from tests.toolcheck import need_tool

        subprocess.run([need_tool("ip"), "addr", "add", "10.99.0.1/32", "dev", "lo"], check=True)
        assert _real_bind("10.99.0.1") == 0
        assert connect_diagnose("127.0.0.1", 9000, source="10.99.0.1").result.outcome.stage is not Stage.BIND
    finally:
        srv.close()


@pytest.mark.parametrize("bpf", [True, False], ids=["bpf", "no-bpf"])
def test_port_held_by_a_bound_client_elsewhere_is_never_called_usable(netns, monkeypatch, bpf):
    """Issue 17: a 1-port range whose port a client holds by bind() while connected to another
    server: connect() gets EADDRNOTAVAIL; the model said "1 of 1 ports usable" (the socket was
    not even read) and labelled the port "unused". Now: the kernel's bind bucket says so (BPF
    iterator), and without it the worst case, never ok."""
    import errno

    if bpf and not bpf_works():
        pytest.skip("the BPF socket iterator cannot run here")
    if not bpf:
        monkeypatch.setenv("REBIND_NO_BPF", "1")

    write("ip_local_port_range", "40000 40001")
    a = socket.create_server(("127.0.0.1", 9000))
    b = socket.create_server(("127.0.0.1", 9001))
    clients = []
    try:
        for port in (40000, 40001):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind(("127.0.0.1", port))
            c.connect(("127.0.0.1", 9001))
            clients.append(c)
        d = connect_diagnose("127.0.0.1", 9000, with_probe=True)
        res = d.result
        if bpf:
            assert res.outcome.verdict is Verdict.FAIL and res.accounting.counts == {"bind-before-connect": 2}
        else:
            assert res.outcome.verdict is Verdict.MAY_FAIL and res.accounting.usable == 0
            assert res.accounting.counts == {"unknown-origin": 2}
        assert d.probe is not None and d.probe.error_name == "EADDRNOTAVAIL" and not d.ok
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", 9000)) == errno.EADDRNOTAVAIL
    finally:
        for s in (*clients, a, b):
            s.close()


@pytest.mark.parametrize("bpf", [True, False], ids=["bpf", "no-bpf"])
def test_time_wait_keeps_its_own_timestamps_after_the_sysctl_changes(netns, monkeypatch, bpf):
    """Issue 17: TIME_WAITs made with TCP timestamps, then tcp_timestamps=0: the kernel takes one
    over (tcp_twsk_unique reads the entry's own tw_ts_recent_stamp); rebind said EADDRNOTAVAIL.
    With the BPF iterator the model reads the entry's timestamps; without, it says may fail."""
    import time

    if bpf and not bpf_works():
        pytest.skip("the BPF socket iterator cannot run here")
    if not bpf:
        monkeypatch.setenv("REBIND_NO_BPF", "1")
    write("ip_local_port_range", "40000 40001")
    write("tcp_tw_reuse", "1")
    srv = socket.create_server(("127.0.0.1", 9000))
    try:
        for _ in range(2):  # the client closes first: its side becomes the TIME_WAIT
            c = socket.create_connection(("127.0.0.1", 9000))
            a, _ = srv.accept()
            c.close()
            a.close()
        # Wait until the entries are older than tcp_tw_reuse_delay (the model's own clock).
        deadline = time.monotonic() + 10
        while True:
            tws = connect_diagnose("127.0.0.1", 9000, owners=False).result.time_waits
            if len(tws) == 2 and all(TIME_WAIT_MS - (t.left_ms or 0) > 1100 for t in tws):
                break
            assert time.monotonic() < deadline, tws
            time.sleep(0.05)
        write("tcp_timestamps", "0")
        res = connect_diagnose("127.0.0.1", 9000, owners=False).result
        with socket.socket() as s:
            real = s.connect_ex(("127.0.0.1", 9000))
        assert real == 0  # the kernel took an entry over
        if bpf:
            assert res.outcome.ok, res.outcome.explanation
            assert all(t.reusable for t in res.time_waits)
        else:
            assert res.outcome.verdict is Verdict.MAY_FAIL, res.outcome.explanation
    finally:
        srv.close()
        write("tcp_timestamps", "1")
