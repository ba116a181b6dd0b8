"""Localhost split-brain against the real kernel (issue 20): the model's answer to "who does a
connection to 127.0.0.1 / ::1 reach" is checked by connecting (model == kernel), and ls, why and
their JSON flag the port. A private /etc/hosts (a mount namespace) sets the resolver's order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rebind.kernel.resolver import localhost_resolution
from rebind.model.localhost import SplitKind, find_split
from rebind.sockets import socket_table

# Answers every connection with its pid: the test sees which process the kernel picked.
WHOAMI = """
import os, socket, sys
fam = socket.AF_INET6 if ':' in {addr!r} else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, {reuseport})
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, {v6only})
s.bind(({addr!r}, {port}))
s.listen()
print('ready', flush=True)
while True:
    c, _ = s.accept()
    c.sendall(str(os.getpid()).encode())
    c.close()
"""


def serve(procs, addr: str, port: int, v6only: int = 1, reuseport: int = 0) -> int:  # type: ignore[no-untyped-def]
    p = procs.python(WHOAMI.format(addr=addr, port=port, v6only=v6only, reuseport=reuseport))
    assert procs.wait_line(p) == "ready"
    return int(p.pid)


def who_answers(addr: str, port: int) -> int | None:
    """The pid of the process a real connection reaches; None on ECONNREFUSED."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam) as c:
        try:
            c.connect((addr, port))
        except ConnectionRefusedError:
            return None
        return int(c.recv(64).decode())


def model_answers(port: int) -> tuple[set[int], set[int]]:
    table = socket_table(ports=[port])
    from rebind.model.localhost import V4_LOOPBACK, V6_LOOPBACK, reach

    return set(reach(table.entries, V4_LOOPBACK).pids), set(reach(table.entries, V6_LOOPBACK).pids)


def kernel_answers(port: int) -> tuple[set[int], set[int]]:
    a, b = who_answers("127.0.0.1", port), who_answers("::1", port)
    return (set() if a is None else {a}), (set() if b is None else {b})


