"""`rebind ls` against real sockets in a throwaway network namespace."""

from __future__ import annotations

import json
import re
import socket
import sys
import time

from tests.kernel.helpers import BOUND_ONLY, LISTEN, ORPHAN_CHILD, OTHER_UID, SHARED, TIME_WAIT, ls_json


def _pids(sock: dict) -> set[int]:  # type: ignore[type-arg]
    return {o["pid"] for o in sock["owners"]}


def test_http_server_listener_and_owner(netns, procs, rebind_cli):
    p = procs.start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "18080"])
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 18080)) == 0:
                break
        time.sleep(0.05)
    doc = ls_json(rebind_cli, "18080", "--state", "listen")
    assert doc["schema"] == "rebind.ls/1" and doc["source"] == "netlink"
    [sock] = doc["sockets"]
    assert sock["state"] == "LISTEN" and sock["local"] == {"addr": "127.0.0.1", "port": 18080}
    assert _pids(sock) == {p.pid}
    assert sock["uid"] == 0 and sock["inode"] and sock["cookie"] is not None


def test_bound_inactive_is_listed_with_owner(netns, procs, rebind_cli):
    p = procs.python(BOUND_ONLY.format(port=18081))
    procs.wait_line(p)
    doc = ls_json(rebind_cli)  # no port: every listening or bound socket
    [sock] = [s for s in doc["sockets"] if s["local"]["port"] == 18081]
    assert sock["state"] == "BOUND_INACTIVE"
    assert _pids(sock) == {p.pid}
    # /proc/net/tcp cannot see it: the fallback must say so and not list it.
    res = rebind_cli("ls", "18081", "--json", env={"REBIND_FORCE_PROCFS": "1"})
    fallback = json.loads(res.stdout)
    assert fallback["source"] == "procfs" and fallback["sockets"] == [] and res.returncode == 1
    assert any("bound-but-not-listening" in w for w in fallback["warnings"])


def test_orphaned_child_keeps_listener(netns, procs, rebind_cli):
    p = procs.python(ORPHAN_CHILD.format(port=18082))
    child = int(procs.wait_line(p))
    procs.adopt(child)
    p.wait(5)
    doc = ls_json(rebind_cli, "18082")
    [sock] = doc["sockets"]
    assert sock["state"] == "LISTEN" and _pids(sock) == {child}


def test_shared_listener_lists_every_process(netns, procs, rebind_cli):
    p = procs.python(SHARED.format(port=18083))
    kids = {int(x) for x in procs.wait_line(p).split()}
    for k in kids:
        procs.adopt(k)
    [sock] = ls_json(rebind_cli, "18083")["sockets"]
    assert _pids(sock) == kids | {p.pid}


def test_server_side_time_wait_has_time_left(netns, procs, rebind_cli):
    p = procs.python(TIME_WAIT.format(port=18084, opts=""))
    procs.wait_line(p)
    doc = ls_json(rebind_cli, "18084")
    tw = [s for s in doc["sockets"] if s["state"] == "TIME_WAIT"]
    assert len(tw) == 1
    assert 0 < tw[0]["expires_ms"] <= 60_000
    assert tw[0]["owners"] == [] and tw[0]["uid"] is None and tw[0]["local"]["port"] == 18084


def test_orphan_fin_wait2_and_close_wait(netns, procs, rebind_cli):
    with open("/proc/sys/net/ipv4/tcp_fin_timeout", "w") as f:  # per-netns sysctl
        f.write("30\n")
    srv = socket.create_server(("127.0.0.1", 18085))
    cli = socket.create_connection(("127.0.0.1", 18085))
    acc, _ = srv.accept()
    acc.close()  # server closes first; client never closes -> FIN_WAIT2 (orphan) / CLOSE_WAIT
    time.sleep(0.1)
    doc = ls_json(rebind_cli, "18085")
    states = {s["state"] for s in doc["sockets"]}
    assert "FIN_WAIT2" in states and "LISTEN" in states
    fw2 = next(s for s in doc["sockets"] if s["state"] == "FIN_WAIT2")
    assert fw2["timer"] == "time_wait" and 0 < fw2["expires_ms"] <= 30_000
    cw = [s for s in ls_json(rebind_cli, str(cli.getsockname()[1]))["sockets"]]
    assert any(s["state"] == "CLOSE_WAIT" for s in cw)
    cli.close()
    srv.close()


