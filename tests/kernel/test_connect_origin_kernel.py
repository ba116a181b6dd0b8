"""Issue 17, client side: how each port of the range was taken -- bind() (SOCK_BINDPORT_LOCK,
or bind(ip, 0) and its bind-made bucket) or connect() -- decides whether connect() may share it.
`why --connect` must agree with connect() itself: model == kernel, with the BPF iterator (exact)
and without it (never optimistic: never ok where connect() fails).

Each case fills a 2-port ephemeral range (40000-40001) with client sockets taken one way,
connected to 127.0.0.1:9001, then asks about a connection to 127.0.0.1:9000 (a different
4-tuple: only the ports' origin decides). The fixed-port and the connected-elsewhere bind()
cases are in test_connect_kernel.py.
"""

from __future__ import annotations

import errno
import socket

import pytest

from rebind.connect_diagnosis import connect_diagnose
from rebind.model.connect import Verdict
from tests.kernel.test_connect_kernel import bpf_works, write

IP_BIND_ADDRESS_NO_PORT = 24


def _bind_ip_0() -> socket.socket:
    """bind(127.0.0.1, 0): bind() picks the port (SOCK_BINDADDR_LOCK only) in a bind-made bucket."""
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    return c


def _no_port() -> socket.socket:
    """bind(127.0.0.1, 0) with IP_BIND_ADDRESS_NO_PORT: connect() picks the port."""
    c = socket.socket()
    c.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    c.bind(("127.0.0.1", 0))
    return c


def _plain() -> socket.socket:
    return socket.socket()  # connect() picks the port (a connect-made bucket)


CASES = {"bind-ip-0": _bind_ip_0, "bind-address-no-port": _no_port, "connect-chosen": _plain}


def _fill(make, n: int = 2) -> list[socket.socket]:  # type: ignore[no-untyped-def]
    """Up to ``n`` clients made by ``make``, connected to 9001 (a make that finds no port stops)."""
    out = []
    for _ in range(n):
        try:
            c = make()
            c.connect(("127.0.0.1", 9001))
        except OSError as exc:
            assert exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL), exc
            c.close()
            break
        out.append(c)
    return out


@pytest.mark.parametrize("bpf", [True, False], ids=["bpf", "no-bpf"])
@pytest.mark.parametrize("how", list(CASES))
def test_connect_model_equals_the_kernel_by_port_origin(netns, monkeypatch, bpf, how):
    if bpf and not bpf_works():
        pytest.skip("the BPF socket iterator cannot run here")
    if not bpf:
        monkeypatch.setenv("REBIND_NO_BPF", "1")
    write("ip_local_port_range", "40000 40001")
    servers = [socket.create_server(("127.0.0.1", p)) for p in (9000, 9001)]
    clients = _fill(CASES[how])
    try:
        assert clients, "no client could take a port of the range"
        res = connect_diagnose("127.0.0.1", 9000, owners=False).result
        with socket.socket() as s:
            works = s.connect_ex(("127.0.0.1", 9000)) == 0
        if bpf:
            assert res.outcome.ok is works, (how, res.outcome.explanation, res.accounting.counts)
            assert res.outcome.verdict is not Verdict.MAY_FAIL
        else:
            assert not (res.outcome.ok and not works), (how, res.outcome.explanation)
    finally:
        for s in (*clients, *servers):
            s.close()


