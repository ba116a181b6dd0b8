"""Every line `rebind why` prints as a fix runs exactly as printed (issue 18 #11).

In a throwaway namespace with existing reservations and server ports on both sides of the range:
`rebind why --connect` (and `rebind why PORT` for the server side's sysctl line) prints its fixes;
each ``$ `` line runs with ``sh -c``, each Python block with ``python3 -c`` and each C block is
compiled (when a C compiler is present) around an open socket ``fd``; then the sysctls must hold
the old values merged with the new ones, no server port may have been pulled into the range, and
connect() must work.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.toolcheck import need_tool

EXISTING = "30000-30010,45000"


def sysctl(name: str, value: str | None = None) -> str:
    path = Path("/proc/sys/net/ipv4") / name
    if value is not None:
        path.write_text(value)
    return path.read_text().strip()


@dataclass
class Printed:
    commands: list[str] = field(default_factory=list)
    python: list[str] = field(default_factory=list)
    c: list[str] = field(default_factory=list)


def printed_fixes(text: str) -> Printed:
    """The fix lines as a user sees them (plain output): ``     $ CMD``, ``     Python: ...`` and
    ``     C:      ...`` blocks with 13-space continuation lines."""
    out = Printed()
    lines = text.splitlines()
    start = lines.index("Fixes")
    block: list[str] | None = None
    for line in lines[start + 1 :]:
        if line.startswith("     $ "):
            out.commands.append(line[7:])
            block = None
        elif line.startswith(("     Python: ", "     C:      ")):
            block = [line[13:]]
            (out.python if line.startswith("     Python") else out.c).append(block)  # type: ignore[arg-type]
        elif line.startswith(" " * 13) and block is not None:
            block.append(line[13:])
        else:
            block = None
    out.python = ["\n".join(b) for b in out.python]  # type: ignore[misc]
    out.c = ["\n".join(b) for b in out.c]  # type: ignore[misc]
    return out


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    need_tool("sysctl")
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30)


C_HARNESS = """#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <sys/socket.h>
int main(void) {
    int fd = socket(%s, %s, 0);
    {
%s
    }
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    int connected = getpeername(fd, (struct sockaddr *)&peer, &len) == 0;
    return %s;
}
"""


def run_c(
    code: str, tmp: Path, family: str = "AF_INET", kind: str = "SOCK_STREAM"
) -> subprocess.CompletedProcess[str]:
    """Compile the printed statements around an open socket ``fd``; when they connect(), the
    program exits 0 only if the socket is connected afterwards."""
    cc = need_tool("cc")
    check = "connected ? 0 : 3" if "connect(" in code else "(void)connected, 0"
    src = tmp / "fix.c"
    src.write_text(C_HARNESS % (family, kind, code, check))
    exe = tmp / "fix"
    comp = subprocess.run([cc, "-Wall", "-Werror", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert comp.returncode == 0, comp.stderr + src.read_text()
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)


def hold(ports: list[int]) -> list[socket.socket]:
    out = []
    for p in ports:
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        s.listen()
        out.append(s)
    return out


def test_exhausted_range_fixes_merge_reservations_and_spare_server_ports(netns, rebind_cli):
    """Range 40000-40009 wholly held by listeners; servers also listen on 39990 and 40100 (just
    outside) and 45000 (reserved). Before the fix, fix 3 replaced the reservations with
    `8080,9000` and widened to 15000-64999 over 39990 and 40100."""
    sysctl("ip_local_port_range", "40000 40009")
    sysctl("ip_local_reserved_ports", EXISTING)
    socks = hold([9000, 39990, 40100, 45000, *range(40000, 40010)])
    try:
        res = rebind_cli("why", "--connect", "127.0.0.1:9000")
        assert res.returncode == 1 and "EADDRNOTAVAIL" in res.stdout, res.stdout
        fixes = printed_fixes(res.stdout)
        assert len(fixes.commands) == 2, res.stdout  # widen, tcp_tw_reuse
        for cmd in fixes.commands:
            done = sh(cmd)
            assert done.returncode == 0, (cmd, done.stderr)
        # The old reservations are kept, the servers inside the range added, in the kernel's form.
        assert sysctl("ip_local_reserved_ports") == "30000-30010,40000-40009,45000"
        lo, hi = map(int, sysctl("ip_local_port_range").split())
        assert lo < 40000 and hi > 40009, (lo, hi)
        assert not lo <= 39990 <= hi and not lo <= 40100 <= hi  # no server port pulled in
        assert (hi - lo + 1) % 2 == 0  # even count (C1)
        assert sysctl("tcp_tw_reuse") == "1"
        # connect() works now.
        c = socket.create_connection(("127.0.0.1", 9000))
        assert lo <= c.getsockname()[1] <= hi
        c.close()
    finally:
        for s in socks:
            s.close()


def test_widening_is_not_proposed_when_server_ports_border_the_range(netns, rebind_cli):
    sysctl("ip_local_port_range", "40000 40009")
    socks = hold([9000, 39999, 40010, *range(40000, 40010)])
    try:
        res = rebind_cli("why", "--connect", "127.0.0.1:9000")
        assert res.returncode == 1
        fixes = printed_fixes(res.stdout)
        assert not any("ip_local_port_range" in c for c in fixes.commands), res.stdout
        assert "No wider ephemeral range is proposed" in res.stdout and "39999, 40010" in res.stdout
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("127.0.0.1:9000", ()),  # pool, sources, widen, per-socket range, tcp_tw_reuse
        ("127.0.0.1:9000", ("--bind-before-connect", "--from", "127.0.0.1")),  # + IP_BIND_ADDRESS_NO_PORT
        ("127.0.0.1:9000", ("--from", "127.0.0.1:40100", "--reuseaddr")),  # + never a fixed port
        ("[::1]:9000", ()),
        ("[::1]:9000", ("--bind-before-connect", "--from", "::1")),
    ],
    ids=["own-choice", "bind-before-connect", "fixed-port", "v6-own-choice", "v6-bind-before-connect"],
)
def test_every_python_and_c_fix_runs_as_printed(netns, rebind_cli, tmp_path, target, args):
    """Under pressure (60 of 100 ports held by bind()) every fix is printed; each Python block
    runs with python3 -c and each C block compiles and connects. The IP_LOCAL_PORT_RANGE line
    raised before the fix (an int > INT_MAX) and ignored the real range."""
    sysctl("ip_local_port_range", "40000 40099")
    socks = hold([9000, *range(40000, 40060)])
    socks.append(socket.create_server(("::1", 9000), family=socket.AF_INET6))
    family = "AF_INET6" if target.startswith("[") else "AF_INET"
    try:
        res = rebind_cli("why", "--connect", target, *args)
        fixes = printed_fixes(res.stdout)
        assert len(fixes.python) >= 3, res.stdout
        if args:
            assert ("IP_BIND_ADDRESS_NO_PORT" in res.stdout) or ("Never bind" in res.stdout)
        assert any("struct.pack" in p for p in fixes.python) or args, res.stdout
        for code in fixes.python:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (code, done.stderr)
        for code in fixes.c:
            done = run_c(code, tmp_path, family)
            assert done.returncode == 0, (code, done.returncode)
    finally:
        for s in socks:
            s.close()


def test_udp_fix_lines_run_as_printed(netns, rebind_cli, tmp_path):
    """UDP: 60 of 100 ports held by bound UDP sockets; the fixes are UDP ones (no tcp_tw_reuse,
    SOCK_DGRAM sockets) and each Python and C block runs as printed."""
    sysctl("ip_local_port_range", "40000 40099")
    socks = []
    for p in range(40000, 40060):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", p))
        socks.append(u)
    try:
        res = rebind_cli("why", "--connect", "127.0.0.1:9000", "--udp")
        fixes = printed_fixes(res.stdout)
        assert "tcp_tw_reuse" not in res.stdout and len(fixes.python) >= 3, res.stdout
        assert all("SOCK_DGRAM" in p for p in fixes.python if "socket.socket(" in p), res.stdout
        for code in fixes.python:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (code, done.stderr)
        for code in fixes.c:
            done = run_c(code, tmp_path, "AF_INET", "SOCK_DGRAM")
            assert done.returncode == 0, (code, done.returncode)
    finally:
        for s in socks:
            s.close()


def test_per_socket_range_line_uses_a_slice_with_free_ports(netns, rebind_cli):
    """The printed IP_LOCAL_PORT_RANGE slice lies inside the real range and holds free ports:
    a connect() made with it lands in the slice."""
    sysctl("ip_local_port_range", "40000 40099")
    socks = hold([9000, *range(40000, 40060)])
    try:
        res = rebind_cli("why", "--connect", "127.0.0.1:9000")
        code = next(p for p in printed_fixes(res.stdout).python if "struct.pack" in p)
        code += "\nprint(s.getsockname()[1])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert 40060 <= int(done.stdout) <= 40099
    finally:
        for s in socks:
            s.close()


def test_server_side_reserve_line_keeps_existing_reservations(netns, rebind_cli):
    """`rebind why PORT` for a port an outgoing connection holds prints a sysctl that reserves
    it; before the fix it replaced the namespace's reservations with that one port."""
    sysctl("ip_local_port_range", "40000 40099")
    sysctl("ip_local_reserved_ports", EXISTING)
    srv = socket.create_server(("127.0.0.1", 18108))
    cli = socket.socket()
    cli.bind(("127.0.0.1", 40050))  # stands in for a port connect() picked
    cli.connect(("127.0.0.1", 18108))
    acc, _ = srv.accept()
    try:
        res = rebind_cli("why", "40050")
        assert res.returncode == 1
        lines = [ln.strip()[2:] for ln in res.stdout.splitlines() if ln.strip().startswith("$ sysctl")]
        assert lines, res.stdout
        for cmd in lines:
            done = sh(cmd)
            assert done.returncode == 0, (cmd, done.stderr)
        assert sysctl("ip_local_reserved_ports") == "30000-30010,40050,45000"
        # The note that `ls`/`why` print for a server port inside the range merges too.
        res = rebind_cli("why", "40051")
        assert "ip_local_reserved_ports=30000-30010,40050-40051,45000" in res.stdout + res.stderr
    finally:
        for s in (acc, cli, srv):
            s.close()


def test_server_side_rebind_lines_run_as_printed(netns, rebind_cli):
    """The `$ rebind ...` lines of `rebind why` for an address this host lacks: each runs, as
    printed, to a clean answer (no traceback, no usage error)."""
    res = rebind_cli("why", "18110", "--addr", "192.0.2.1")
    assert res.returncode == 1, res.stdout
    cmds = [m.group(1) for m in re.finditer(r"^\s+\$ (rebind .*)$", res.stdout, re.M)]
    assert any("--addr 0.0.0.0" in c for c in cmds), res.stdout
    for cmd in cmds:
        if cmd.split()[1] in ("run", "free", "wait"):
            continue  # covered by tests/kernel/test_docs_examples.py
        done = rebind_cli(*cmd.split()[1:], timeout=30)
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, (cmd, done.stderr)
