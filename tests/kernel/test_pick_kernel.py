"""`rebind pick` / rebind.pick_port under a busy socket table and concurrent pickers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rebind.actions.pick import NoPortFree, PortRiskWarning, pick_port
from tests.kernel.helpers import TIME_WAIT

RANGE = "20000-20010"


def _sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:  # per-netns
        f.write(value + "\n")


@pytest.fixture
def leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lease file, so these tests neither see nor leave leases elsewhere."""
    path = tmp_path / "pick.leases"
    monkeypatch.setenv("REBIND_PICK_LEASES", str(path))
    return path


def _env(leases: Path | None) -> dict[str, str]:
    e = dict(os.environ)
    e["NO_COLOR"] = "1"
    e["REBIND_PICK_LEASES"] = str(leases) if leases else ""
    return e


def _busy_table(procs) -> list[socket.socket]:  # type: ignore[no-untyped-def]
    """Ports 20000-20009 unusable for TCP in eight different ways; only 20010 is left."""
    _sysctl("ip_local_port_range", "20007 20009")  # 20007-20009: ephemeral
    _sysctl("ip_local_reserved_ports", "20006")
    held = [
        socket.create_server(("127.0.0.1", 20000)),  # specific-address listener
        socket.create_server(("::1", 20001), family=socket.AF_INET6),  # IPv6-only listener
        socket.create_server(("0.0.0.0", 20002)),
    ]
    idle = socket.socket()
    idle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    idle.bind(("127.0.0.1", 20003))  # bound, never listening (invisible to /proc/net/tcp)
    held.append(idle)
    p = procs.python(TIME_WAIT.format(port=20004, opts=""))  # a TIME_WAIT, no owner
    procs.wait_line(p)
    held.append(socket.create_server(("127.0.0.2", 20005)))  # another loopback address
    return held


def test_pick_under_a_busy_table(netns, procs, leases):
    held = _busy_table(procs)
    try:
        picked = pick_port(port_range=(20000, 20010))
        assert picked.port == 20010
        with socket.create_server(("0.0.0.0", picked.port)):  # it really binds (and listens)
            pass
        # 20010 is leased to the first picker now: the fallbacks follow, each with its risk.
        with pytest.warns(PortRiskWarning, match="ip_local_reserved_ports"):
            assert pick_port(port_range=(20000, 20010)).port == 20006
        for _ in range(3):
            with pytest.warns(PortRiskWarning, match=r"inside net.ipv4.ip_local_port_range \(20007-20009\)"):
                assert pick_port(port_range=(20000, 20010)).port in (20007, 20008, 20009)
        with pytest.raises(NoPortFree):
            pick_port(port_range=(20000, 20010))
        # UDP: the TCP sockets do not matter; the UDP table is empty.
        udp = pick_port("udp", port_range=(20000, 20005))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", udp.port))
        s.close()
    finally:
        for s in held:
            s.close()


def test_concurrent_pickers_get_different_ports_through_the_lease(netns, procs, leases):
    _sysctl("ip_local_port_range", "40000 50000")
    cmd = [sys.executable, "-m", "rebind", "pick", "--range", "20000-20003"]
    ps = [procs.start(cmd, env=_env(leases), stdin=subprocess.DEVNULL) for _ in range(4)]
    ports = []
    for p in ps:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        ports.append(int(out))
    assert sorted(ports) == [20000, 20001, 20002, 20003]
    late = procs.start(cmd, env=_env(leases), stdin=subprocess.DEVNULL)
    _, err = late.communicate(timeout=30)
    assert late.returncode == 1 and "no bindable port" in err


