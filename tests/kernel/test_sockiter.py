"""The BPF socket iterators report exactly what the kernel holds: each field is set here by a
real socket call and read back (model == kernel on whatever kernel runs this).

Where a value is a kernel rule rather than an option (userlocks of bind(ip, 0), the bind bucket's
fast-reuse cache, UDP chain order), the oracle is the kernel's own behaviour in the same test:
which socket receives a datagram, which bind succeeds.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rebind.kernel import netns as nsmod
from rebind.kernel.bpf.sockiter import count_socket_states, read_socket_states
from rebind.model.records import Proto, State
from rebind.model.sockstate import (
    FASTREUSEPORT_ANY,
    FASTREUSEPORT_STRICT,
    SOCK_BINDADDR_LOCK,
    SOCK_BINDPORT_LOCK,
    SockKind,
    SockState,
    SockStates,
    Unavailable,
)
from rebind.sockets import socket_table

ROOT = Path(__file__).resolve().parents[2]


def _states(ports: list[int], protos: tuple[Proto, ...] = (Proto.TCP, Proto.UDP)) -> SockStates:
    got = read_socket_states(ports, protos)
    assert not isinstance(got, Unavailable), got.reason
    assert got.faulted == 0
    return got


def _one(ports: list[int], match: Callable[[SockState], bool], proto: Proto = Proto.TCP) -> SockState:
    found = [s for s in _states(ports, (proto,)).sockets if match(s)]
    assert len(found) == 1, found
    return found[0]


def _wait_for(ports: list[int], match: Callable[[SockState], bool], timeout: float = 10.0) -> SockState:
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in _states(ports, (Proto.TCP,)).sockets if match(s)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError("the kernel never showed the awaited socket")
        time.sleep(0.01)


def _tcp(reuseaddr: bool = False, reuseport: bool = False, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    return s


def _udp(reuseaddr: bool = False, reuseport: bool = False, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    return s


def _cookie(s: socket.socket) -> int:
    # SO_COOKIE (57): the same sock_gen_cookie the program's bpf_get_socket_cookie returns
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")


@pytest.mark.parametrize("reuseaddr", [False, True])
@pytest.mark.parametrize("reuseport", [False, True])
@pytest.mark.parametrize("proto", [Proto.TCP, Proto.UDP])
def test_flags_are_the_ones_set(netns: int, proto: Proto, reuseaddr: bool, reuseport: bool) -> None:
    s = (_tcp if proto is Proto.TCP else _udp)(reuseaddr, reuseport)
    with s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if proto is Proto.TCP:
            s.listen()
        st = _one([port], lambda x: x.cookie == _cookie(s), proto)
        assert (st.reuseaddr, st.reuseport) == (reuseaddr, reuseport)
        assert st.kind is SockKind.FULL and st.netns == netns
        assert st.state is (State.LISTEN if proto is Proto.TCP else State.CLOSE)
        assert (str(st.local.addr), st.local.port) == ("127.0.0.1", port)
        assert st.uid == os.geteuid() and st.sk_uid == os.geteuid()
        assert st.bound_dev_if == 0


@pytest.mark.parametrize("proto", [Proto.TCP, Proto.UDP])
def test_bound_device_and_v6only(netns: int, proto: Proto) -> None:
    kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
    socks = []
    try:
        for v6only in (False, True):
            s = socket.socket(socket.AF_INET6, kind)
            socks.append(s)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            s.bind(("::", 0))  # a specific non-mapped address would force ipv6only (__inet6_bind)
            if proto is Proto.TCP:
                s.listen()  # a bound-only TCP socket is in no table the iterator walks
        ports = [s.getsockname()[1] for s in socks]
        got = {st.cookie: st for st in _states(ports, (proto,)).sockets}
        for s, v6only in zip(socks, (False, True), strict=True):
            st = got[_cookie(s)]
            assert st.ipv6only is v6only
            assert st.bound_dev_if == socket.if_nametoindex("lo")
            assert (str(st.local.addr), st.local.port) == ("::", s.getsockname()[1])
    finally:
        for s in socks:
            s.close()


def test_a_specific_ipv6_address_makes_the_socket_v6only_whatever_was_set(netns: int) -> None:
    """__inet6_bind sets sk_ipv6only for a specific non-mapped address: the kernel's field, not
    the option the program set, is what conflicts are judged by (getsockopt says the same)."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::1", 0))
    s.listen()
    try:
        st = _one([s.getsockname()[1]], lambda x: x.cookie == _cookie(s))
        assert st.ipv6only is True
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        s.close()