def cli(*args: str, hosts: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m rebind ARGS`; with ``hosts``, in a mount namespace where it is /etc/hosts."""
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    cmd = [sys.executable, "-m", "rebind", *args]
    if hosts is not None:
        inner = 'mount --bind "$0" /etc/hosts && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, str(hosts), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("v4", "v6"),
    [
        (("127.0.0.1", 1), ("::1", 1)),
        (("0.0.0.0", 1), ("::1", 1)),
        (("127.0.0.1", 1), ("::", 1)),  # :: v6only: ::1 goes to it, 127.0.0.1 to the exact one
        (("0.0.0.0", 1), ("::", 1)),
    ],
)
def test_model_matches_real_connects(netns, procs, v4, v6) -> None:  # type: ignore[no-untyped-def]
    port = 18200
    serve(procs, v4[0], port)
    serve(procs, v6[0], port, v6[1])
    assert model_answers(port) == kernel_answers(port)


@pytest.mark.parametrize(
    "addrs",
    [
        ("0.0.0.0", "127.0.0.1"),  # the exact address wins over the wildcard (first lookup pass)
        ("::", "::1"),
        ("::", "0.0.0.0"),  # dual-stack [::] vs 0.0.0.0: compute_score prefers the AF_INET socket
        ("::", "127.0.0.1", "::1"),
    ],
)
def test_overlapping_listeners_model_matches_kernel(netns, procs, addrs) -> None:  # type: ignore[no-untyped-def]
    """SO_REUSEPORT lets different processes of one user hold overlapping addresses: the
    kernel's listener lookup then decides, and the model must name the same process."""
    port = 18206
    for a in addrs:
        serve(procs, a, port, v6only=0, reuseport=1)
    assert model_answers(port) == kernel_answers(port)


def test_dual_stack_and_exact_listener_model_matches_kernel(netns, procs) -> None:  # type: ignore[no-untyped-def]
    """[::] dual-stack and 127.0.0.1 exact (needs SO_REUSEADDR? no: different addresses bind)."""
    port = 18201
    serve(procs, "127.0.0.1", port)
    a, b = model_answers(port), kernel_answers(port)
    assert a == b
    # and a lone dual-stack socket answers both
    serve(procs, "::", port + 1, v6only=0)
    assert model_answers(port + 1) == kernel_answers(port + 1)
    assert len(kernel_answers(port + 1)[0] | kernel_answers(port + 1)[1]) == 1


def test_split_flagged_by_ls_why_and_json(netns, procs) -> None:  # type: ignore[no-untyped-def]
    port = 18202
    a = serve(procs, "127.0.0.1", port)
    b = serve(procs, "::1", port)
    assert kernel_answers(port) == ({a}, {b})
    f = find_split(port, socket_table(ports=[port]).entries, localhost_resolution(port))
    assert f is not None and f.kind is SplitKind.SPLIT and f.v4.pids == {a} and f.v6.pids == {b}

    ls = cli("ls", str(port))
    assert ls.returncode == 0, ls.stderr
    marked = [line for line in ls.stdout.splitlines() if "localhost-split" in line]
    assert len(marked) == 2 and any(f"[{a}]" in m for m in marked) and any(f"[{b}]" in m for m in marked)
    doc = json.loads(cli("ls", "--json").stdout)
    (finding,) = [x for x in doc["localhost"] if x["port"] == port]
    assert finding["kind"] == "split" and finding["ipv4"]["pids"] == [a] and finding["ipv6"]["pids"] == [b]

    why = cli("why", str(port))
    assert f"localhost:{port} is split" in why.stdout, why.stdout
    wdoc = json.loads(cli("why", str(port), "--json").stdout)
    assert wdoc["localhost"]["kind"] == "split"


def test_same_process_on_both_is_not_flagged(netns, procs) -> None:  # type: ignore[no-untyped-def]
    port = 18203
    code = f"""
import socket, time
a = socket.socket(); a.bind(('127.0.0.1', {port})); a.listen()
b = socket.socket(socket.AF_INET6); b.bind(('::1', {port})); b.listen()
print('ready', flush=True); time.sleep(600)
"""
    p = procs.python(code)
    assert procs.wait_line(p) == "ready"
    assert find_split(port, socket_table(ports=[port]).entries, localhost_resolution(port)) is None
    assert "localhost" not in cli("ls", str(port)).stdout
    assert json.loads(cli("why", str(port), "--json").stdout)["localhost"] is None


def test_ipv6_only_server_reported_and_127_refused(netns, procs) -> None:  # type: ignore[no-untyped-def]
    port = 18204
    b = serve(procs, "::1", port)
    assert kernel_answers(port) == (set(), {b})  # 127.0.0.1 really gets ECONNREFUSED
    why = cli("why", str(port))
    assert f"via IPv6 only; 127.0.0.1:{port} gets ECONNREFUSED" in why.stdout, why.stdout
    # Marked in ls when some client is refused through the name localhost here: when the
    # resolver lists 127.0.0.1 first (or alone), curl-like clients get ECONNREFUSED.
    f = find_split(port, socket_table(ports=[port]).entries, localhost_resolution(port))
    assert f is not None
    from rebind.model.localhost import loopback_only

    resolver_v4_first = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)[0][0] == socket.AF_INET
    assert loopback_only(f) is resolver_v4_first
    assert ("lh:v6-only" in cli("ls", str(port)).stdout) is resolver_v4_first


def test_resolver_order_from_etc_hosts_decides_who_curl_reaches(netns, procs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With ::1 listed first, getaddrinfo returns ::1 first: the resolver-order client (Python's
    create_connection, which moves on after a refusal) reaches the ::1 server -- what `why` says."""
    port = 18205
    a = serve(procs, "0.0.0.0", port)
    b = serve(procs, "::1", port)
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 localhost ip6-localhost\n127.0.0.1 localhost\n")
    doc = json.loads(cli("why", str(port), "--json", hosts=hosts).stdout)
    lh = doc["localhost"]
    assert lh["kind"] == "split" and lh["resolver_order"] == ["::1", "127.0.0.1"]
    assert lh["hosts_lines"][0] == {"line": 1, "addr": "::1", "names": ["localhost", "ip6-localhost"]}
    curl = lh["clients"][0]["reaches"]
    probe = f"import socket; c = socket.create_connection(('localhost', {port})); print(c.recv(64).decode())"
    inner = 'mount --bind "$0" /etc/hosts && exec "$@"'
    got = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            inner,
            str(hosts),
            sys.executable,
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    reached = int(got.stdout)
    assert reached == (b if curl == "::1" else a)
    assert reached == b  # ::1 first in this /etc/hosts
    # /etc/hosts listing 127.0.0.1 first does not make it first: getaddrinfo sorts by RFC 6724
    # (::1's precedence 50 beats ::ffff:0:0/96's 35 unless gai.conf says otherwise) -- why Node 17
    # went to ::1. rebind reports the resolver's own order, and says the file order differs.
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    lh2 = json.loads(cli("why", str(port), "--json", hosts=hosts).stdout)["localhost"]
    order = "import socket; print(' '.join(dict.fromkeys(a[4][0] for a in socket.getaddrinfo('localhost', 1, type=socket.SOCK_STREAM))))"
    real = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            inner,
            str(hosts),
            sys.executable,
            "-c",
            order,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert lh2["resolver_order"] == real
    if real[0] == "::1":
        assert any("RFC 6724" in line for line in lh2["text"])