def test_ipv6_dual_stack_and_v6only(netns, procs, rebind_cli):
    dual = socket.socket(socket.AF_INET6)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 18086))
    dual.listen()
    only = socket.socket(socket.AF_INET6)
    only.bind(("::1", 18087))
    only.listen()
    socks = {s["local"]["port"]: s for s in ls_json(rebind_cli, "18086", "18087")["sockets"]}
    assert socks[18086]["family"] == "ipv6" and socks[18086]["v6only"] is False
    assert socks[18087]["v6only"] is True and socks[18087]["local"]["addr"] == "::1"
    dual.close()
    only.close()


def test_udp_bound_and_connected(netns, rebind_cli):
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 18088))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind(("127.0.0.1", 18089))
    b.connect(("127.0.0.1", 18088))
    socks = ls_json(rebind_cli, "18088", "18089", "--udp")["sockets"]
    by = {s["local"]["port"]: s for s in socks}
    assert by[18088]["state"] == "UNCONN" and by[18089]["state"] == "ESTABLISHED"
    assert all(s["proto"] == "udp" for s in socks)
    assert ls_json(rebind_cli, "18088", "--tcp")["sockets"] == []
    a.close()
    b.close()


def test_other_users_socket(netns, procs, rebind_cli):
    p = procs.python(OTHER_UID.format(port=18090))
    procs.wait_line(p)
    [sock] = ls_json(rebind_cli, "18090")["sockets"]
    assert sock["uid"] == 65534 and _pids(sock) == {p.pid}
    assert sock["owners"][0]["uid"] == 65534


def test_filters_and_exit_codes(netns, procs, rebind_cli):
    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18091))
    procs.wait_line(p)
    assert rebind_cli("ls", "18091").returncode == 0
    assert rebind_cli("ls", "18092").returncode == 1
    assert rebind_cli("ls", "127.0.0.2:18091").returncode == 1
    assert rebind_cli("ls", "127.0.0.1:18091").returncode == 0
    assert rebind_cli("ls", "18091", "--state", "time-wait").returncode == 1
    doc = ls_json(rebind_cli, "18091", "--no-owners")
    assert doc["sockets"][0]["owners"] is None and doc["owner_scan"] is None
    assert ls_json(rebind_cli, "--listening")["sockets"][0]["local"]["port"] == 18091
    text = rebind_cli("ls", "18091").stdout
    assert "LISTEN" in text and f"[{p.pid}]" in text and "\x1b[" not in text


def test_many_ports_filtered_in_kernel(netns, rebind_cli):
    socks = [socket.create_server(("127.0.0.1", 19000 + i)) for i in range(40)]
    ports = [str(19000 + i) for i in range(0, 40, 2)]
    got = {s["local"]["port"] for s in ls_json(rebind_cli, *ports)["sockets"]}
    assert got == {int(p) for p in ports}
    for s in socks:
        s.close()


def test_not_root_counts_uninspectable_processes(netns, procs):
    """As an unprivileged user, root's fd tables are unreadable: counted and said, never guessed."""
    import os

    p = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=18096))
    procs.wait_line(p)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody and look
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            from rebind.sockets import socket_table

            t = socket_table(ports=[18096])
            doc = {
                "owners": [len(e.owners) for e in t.entries],
                "inaccessible": t.scan.inaccessible,
                "warnings": list(t.warnings),
            }
            os.write(w, json.dumps(doc).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        doc = json.loads(f.read())
    os.waitpid(pid, 0)
    assert doc["owners"] == [0]  # the socket is seen, its root owner is not
    assert doc["inaccessible"] >= 1
    assert any("could not be inspected" in w for w in doc["warnings"])


def _rows(doc: dict, *, owners: bool = True) -> set[tuple]:  # type: ignore[type-arg]
    return {
        (
            s["proto"],
            s["family"],
            s["state"],
            s["local"]["addr"],
            s["local"]["port"],
            s["remote"]["addr"],
            s["remote"]["port"],
            frozenset(_pids(s)) if owners else None,
        )
        for s in doc["sockets"]
    }


def test_procfs_fallback_sees_the_same_sockets_but_bound_inactive(netns, procs, rebind_cli):
    p = procs.python(SHARED.format(port=18100))
    for k in procs.wait_line(p).split():
        procs.adopt(int(k))
    b = procs.python(BOUND_ONLY.format(port=18101))
    procs.wait_line(b)
    t = procs.python(TIME_WAIT.format(port=18102, opts=""))
    procs.wait_line(t)
    v6 = socket.create_server(("::1", 18103), family=socket.AF_INET6)
    c = socket.create_connection(("::1", 18103))
    a, _ = v6.accept()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 18104))
    ports = ["18100", "18101", "18102", "18103", "18104", str(c.getsockname()[1])]
    nl = ls_json(rebind_cli, *ports)
    res = rebind_cli("ls", *ports, "--json", env={"REBIND_FORCE_PROCFS": "1"})
    assert res.returncode == 0, res.stderr
    pf = json.loads(res.stdout)
    assert nl["source"] == "netlink" and pf["source"] == "procfs"
    [warning] = pf["warnings"]
    assert "bound-but-not-listening" in warning and "cookies" in warning and "v6only" in warning
    inactive = {r for r in _rows(nl) if r[2] == "BOUND_INACTIVE"}
    assert {r[4] for r in inactive} == {18101}
    assert _rows(pf) == _rows(nl) - inactive
    assert len(_rows(pf)) >= 6
    # Timers survive the fallback (clock ticks converted to ms); cookies and v6only do not.
    [tw] = [s for s in pf["sockets"] if s["state"] == "TIME_WAIT"]
    assert 0 < tw["expires_ms"] <= 60_000 and tw["uid"] is None and tw["owners"] == []
    assert all(s["cookie"] is None and s["v6only"] is None for s in pf["sockets"])
    # The text table says it too, on stderr; data stays on stdout.
    text = rebind_cli("ls", "18100", env={"REBIND_FORCE_PROCFS": "1"})
    assert "bound-but-not-listening" in text.stderr and "bound-but-not-listening" not in text.stdout
    for s in (v6, c, a, u):
        s.close()