def test_hold_reserves_for_so_reuseaddr_only_and_concurrent_holders_differ(netns, procs):
    """Without leases, the kernel itself separates pickers: a held port fails a plain bind()."""
    _sysctl("ip_local_port_range", "40000 50000")
    cmd = [sys.executable, "-m", "rebind", "pick", "--range", "20000-20001", "--hold", "60"]
    ps = [procs.start(cmd, env=_env(None), stdin=subprocess.DEVNULL) for _ in range(2)]
    ports, holders = [], []
    for p in ps:
        out, err = p.communicate(timeout=30)  # returns at once: the holder let go of our pipes
        assert p.returncode == 0, err
        ports.append(int(out))
        holder = int(err.split(" in pid ")[1].split()[0])
        procs.adopt(holder)
        holders.append(holder)
    assert sorted(ports) == [20000, 20001]
    third = procs.start(cmd, env=_env(None), stdin=subprocess.DEVNULL)
    third.communicate(timeout=30)
    assert third.returncode == 1
    port = ports[0]
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("0.0.0.0", port))  # held: a bind without SO_REUSEADDR fails
    app = socket.socket()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    app.bind(("0.0.0.0", port))  # the app that sets SO_REUSEADDR gets it
    app.listen()
    try:
        holder = holders[ports.index(port)]
        # The holder sees the app's socket and lets go (no timing asserted; just bounded).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _running(holder):
            time.sleep(0.05)
        assert not _running(holder)
    finally:
        app.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_pick_both_needs_tcp_and_udp_free(netns, procs, leases):
    _sysctl("ip_local_port_range", "40000 50000")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 20000))
    t = socket.create_server(("127.0.0.1", 20001))
    try:
        picked = pick_port("both", port_range=(20000, 20002), hold=True)
        try:
            assert picked.port == 20002 and len(picked.sockets) >= 2
        finally:
            picked.release()
    finally:
        u.close()
        t.close()


def test_free_port_fixture(netns, procs, leases, free_port):
    with socket.create_server(("127.0.0.1", free_port)):
        pass
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not lo <= free_port <= hi


def test_whole_range_ephemeral_falls_back_with_a_warning(netns, procs, leases, rebind_cli):
    """ip_local_port_range 1024-65535 (a common setting) left no safe port: pick still answers,
    and says why the port is at risk (issue 8 item 15)."""
    _sysctl("ip_local_port_range", "1024 65535")
    _sysctl("ip_local_reserved_ports", "")
    with pytest.warns(PortRiskWarning, match=r"inside net.ipv4.ip_local_port_range \(1024-65535\)"):
        picked = pick_port()
    assert 10000 <= picked.port <= 65535 and picked.risk and str(picked.port) in picked.risk
    with socket.create_server(("0.0.0.0", picked.port)):
        pass
    res = rebind_cli("pick", "--both", env={"REBIND_PICK_LEASES": str(leases)})
    assert res.returncode == 0, res.stderr
    port = int(res.stdout)
    line = res.stderr.strip()
    assert line.startswith("rebind: warning:") and "\n" not in line
    assert f"port {port} is inside net.ipv4.ip_local_port_range (1024-65535)" in line
    with pytest.warns(PortRiskWarning, match="held now"):
        pick_port(hold=True).release()
    # Reserved ports come first: autobind skips them too.
    _sysctl("ip_local_reserved_ports", "23000-23001")
    with pytest.warns(PortRiskWarning, match="ip_local_reserved_ports"):
        assert pick_port().port in (23000, 23001)
    res = rebind_cli("pick", env={"REBIND_PICK_LEASES": str(leases)})
    assert res.returncode == 0 and int(res.stdout) in (23000, 23001) and "reserved" in res.stderr


@pytest.fixture
def all_ephemeral(netns) -> None:  # type: ignore[no-untyped-def]
    _sysctl("ip_local_port_range", "1024 65535")
    _sysctl("ip_local_reserved_ports", "")


def test_free_port_fixture_with_an_all_ephemeral_range(netns, leases, all_ephemeral, recwarn, free_port):
    """The fixture still yields a bindable port, and the warning says why it is at risk."""
    with socket.create_server(("127.0.0.1", free_port)):
        pass
    risks = [w for w in recwarn if issubclass(w.category, PortRiskWarning)]
    assert len(risks) == 1 and f"port {free_port} is inside" in str(risks[0].message)