def test_userlocks_tell_bind_from_connect(netns: int) -> None:
    """bind(ip, port), bind(0.0.0.0, port), bind(ip, 0) and connect()'s autobind, as inet_bind
    and __inet_hash_connect mark them; the oracle for "chosen by connect()" is the kernel's own
    SOCK_CONNECT_BIND where it has one (6.18), else no bind lock bit at all."""
    srv = _tcp()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cases = {
        "ip+port": (("127.0.0.2", port), SOCK_BINDADDR_LOCK | SOCK_BINDPORT_LOCK),
        "any+port": (("0.0.0.0", port + 1 if port < 65535 else port - 1), SOCK_BINDPORT_LOCK),
        "ip+0": (("127.0.0.3", 0), SOCK_BINDADDR_LOCK),
    }
    socks: dict[str, socket.socket] = {}
    try:
        for name, (addr, _) in cases.items():
            socks[name] = s = _tcp()
            s.bind(addr)
            s.listen()  # listen() keeps sk_userlocks; a bound-only socket is not iterated
        socks["connect"] = c = _tcp()
        c.connect(("127.0.0.1", port))
        ports = [s.getsockname()[1] for s in socks.values()]
        got = {st.cookie: st for st in _states(ports, (Proto.TCP,)).sockets}
        for name, (_, locks) in cases.items():
            st = got[_cookie(socks[name])]
            assert st.userlocks is not None and st.userlocks & 0xF == locks, (name, st.userlocks)
        st = got[_cookie(c)]
        assert st.userlocks is not None and st.userlocks & (SOCK_BINDADDR_LOCK | SOCK_BINDPORT_LOCK) == 0
        assert st.port_locked is False
        assert got[_cookie(socks["ip+port"])].port_locked is True
    finally:
        for s in socks.values():
            s.close()
        srv.close()


@pytest.mark.parametrize("reuseaddr", [False, True])
def test_server_side_time_wait_keeps_the_servers_flags(netns: int, reuseaddr: bool) -> None:
    """inet_twsk_alloc copies sk_reuse (and sk_reuseport) into the TIME_WAIT; the kernel's answer
    to a restart bind agrees with what the record says (SO_REUSEADDR restart: allowed only when
    the TIME_WAIT has tw_reuse too -- inet_csk_bind_conflict)."""
    srv = _tcp(reuseaddr=reuseaddr)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    srv.close()
    conn.close()  # the server closes first: its end goes FIN_WAIT2, then TIME_WAIT
    cli.close()
    tw = _wait_for([port], lambda x: x.local.port == port and x.state is State.TIME_WAIT)
    assert tw.kind is SockKind.TIMEWAIT and tw.tw_substate is State.TIME_WAIT
    assert tw.reuseaddr is reuseaddr and tw.reuseport is False
    assert tw.uid is None and tw.userlocks is None
    assert tw.bucket is not None and tw.bucket.port == port
    if tw.tw_connect_bind is not None:
        assert tw.tw_connect_bind is False  # a server's port came from bind()
    assert tw.tw_ts_recent_stamp is not None and tw.tw_ts_recent is not None
    with open("/proc/sys/net/ipv4/tcp_timestamps") as f:
        if f.read().strip() != "0":
            assert tw.tw_ts_recent_stamp > 0  # ktime_get_seconds() of the last timestamp seen
    # the kernel's own answer to a SO_REUSEADDR restart agrees with tw_reuse
    again = _tcp(reuseaddr=True)
    try:
        again.bind(("127.0.0.1", port))
        bound = True
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE
        bound = False
    finally:
        again.close()
    assert bound is reuseaddr


def test_client_side_time_wait_says_connect_bind(netns: int) -> None:
    srv = _tcp()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(("127.0.0.1", srv.getsockname()[1]))
    cport = cli.getsockname()[1]
    conn, _ = srv.accept()
    cli.close()  # the client closes first: the TIME_WAIT is on its (connect()-chosen) port
    conn.close()
    tw = _wait_for([cport], lambda x: x.local.port == cport and x.state is State.TIME_WAIT)
    if tw.tw_connect_bind is not None:  # Linux 6.18 keeps it, and marks connect()'s buckets
        assert tw.tw_connect_bind is True
        assert tw.bucket is not None and (tw.bucket.fastreuse, tw.bucket.fastreuseport) == (-1, -1)
    srv.close()