def test_state_listening_proto_and_address_filters(netns, procs, rebind_cli):
    port = 18110
    srv = procs.python(LISTEN.format(opts="", addr="127.0.0.1", port=port))
    procs.wait_line(srv)
    bound = procs.python(BOUND_ONLY.format(port=port + 1))
    procs.wait_line(bound)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", port))
    c = socket.create_connection(("127.0.0.1", port))
    t = procs.python(TIME_WAIT.format(port=port + 2, opts=""))
    procs.wait_line(t)
    P, B, T = str(port), str(port + 1), str(port + 2)

    def states(*args: str) -> set[tuple[str, str, int]]:
        return {(s["proto"], s["state"], s["local"]["port"]) for s in ls_json(rebind_cli, *args)["sockets"]}

    # With a port: every state on it (the server side of the connection is not accepted: SYN queue
    # or accept queue, still ESTABLISHED in the kernel's table).
    assert states(P) == {("tcp", "LISTEN", port), ("tcp", "ESTABLISHED", port), ("udp", "UNCONN", port)}
    assert states(P, "--tcp") == {("tcp", "LISTEN", port), ("tcp", "ESTABLISHED", port)}
    assert states(P, "--udp") == {("udp", "UNCONN", port)}
    assert states(P, "--tcp", "--udp") == states(P)
    assert states(P, "--state", "listen", "--tcp") == {("tcp", "LISTEN", port)}
    # As in ss, "listen" and "bound-inactive" mean a bound (UNCONN) socket for UDP.
    assert states(P, "--state", "listen") == {("tcp", "LISTEN", port), ("udp", "UNCONN", port)}
    assert states(P, "--state", "established", "--state", "LISTEN", "--tcp") == states(P, "--tcp")
    assert states(P, "-l") == {("tcp", "LISTEN", port), ("udp", "UNCONN", port)}
    assert states(T, "--state", "time-wait") == {("tcp", "TIME_WAIT", port + 2)}
    assert states(B, "--state", "bound-inactive", "--tcp") == {("tcp", "BOUND_INACTIVE", port + 1)}
    assert states(P, B, T, "--state", "time_wait") == {("tcp", "TIME_WAIT", port + 2)}
    # Without a port: listening and bound sockets only, bound-inactive included; -l drops it.
    everything = states()
    assert ("tcp", "BOUND_INACTIVE", port + 1) in everything and ("tcp", "LISTEN", port) in everything
    assert all(s not in ("ESTABLISHED", "TIME_WAIT") for _, s, _ in everything)
    assert ("tcp", "BOUND_INACTIVE", port + 1) not in states("--listening")
    # ADDR:PORT keeps the sockets bound to exactly that address; a plain PORT next to it still counts.
    assert states(f"127.0.0.1:{port}", "--tcp") == {("tcp", "LISTEN", port), ("tcp", "ESTABLISHED", port)}
    assert states(f"[::1]:{port}") == set()
    assert states(f"127.0.0.2:{port}", B) == {("tcp", "BOUND_INACTIVE", port + 1)}
    # --no-owners: same sockets, owners null, no scan report.
    fast = ls_json(rebind_cli, P, B, "--no-owners")
    assert _rows(fast, owners=False) == _rows(ls_json(rebind_cli, P, B), owners=False)
    assert all(s["owners"] is None for s in fast["sockets"]) and fast["owner_scan"] is None
    # Exit codes: 0 matched, 1 nothing matched (also under filters and for JSON).
    assert rebind_cli("ls", P, "--state", "close-wait").returncode == 1
    assert rebind_cli("ls", "18119", "--json").returncode == 1
    assert rebind_cli("ls", B, "--udp").returncode == 1
    assert rebind_cli("ls", B, "--state", "bound").returncode == 0
    # The table: owners by name[pid], time left for TIME_WAIT, no colour when piped.
    table = rebind_cli("ls", P, B, T)
    assert table.returncode == 0 and "\x1b[" not in table.stdout
    assert f"[{srv.pid}]" in table.stdout and f"[{bound.pid}]" in table.stdout
    tw_line = next(line for line in table.stdout.splitlines() if "TIME_WAIT" in line)
    assert re.search(r"\b\d+(\.\d)?s\b", tw_line), tw_line
    u.close()
    c.close()


