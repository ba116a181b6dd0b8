"""Birth certificates (`rebind trace --install`) against the real kernel.

The post-bind programs attach to the root of the cgroup v2 hierarchy: they are not namespaced
and certify every bind on the host while installed. Each test pins them in a private BPF
filesystem of its own (``REBIND_BPF_DIR``), reads only its own network namespace (inet_diag
dumps the caller's namespace only), and uninstalls and unmounts on teardown, which detaches
them (the pins are the only references).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Procs

Run = Callable[..., subprocess.CompletedProcess[str]]
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

#: Binds and listens as "binder-a", forks "holder-b" that keeps the socket, then exits: the
#: socket is held by a process that never called bind(), and its binder is gone.
BIND_FORK_EXIT = """
import os, socket, time
open('/proc/self/comm', 'w').write('binder-a')
s = socket.socket(socket.{family})
s.bind(({addr!r}, {port}))
s.listen()
child = os.fork()
if child == 0:
    open('/proc/self/comm', 'w').write('holder-b')
    time.sleep(600)
    os._exit(0)
print(os.getpid(), child, flush=True)
"""


def _mount_bpffs(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, b"mode=0700") != 0:
        pytest.skip(f"cannot mount a BPF filesystem: {os.strerror(ctypes.get_errno())}")


@pytest.fixture
def pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private bpffs for the pins; uninstalled and unmounted at teardown (detaches them)."""
    from rebind.kernel import birth

    fs = tmp_path / "bpffs"
    fs.mkdir()
    _mount_bpffs(fs)
    d = str(fs / "rebind")
    monkeypatch.setenv("REBIND_BPF_DIR", d)
    try:
        yield d
    finally:
        birth.uninstall(d)
        ctypes.CDLL(None, use_errno=True).umount2(str(fs).encode(), 0)


@pytest.fixture
def installed(pins: str, rebind_cli: Run) -> str:
    res = rebind_cli("trace", "--install")
    assert res.returncode == 0, res.stderr
    assert "installed" in res.stdout and pins in res.stdout
    return pins


def _bind_fork_exit(
    procs: Procs, port: int, family: str = "AF_INET", addr: str = "127.0.0.1"
) -> tuple[int, int]:
    p = procs.python(BIND_FORK_EXIT.format(family=family, addr=addr, port=port))
    binder, holder = (int(x) for x in procs.wait_line(p).split())
    procs.adopt(holder)
    p.wait(10)
    return binder, holder


def test_ls_names_the_binder_after_the_socket_moved_and_the_binder_exited(
    installed: str, netns: int, procs: Procs, rebind_cli: Run
) -> None:
    before = time.time()
    binder, holder = _bind_fork_exit(procs, 8181)
    after = time.time()
    res = rebind_cli("ls", "8181", "--no-owners")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split()[-1] == "birth"
    assert f"binder-a[{binder}] at " in res.stdout
    res = rebind_cli("ls", "8181")  # the owner scan finds the holder; the certificate the binder
    assert f"holder-b[{holder}]" in res.stdout and f"binder-a[{binder}] at " in res.stdout
    doc = json.loads(rebind_cli("ls", "8181", "--json", "--no-owners").stdout)
    (sock,) = doc["sockets"]
    b = sock["birth"]
    assert (b["pid"], b["comm"], b["port"], b["uid"], b["hook"]) == (binder, "binder-a", 8181, 0, "bind4")
    assert before - 1 <= b["at"] <= after + 1  # CLOCK_BOOTTIME converted to the epoch
    assert b["cgroup_id"] == sock["cgroup_id"]  # INET_DIAG_CGROUP_ID: the socket's cgroup


def test_ipv6_listener_and_why(installed: str, netns: int, procs: Procs, rebind_cli: Run) -> None:
    binder, _holder = _bind_fork_exit(procs, 8182, "AF_INET6", "::1")
    res = rebind_cli("why", "8182", "--addr", "::1")
    assert res.returncode != 0
    assert f"bound by binder-a[{binder}] at " in res.stdout, res.stdout
    doc = json.loads(rebind_cli("ls", "8182", "--json").stdout)
    assert [s["birth"]["hook"] for s in doc["sockets"]] == ["bind6"]