def test_bind_bucket_cache_outlives_a_cleared_so_reuseport(netns: int) -> None:
    """inet_csk_update_fastreuse fills the cache at bind(); clearing SO_REUSEPORT afterwards
    changes the socket, not the bucket -- and the kernel lets a second SO_REUSEPORT bind in by
    the cache (sk_reuseport_match) although the owner's flag is now off."""
    a = _tcp(reuseport=True)
    a.bind(("127.0.0.1", 0))
    port = a.getsockname()[1]
    a.listen()  # to be iterated (listen() keeps the cache: the bucket's one owner matches)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    st = _one([port], lambda x: x.cookie == _cookie(a))
    assert st.reuseport is False
    b = st.bucket
    assert b is not None and b.port == port
    # ANY at bind(); listen() re-runs inet_csk_update_fastreuse, which may make it STRICT
    assert b.fastreuseport in (FASTREUSEPORT_ANY, FASTREUSEPORT_STRICT) and b.fastuid == os.geteuid()
    assert str(b.fast_rcv_saddr) == "127.0.0.1" and b.fast_sk_family == socket.AF_INET
    assert b.fast_ipv6_only is False
    assert b.fastreuse == 0  # no SO_REUSEADDR
    if b.bind2_fastreuseport is not None:  # 6.18: the (port, address) bucket copies the port's
        assert (b.bind2_fastreuse, b.bind2_fastreuseport) == (b.fastreuse, b.fastreuseport)
    # the oracle: the kernel admits a second SO_REUSEPORT bind by the cache alone
    c = _tcp(reuseport=True)
    try:
        c.bind(("127.0.0.1", port))
    finally:
        c.close()
        a.close()


def test_cookies_and_states_agree_with_inet_diag(netns: int) -> None:
    srv = _tcp(reuseaddr=True)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    u = _udp()
    u.bind(("127.0.0.1", port))
    try:
        table = socket_table(ports=[port], protos=[Proto.TCP, Proto.UDP], owners=False)
        diag = {(e.socket.proto, e.socket.cookie): e.socket for e in table.entries if e.socket.port == port}
        got = {(s.proto, s.cookie): s for s in _states([port]).sockets}
        assert set(got) == set(diag)
        for key, rec in diag.items():
            st = got[key]
            assert (st.state, st.local, st.remote, st.family) == (
                rec.state,
                rec.local,
                rec.remote,
                rec.family,
            )
            assert st.uid == rec.uid and st.netns == netns
    finally:
        for s in (cli, conn, srv, u):
            s.close()


def test_other_network_namespaces_are_not_reported(netns: int) -> None:
    mine = _udp()
    mine.bind(("127.0.0.1", 0))
    port = mine.getsockname()[1]
    with nsmod.private_netns() as other:
        theirs = _udp()
        theirs.bind(("127.0.0.1", port))
        there = _states([port], (Proto.UDP,))
        assert {s.cookie for s in there.sockets} == {_cookie(theirs)} and there.netns == other
    try:
        here = _states([port], (Proto.UDP,))
        assert {s.cookie for s in here.sockets} == {_cookie(mine)}
        assert {s.netns for s in here.sockets} == {netns} and here.netns == netns
        wrong = read_socket_states([port], (Proto.UDP,), netns=other)
        assert isinstance(wrong, Unavailable)
    finally:
        theirs.close()
        mine.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_udp_chain_order_is_the_kernels_delivery_order(netns: int, family: int) -> None:
    """Sockets sharing an address and port (SO_REUSEADDR, no reuseport group) score alike in
    udp4/6_lib_lookup2, which keeps the first best: a datagram goes to the first of them in the
    hash2 chain. The iterator's chain index 0 must be that socket, every time one leaves."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    socks = []
    try:
        for _ in range(3):
            s = _udp(reuseaddr=True, family=family)
            s.bind((host, socks[0].getsockname()[1] if socks else 0))
            s.setblocking(False)
            socks.append(s)
        port = socks[0].getsockname()[1]
        tx = socket.socket(family, socket.SOCK_DGRAM)
        alive = list(socks)
        while alive:
            sts = [st for st in _states([port], (Proto.UDP,)).sockets]
            assert len({st.chain.bucket for st in sts if st.chain}) == 1
            first = min(sts, key=lambda st: st.chain.index if st.chain else 99)
            tx.sendto(b"x", (host, port))
            receiver = _receiver(alive)
            assert _cookie(receiver) == first.cookie
            alive.remove(receiver)
            receiver.close()
        tx.close()
    finally:
        for s in socks:
            s.close()


def _receiver(socks: list[socket.socket]) -> socket.socket:
    import select

    ready, _, _ = select.select(socks, [], [], 5)
    assert len(ready) == 1, ready
    ready[0].recv(16)
    return ready[0]


def test_count_mode_counts_per_port_and_state(netns: int) -> None:
    srv = _tcp()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [srv.accept()[0] for _ in clients]
    u = _udp()
    u.bind(("127.0.0.1", port))
    try:
        counts = count_socket_states([port, 1])
        assert not isinstance(counts, Unavailable), counts.reason
        table = socket_table(ports=[port], protos=[Proto.TCP, Proto.UDP], owners=False)
        want: dict[tuple[Proto, State], int] = {}
        for e in table.entries:
            if e.socket.port == port:
                key = (e.socket.proto, e.socket.state)
                want[key] = want.get(key, 0) + 1
        got = {(p, s): n for p, q, s, n in counts.counts if q == port}
        assert got == want and counts.netns == netns
        assert counts.get(Proto.TCP, port, State.ESTABLISHED) == 3
    finally:
        for s in (*clients, *accepted, srv, u):
            s.close()


def test_another_users_socket_is_read_whole(netns: int, procs: object) -> None:
    """A socket whose owner rebind cannot see or read (uid 65534, its own process): the kernel's
    fields are still there, with the owner's uid."""
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n"
        "s.bind(('127.0.0.1',0)); print(s.getsockname()[1], flush=True); sys.stdin.read()\n"
    )
    p = procs.start(  # type: ignore[attr-defined]
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ],
        stdin=subprocess.PIPE,
    )
    port = int(procs.wait_line(p))  # type: ignore[attr-defined]
    st = _one([port], lambda x: x.local.port == port, Proto.UDP)
    assert (st.uid, st.sk_uid, st.reuseport, st.reuseaddr) == (65534, 65534, True, False)