@pytest.mark.parametrize("bpf", [True, False], ids=["bpf", "no-bpf"])
def test_seed_fixed_port_reuseaddr_client_to_the_same_server(netns, monkeypatch, bpf):
    """The seed's client: bind(127.0.0.1, 40000) with SO_REUSEADDR, connect to 9000. A second such
    client binds (neither listens) but its connect() gets EADDRNOTAVAIL (the same 4-tuple, C19);
    `why --connect 127.0.0.1:9000 --local-port 40000 --reuseaddr` must say so, not "ok". The
    first client's owner is not read (owners=False: as for one in another PID namespace), so its
    SO_REUSEADDR comes from the kernel (BPF iterator), or stays unknown (the worst case)."""
    if bpf and not bpf_works():
        pytest.skip("the BPF socket iterator cannot run here")
    if not bpf:
        monkeypatch.setenv("REBIND_NO_BPF", "1")
    srv = socket.create_server(("127.0.0.1", 9000))
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    first.bind(("127.0.0.1", 40000))
    first.connect(("127.0.0.1", 9000))
    try:
        res = connect_diagnose("127.0.0.1", 9000, local_port=40000, reuseaddr=True, owners=False).result
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 40000))
            real = s.connect_ex(("127.0.0.1", 9000))
        assert real == errno.EADDRNOTAVAIL
        assert not res.outcome.ok, res.outcome.explanation
        if bpf:  # the first client's sk_reuse read from the kernel: exact
            assert (res.outcome.verdict, res.outcome.errno_name) == (Verdict.FAIL, "EADDRNOTAVAIL")
        else:  # its owner unread (owners=False): the worst case, never ok
            assert res.outcome.verdict is Verdict.MAY_FAIL
    finally:
        first.close()
        srv.close()


def test_bind_made_ports_among_connect_made_ones_are_read_by_lookup_not_by_a_walk(netns, monkeypatch):
    """Many ports of the range, two of them taken by bind(ip, 0) among connect()-chosen ones that
    fill the rest with connections to the very destination asked about: connect() then finds no
    port (the bind-made buckets refuse sharing, C6), and `why --connect` must say so exactly --
    reading each port's bucket through one socket's 4-tuple (bpf_skc_lookup_tcp), with no walk
    of the socket table (nothing here needs one: no fixed port, no socket gone)."""
    if not bpf_works():
        pytest.skip("the BPF socket iterator cannot run here")
    from rebind.kernel.bpf import sockiter

    walks: list[list[int]] = []
    real = sockiter.read_socket_states

    def spy(ports, *a, **kw):  # type: ignore[no-untyped-def]
        walks.append(sorted(ports))
        return real(ports, *a, **kw)

    monkeypatch.setattr(sockiter, "read_socket_states", spy)
    write("ip_local_port_range", "40000 40009")
    servers = [socket.create_server(("127.0.0.1", p)) for p in (9000, 9001)]
    bound = _fill(_bind_ip_0, 2)  # to 9001: bind-made buckets
    clients = []
    try:
        assert len(bound) == 2
        for _ in range(20):  # connect()-chosen, to 9000, until no port is left
            c = socket.socket()
            if c.connect_ex(("127.0.0.1", 9000)):
                c.close()
                break
            clients.append(c)
        assert len(clients) == 8
        res = connect_diagnose("127.0.0.1", 9000, owners=False).result
        with socket.socket() as s:
            real_errno = s.connect_ex(("127.0.0.1", 9000))
        assert real_errno == errno.EADDRNOTAVAIL
        assert (res.outcome.verdict, res.outcome.errno_name) == (Verdict.FAIL, "EADDRNOTAVAIL"), (
            res.outcome.explanation,
            res.accounting.counts,
        )
        assert res.accounting.ambiguous == 0  # every port's bucket was read
        assert res.accounting.counts.get("bind-before-connect") == 2, res.accounting.counts
        assert walks == [], walks
        # the same with a fixed local port: its holders' sk_reuse come with them from the port's
        # bind buckets where HZ is known (kernel/connect_lookup.py, kernel/hz.py), else that one
        # port is walked, only it
        from rebind.kernel.hz import known_hz

        fixed = bound[0].getsockname()[1]
        res = connect_diagnose("127.0.0.1", 9000, local_port=fixed, owners=False).result
        assert not res.outcome.ok
        assert walks == ([] if known_hz() is not None else [[fixed]]), walks
    finally:
        for s in (*clients, *bound, *servers):
            s.close()