def test_top_rows_carry_the_certificate(installed: str, netns: int, procs: Procs) -> None:
    """top's sampler reads the table without an owner scan per socket: the row still names
    who bound it (a listener that lives 200 ms needs no /proc scan in time)."""
    from rebind.sockets import socket_table
    from rebind.top.model import build_rows, row_owners_text

    with socket.socket() as s:
        open_comm = Path("/proc/thread-self/comm")
        old = open_comm.read_text().strip()
        open_comm.write_text("short-lived")
        try:
            s.bind(("127.0.0.1", 8183))
        finally:
            open_comm.write_text(old)
        s.listen()
        table = socket_table(ports=[8183], owners=False)
    (row,) = build_rows(table.entries)
    assert row.birth is not None and row.birth.comm == "short-lived"
    assert row.birth.pid == os.getpid() and row.birth.tid == threading_native_id()
    assert row_owners_text(row).startswith(f"bound by short-lived[{os.getpid()}] at ")
    # top --record keeps it: `rebind history` names the binder once the listener is gone
    from rebind.model.records import Proto
    from rebind.top.events import describe, diff, from_json, to_line
    from rebind.top.model import PortKey, PortView

    key = PortKey(8183, Proto.TCP)
    (appeared,) = diff({}, {key: PortView(key=key, rows=(row,))}, time.time())
    doc = json.loads(to_line(appeared))
    assert doc["bound_by"]["comm"] == "short-lived" and doc["bound_by"]["pid"] == os.getpid()
    assert f"bound by short-lived[{os.getpid()}] at " in describe(from_json(doc))


def threading_native_id() -> int:
    import threading

    return threading.get_native_id()


def test_not_installed_shows_nothing_new(pins: str, netns: int, procs: Procs, rebind_cli: Run) -> None:
    _bind_fork_exit(procs, 8184)
    res = rebind_cli("ls", "8184")
    assert res.returncode == 0 and "bound by" not in res.stdout
    doc = json.loads(rebind_cli("ls", "8184", "--json").stdout)
    assert [s["birth"] for s in doc["sockets"]] == [None]


def test_uninstall_detaches_the_programs(installed: str, netns: int, rebind_cli: Run) -> None:
    from rebind.kernel import birth
    from rebind.kernel.bpf.syscall import map_lookup
    from rebind.model.birth import VALUE

    fd = birth.obj_get(os.path.join(installed, birth.MAP_PIN))  # keeps the map, not the links
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            assert map_lookup(fd, struct.pack("<i", s.fileno()), VALUE.size)  # certified
        res = rebind_cli("trace", "--uninstall")
        assert res.returncode == 0 and "removed" in res.stdout, res.stderr
        assert not os.path.exists(installed)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            with pytest.raises(OSError) as exc:  # ENOENT: no program wrote a certificate
                map_lookup(fd, struct.pack("<i", s.fileno()), VALUE.size)
            assert exc.value.errno == 2
    finally:
        os.close(fd)
    res = rebind_cli("trace", "--uninstall")
    assert res.returncode == 0 and "not installed" in res.stdout


def test_install_twice_is_a_no_op(installed: str, rebind_cli: Run) -> None:
    res = rebind_cli("trace", "--install")
    assert res.returncode == 0 and "already installed" in res.stdout