def test_unprivileged_caller_gets_unavailable_not_a_traceback(netns: int) -> None:
    code = (
        "from rebind.kernel.bpf.sockiter import read_socket_states, count_socket_states\n"
        "print(type(read_socket_states([80])).__name__, type(count_socket_states([80])).__name__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Unavailable", "Unavailable"]
    assert "Traceback" not in out.stderr


def test_why_reads_the_flags_of_sockets_whose_owner_nobody_read(netns: int) -> None:
    """owners=False: no process is looked at, yet each holder's flags are the kernel's own
    (provenance kernel), with the bucket/chain state beside them; REBIND_NO_BPF falls back."""
    from rebind.diagnosis import default_request, diagnose

    u = _udp(reuseport=True)
    u.bind(("127.0.0.1", 0))
    port = u.getsockname()[1]
    try:
        d = diagnose(default_request(port, proto="udp"), owners=False)
        [b] = d.blockers
        assert b.provenance.value == "kernel" and b.opts.reuseport is True and b.opts.reuseaddr is False
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REBIND_NO_BPF", "1")
            d = diagnose(default_request(port, proto="udp"), owners=False)
        assert d.blockers[0].provenance.value != "kernel"
    finally:
        u.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_udp_port_chain_order_is_the_order_proc_net_udp_walks(netns: int, family: int) -> None:
    """/proc/net/udp{,6} walks udptable->hash chain by chain, in list order (udp_get_first /
    udp_get_next): an independent reading of the chain udp_lib_lport_inuse walks for bind()."""
    hosts = ["127.0.0.3", "127.0.0.1", "0.0.0.0", "127.0.0.2"]
    if family == socket.AF_INET6:
        hosts = ["::1", "::", "::ffff:127.0.0.1"]
    socks: list[socket.socket] = []
    try:
        for host in hosts:
            s = _udp(reuseaddr=True, family=family)
            s.bind((host, socks[0].getsockname()[1] if socks else 0))
            socks.append(s)
        port = socks[0].getsockname()[1]
        name = "udp" if family == socket.AF_INET else "udp6"
        with open(f"/proc/thread-self/net/{name}") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        proc_order = [int(r[9]) for r in rows if int(r[1].split(":")[1], 16) == port]
        inode = {_cookie(s): os.fstat(s.fileno()).st_ino for s in socks}
        sts = _states([port], (Proto.UDP,)).sockets
        assert all(st.chain is not None and st.chain.port_index is not None for st in sts)
        ours = sorted(
            sts, key=lambda st: st.chain.port_index if st.chain and st.chain.port_index is not None else 0
        )
        assert [inode[st.cookie] for st in ours] == proc_order
        assert len(proc_order) == len(socks)
    finally:
        for s in socks:
            s.close()