def test_prefetched_dump_answers_exactly_the_same(netns, procs):
    """The early dump started by the entry point gives the records the normal path gives."""
    from rebind.kernel import prefetch
    from rebind.sockets import socket_table

    p = procs.python(SHARED.format(port=18097))
    for k in procs.wait_line(p).split():
        procs.adopt(int(k))
    q = procs.python(TIME_WAIT.format(port=18098, opts=""))
    procs.wait_line(q)
    normal = socket_table(ports=[18097, 18098])
    prefetch.start((18098, 18097))
    early = socket_table(ports=[18097, 18098])
    assert prefetch._job is None  # consumed
    strip = lambda t: [(e.socket.key, e.socket.state, {o.pid for o in e.owners}) for e in t.entries]  # noqa: E731
    assert strip(early) == strip(normal) and len(early.entries) >= 2
    # A query the prefetch did not ask for is never answered from it.
    from rebind.model.records import Family, Proto, State

    prefetch.start((18097,), "udp")
    assert prefetch.take([18097], (Proto.TCP,), tuple(Family), frozenset(State)) is None
    assert prefetch.take([18097], tuple(Proto), tuple(Family), frozenset(State)) is None
    assert prefetch.take([18097], (Proto.UDP,), tuple(Family), frozenset(State)) is not None
    prefetch.start((18097,))
    assert prefetch.take([18097], tuple(Proto), tuple(Family), frozenset(State)) is not None


def test_all_states_without_a_port(netns, procs, rebind_cli):
    """`ls -a` is `ss -a`: connections and TIME_WAIT too; the default shows only what is bound."""
    srv = socket.create_server(("127.0.0.1", 18140))
    cli = socket.create_connection(("127.0.0.1", 18140))
    acc, _ = srv.accept()
    t = procs.python(TIME_WAIT.format(port=18141, opts=""))
    procs.wait_line(t)
    try:
        default = {s["state"] for s in ls_json(rebind_cli)["sockets"]}
        assert default == {"LISTEN"}
        every = ls_json(rebind_cli, "-a")["sockets"]
        states = {(s["local"]["port"], s["state"]) for s in every}
        assert {(18140, "LISTEN"), (18140, "ESTABLISHED"), (18141, "TIME_WAIT")} <= states
        assert any(s["state"] == "ESTABLISHED" and s["remote"]["port"] == 18140 for s in every)
        text = rebind_cli("ls", "--all")
        assert text.returncode == 0 and "TIME_WAIT" in text.stdout and "ESTABLISHED" in text.stdout
        for bad in (["-a", "--state", "listen"], ["--all", "-l"]):
            res = rebind_cli("ls", *bad)
            assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    finally:
        for s in (cli, acc, srv):
            s.close()


def test_ipv4_mapped_addresses_read_as_ipv4(netns, rebind_cli):
    """A dual-stack listener's accepted IPv4 connection has a mapped local address: printed
    ::ffff:127.0.0.1 (as docs/json.md says) in text and JSON, on every Python version."""
    dual = socket.socket(socket.AF_INET6)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 18142))
    dual.listen()
    cli = socket.create_connection(("127.0.0.1", 18142))
    acc, _ = dual.accept()
    try:
        socks = ls_json(rebind_cli, "18142", "--state", "established")["sockets"]
        mapped = [s for s in socks if s["family"] == "ipv6"]
        assert mapped and mapped[0]["local"]["addr"] == "::ffff:127.0.0.1"
        assert mapped[0]["remote"]["addr"] == "::ffff:127.0.0.1"
        text = rebind_cli("ls", "18142").stdout
        assert "[::ffff:127.0.0.1]:18142" in text and "7f00" not in text
    finally:
        for s in (cli, acc, dual):
            s.close()