def test_unprivileged_install_says_what_is_missing(pins: str) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PATH": os.environ.get("PATH", ""),
        "REBIND_BPF_DIR": pins,
    }
    res = subprocess.run(
        [*NOBODY, sys.executable, "-m", "rebind", "trace", "--install"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 3, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_BPF" in lines[0] and "Traceback" not in res.stderr
    assert not os.path.exists(pins)


def test_a_map_in_a_directory_others_can_write_is_not_read(
    installed: str, netns: int, procs: Procs, rebind_cli: Run
) -> None:
    """Root's `ls` reads certificates only from root's own pin directory, not one others can
    write (where anyone could have pinned a map of their own first)."""
    binder, _ = _bind_fork_exit(procs, 8185)
    assert f"binder-a[{binder}]" in rebind_cli("ls", "8185").stdout
    os.chmod(installed, 0o777)
    try:
        res = rebind_cli("ls", "8185")
        assert res.returncode == 0 and "bound by" not in res.stdout
    finally:
        os.chmod(installed, 0o700)


def _trace_one_without_owners(procs: Procs, netns: int) -> subprocess.Popen[str]:
    """`rebind trace --json --no-owners` for one event in ``netns``, tracing already."""
    argv = [sys.executable, "-m", "rebind", "trace", "--json", "--no-owners", "--netns", str(netns)]
    t = procs.start([*argv, "--count", "1"])
    assert t.stderr is not None and "tracing" in t.stderr.readline()
    return t


def _failing_bind_seen(t: subprocess.Popen[str], port: int) -> dict[str, Any]:
    """A bind of 127.0.0.1:``port`` that fails, and the event ``t`` printed for it."""
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", port))
    out, _err = t.communicate(timeout=60)
    doc: dict[str, Any] = json.loads(out.splitlines()[0])
    return doc


def test_trace_without_owner_scan_names_the_binder(installed: str, netns: int, procs: Procs) -> None:
    """`rebind trace --no-owners` skips the owner scan; the blocker still has a name."""
    t = _trace_one_without_owners(procs, netns)
    binder, _ = _bind_fork_exit(procs, 8186)
    doc = _failing_bind_seen(t, 8186)
    assert doc["port"] == 8186 and f"(bound by binder-a[{binder}] at " in doc["snapshot"]["reason"]


#: Binds 127.0.0.1:PORT as "binder-a" and connects from it to a listener of its own, forks
#: "holder-b" that keeps both, then exits: the port is held by an ESTABLISHED connection.
BIND_CONNECT_FORK_EXIT = """
import os, socket, time
open('/proc/self/comm', 'w').write('binder-a')
srv = socket.socket()
srv.bind(('127.0.0.1', 0))
srv.listen()
s = socket.socket()
s.bind(('127.0.0.1', {port}))
s.connect(srv.getsockname())
peer, _ = srv.accept()
child = os.fork()
if child == 0:
    open('/proc/self/comm', 'w').write('holder-b')
    time.sleep(600)
    os._exit(0)
print(os.getpid(), child, flush=True)
"""


def test_trace_without_owner_scan_names_a_connection_s_binder(
    installed: str, netns: int, procs: Procs
) -> None:
    """A connection whose port bind() named blocks the bind. The bind hash's records carry no
    certificate and a LISTEN-only dump cannot give this one, so the snapshot takes the dumps
    (kernel/trace_bindhash.py: _with_births) rather than show the blocker without its name."""
    t = _trace_one_without_owners(procs, netns)
    p = procs.python(BIND_CONNECT_FORK_EXIT.format(port=8187))
    binder, holder = (int(x) for x in procs.wait_line(p).split())
    procs.adopt(holder)
    p.wait(10)
    doc = _failing_bind_seen(t, 8187)
    assert doc["port"] == 8187 and f"(bound by binder-a[{binder}] at " in doc["snapshot"]["reason"]


def test_listen_without_bind_is_certified_and_a_bind_certificate_is_kept(
    installed: str, netns: int, procs: Procs, rebind_cli: Run
) -> None:
    """listen() on an unbound socket picks its own port (inet_csk_listen_start): the sock_ops
    listen hook certifies it; for a socket bind() certified, listen() changes nothing."""
    comm = Path("/proc/thread-self/comm")
    old = comm.read_text().strip()
    try:
        comm.write_text("auto-listener")
        auto = socket.socket()
        auto.listen()
        comm.write_text("later-listen")
        bound = socket.socket()
        comm.write_text("the-binder")
        bound.bind(("127.0.0.1", 0))
        comm.write_text("later-listen")
        bound.listen()
    finally:
        comm.write_text(old)
    with auto, bound:
        ports = {auto.getsockname()[1]: "auto-listener", bound.getsockname()[1]: "the-binder"}
        doc = json.loads(rebind_cli("ls", *map(str, ports), "--json", "--no-owners").stdout)
        got = {
            s["local"]["port"]: (s["birth"]["comm"], s["birth"]["hook"], s["birth"]["port"])
            for s in doc["sockets"]
        }
        assert got == {
            p: (name, "listen" if name == "auto-listener" else "bind4", p) for p, name in ports.items()
        }


def test_docs_bpftool_commands_show_what_stays_loaded_and_rm_removes_it(
    installed: str, netns: int, rebind_cli: Run
) -> None:
    """docs/trace.md, "What stays loaded": `bpftool cgroup show ROOT` lists the eight programs,
    `bpftool map show pinned DIR/birth_map` the map (`map dump` cannot list an SK_STORAGE map,
    as the doc says), and `rm DIR/birth_*` removes everything, as `--uninstall` does. Run as the doc prints them, with
    this test's private pin directory in place of /sys/fs/bpf/rebind."""
    from rebind.kernel import birth
    from tests.toolcheck import need_tool

    bpftool = need_tool("bpftool")
    root = birth.cgroup2_root()
    shown = subprocess.run([bpftool, "cgroup", "show", root], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    for name in (h.name.decode() for h in birth.HOOKS):  # the eight programs
        assert name in shown.stdout, shown.stdout
    pinned = os.path.join(installed, "birth_map")
    shown_map = subprocess.run(
        [bpftool, "map", "show", "pinned", pinned], capture_output=True, text=True, timeout=30
    )
    assert shown_map.returncode == 0 and "sk_storage" in shown_map.stdout, shown_map
    assert "rebind_birth" in shown_map.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        # What the doc says bpftool cannot do: an SK_STORAGE map has no keys to walk.
        dump = subprocess.run(
            [bpftool, "map", "dump", "pinned", pinned], capture_output=True, text=True, timeout=30
        )
        assert dump.returncode != 0 and dump.stdout.strip() == "[]", dump
    rm = subprocess.run(f"rm {installed}/birth_*", shell=True, capture_output=True, text=True, timeout=30)
    assert rm.returncode == 0, rm.stderr
    assert birth.installed(installed) == []
    after = subprocess.run([bpftool, "cgroup", "show", root], capture_output=True, text=True, timeout=30)
    assert "rebind_birth" not in after.stdout, after.stdout


class _Comm:
    """This thread's comm for the duration of a block (what bpf_get_current_comm records)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = Path("/proc/thread-self/comm")

    def __enter__(self) -> None:
        self.old = self.path.read_text().strip()
        self.path.write_text(self.name)

    def __exit__(self, *exc: object) -> None:
        self.path.write_text(self.old)


def _births(rebind_cli: Run, *args: str) -> dict[tuple[str, int, int], dict[str, object]]:
    """(proto, local port, remote port) -> the birth JSON of `ls ARGS --json --no-owners`."""
    res = rebind_cli("ls", *args, "--json", "--no-owners")
    assert res.returncode == 0, res.stderr
    return {
        (s["proto"], s["local"]["port"], s["remote"]["port"]): s["birth"]
        for s in json.loads(res.stdout)["sockets"]
    }


def test_connect_and_accept_are_certified(installed: str, netns: int, rebind_cli: Run) -> None:
    """connect() on a socket without a port chooses one (inet_hash_connect): the connect hook
    names the connecting task; a connection accept() returns carries its listener's certificate
    (BPF_F_CLONE), marked accepted; a socket bind() gave a port keeps bind()'s."""
    with _Comm("server-bind"):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 8190))
    srv.listen()
    with _Comm("the-client"):
        cli = socket.create_connection(("127.0.0.1", 8190))
    with _Comm("bound-client"):
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
    with _Comm("later-connect"):
        bound.connect(("127.0.0.1", 8190))
    with _Comm("no-port-bind"):
        noport = socket.socket()
        noport.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT: connect() picks it
        noport.bind(("127.0.0.1", 0))
    with _Comm("noport-conn"):
        noport.connect(("127.0.0.1", 8190))
    conns = [srv.accept()[0] for _ in range(3)]
    try:
        cport, bport, nport = (s.getsockname()[1] for s in (cli, bound, noport))
        got = _births(rebind_cli, "8190", str(cport), str(bport), str(nport))
        client = got["tcp", cport, 8190]
        assert client is not None
        assert (client["comm"], client["hook"], client["port"], client["accepted"]) == (
            "the-client",
            "connect",
            cport,
            False,
        )
        assert client["pid"] == os.getpid() and client["tid"] == threading_native_id()
        assert got["tcp", bport, 8190]["comm"] == "bound-client"  # type: ignore[index]
        assert got["tcp", bport, 8190]["hook"] == "bind4"  # type: ignore[index]
        assert got["tcp", nport, 8190]["comm"] == "noport-conn"  # type: ignore[index]
        assert got["tcp", nport, 8190]["hook"] == "connect"  # type: ignore[index]
        listener = got["tcp", 8190, 0]
        assert listener is not None and listener["comm"] == "server-bind" and not listener["accepted"]
        for peer in (cport, bport, nport):
            child = got["tcp", 8190, peer]
            assert child is not None, peer
            assert (child["comm"], child["hook"], child["accepted"]) == ("server-bind", "bind4", True)
        table = rebind_cli("ls", "8190", "--no-owners").stdout
        assert f"accepted on a socket bound by server-bind[{os.getpid()}] at " in table
        assert f"bound by server-bind[{os.getpid()}] at " in table
        table = rebind_cli("ls", str(cport), "--no-owners").stdout
        assert f"connected by the-client[{os.getpid()}] at " in table
    finally:
        for s in (*conns, cli, bound, noport, srv):
            s.close()


def test_udp_sockets_are_certified_and_read(installed: str, netns: int, rebind_cli: Run) -> None:
    """inet_diag does not return a UDP socket's storage: `ls` reads it with the UDP socket
    iterator. bind(), connect()'s autobind and sendto()'s autobind are certified; a socket made
    before the install and autobound by a send after it is not (its port could be bind()'s)."""
    with _Comm("udp-binder"):
        b4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b4.bind(("127.0.0.1", 8191))
        b6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        b6.bind(("::1", 8192))
    with _Comm("udp-connect"):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.connect(("127.0.0.1", 8191))
    with _Comm("udp-sendto"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ("127.0.0.1", 8191))
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s6.sendto(b"x", ("::1", 8192))
    with _Comm("later-send"):
        s.sendto(b"y", ("127.0.0.1", 8191))  # the first send's certificate is kept
        b4.sendto(b"z", ("127.0.0.1", 8191))  # a bound socket's too
    try:
        cport, sport, sport6 = c.getsockname()[1], s.getsockname()[1], s6.getsockname()[1]
        got = _births(rebind_cli, "8191", "8192", str(cport), str(sport), str(sport6))
        assert got["udp", 8191, 0]["comm"] == "udp-binder"  # type: ignore[index]
        assert got["udp", 8191, 0]["hook"] == "bind4"  # type: ignore[index]
        assert got["udp", 8192, 0]["hook"] == "bind6"  # type: ignore[index]
        conn = got["udp", cport, 8191]
        assert conn is not None and (conn["comm"], conn["hook"], conn["port"]) == (
            "udp-connect",
            "connect",
            cport,
        )
        for port in (sport, sport6):
            sent = got["udp", port, 0]
            assert sent is not None and (sent["comm"], sent["hook"], sent["port"]) == (
                "udp-sendto",
                "sendmsg",
                port,
            )
        assert got["udp", 8191, 0]["comm"] == "udp-binder"  # type: ignore[index]
        assert f"autobound by udp-sendto[{os.getpid()}] at " in rebind_cli("ls", str(sport)).stdout
        res = rebind_cli("why", "8191", "--udp")
        assert f"bound by udp-binder[{os.getpid()}] at " in res.stdout, res.stdout
        assert f"connected by udp-connect[{os.getpid()}] at " in rebind_cli("ls", str(cport)).stdout
        # the reader is asked only while the map is pinned; without it nothing changes
        assert _births(rebind_cli, "8191")["udp", 8191, 0] is not None
        birth_uninstall(installed)
        assert _births(rebind_cli, "8191")["udp", 8191, 0] is None
    finally:
        for x in (b4, b6, c, s, s6):
            x.close()


def birth_uninstall(directory: str) -> None:
    from rebind.kernel import birth

    birth.uninstall(directory)


def test_udp_reader_failing_is_no_certificate(installed: str, netns: int, rebind_cli: Run) -> None:
    """Whatever stops the UDP reader (here: no CAP_PERFMON/CAP_SYS_ADMIN for the iterator while
    inet_diag still gets the map), `ls` works and shows UDP sockets without a certificate."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        u.bind(("127.0.0.1", 8193))
        t.bind(("127.0.0.1", 8193))
        t.listen()
        capsh = ["capsh", "--drop=cap_perfmon,cap_sys_admin", "--"]
        from tests.toolcheck import need_tool

        need_tool("capsh")
        env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
        res = subprocess.run(
            [*capsh, "-c", f"{sys.executable} -m rebind ls 8193 --json --no-owners"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        got = {s["proto"]: s["birth"] for s in json.loads(res.stdout)["sockets"]}
        assert got["udp"] is None and got["tcp"] is not None  # TCP's comes through inet_diag


def test_install_replaces_an_older_install_and_uninstall_removes_all(
    pins: str, netns: int, rebind_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install of before accepted connections were certified pinned a map without
    BPF_F_CLONE (a map's flags never change) and no connect programs: --install replaces it
    all, says so, and --uninstall removes every pin, old names and new."""
    from rebind.kernel import birth
    from rebind.kernel.bpf import birth_prog

    with monkeypatch.context() as m:  # the older install: its map flags, its three hooks
        m.setattr(birth_prog, "MAP_FLAGS", birth_prog.BPF_F_NO_PREALLOC)
        m.setattr(birth, "HOOKS", birth.HOOKS[:3])
        birth.install(pins)
    assert birth.installed(pins) == ["birth_bind4", "birth_bind6", "birth_listen", "birth_map"]
    fd = birth.obj_get(os.path.join(pins, birth.MAP_PIN))
    try:
        assert not birth.map_flags(fd)[1] & birth_prog.BPF_F_CLONE
    finally:
        os.close(fd)
    res = rebind_cli("trace", "--install")
    assert res.returncode == 0, res.stderr
    assert "replaced an older install" in res.stdout and "installed" in res.stdout
    assert birth.installed(pins) == list(birth.PINS)
    fd = birth.obj_get(os.path.join(pins, birth.MAP_PIN))
    try:
        assert birth.map_flags(fd)[1] & birth_prog.BPF_F_CLONE
    finally:
        os.close(fd)
    # the same pins with a map of the right flags: a no-op
    assert "already installed" in rebind_cli("trace", "--install").stdout
    res = rebind_cli("trace", "--uninstall")
    assert res.returncode == 0 and all(n in res.stdout for n in birth.PINS), res.stdout
    assert not os.path.exists(pins)


def test_a_socket_older_than_the_install_autobound_by_a_send_is_not_certified(
    pins: str, netns: int, rebind_cli: Run
) -> None:
    """A UDP socket bound before --install and sending after it: nothing in the send hook's
    view tells its port from an autobind's, so no certificate (rather than a wrong one); a
    socket made before and autobound by a send after, the same."""
    old_bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old_bound.bind(("127.0.0.1", 0))
    old_unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        res = rebind_cli("trace", "--install")
        assert res.returncode == 0, res.stderr
        old_bound.sendto(b"x", ("127.0.0.1", 9))
        old_unbound.sendto(b"x", ("127.0.0.1", 9))
        ports = [str(s.getsockname()[1]) for s in (old_bound, old_unbound)]
        got = _births(rebind_cli, *ports)
        assert [got["udp", int(p), 0] for p in ports] == [None, None]
    finally:
        old_bound.close()
        old_unbound.close()
