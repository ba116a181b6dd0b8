"""`rebind demo`: the origin post replayed with real processes, and what rebind says at each step.

Runs in a private network namespace, so nothing on the machine can collide with it and nothing
leaks out. Where namespaces are not permitted, it uses free high ports on 127.0.0.1 instead.
The 60 s TIME_WAIT is never waited out: leftovers are removed with SOCK_DESTROY (Linux 6.0+), or,
without CAP_NET_ADMIN, each step takes a fresh port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

# The post's server, verbatim but for the port and a flush so we can see its output.
POST_SERVER = """\
import socket

s = socket.socket()
{setsockopt}s.bind(('0.0.0.0', {port}))
s.listen()
print('listening', flush=True)
(client, addr) = s.accept()
print(client)
print(addr)
"""

REUSEADDR_LINE = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"

# The post's C version, corrected: `listen(s, )` had no backlog, `accept(socket, … in_addr …)`
# passed the function `socket` and the struct instead of the fd and a pointer.
C_SERVER = r"""#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 12345;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_ANY);

    int s = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
    int reuse = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof(reuse));
    if (bind(s, (struct sockaddr *) &addr, sizeof(addr)) < 0) { perror("bind"); return 1; }
    if (listen(s, 16) < 0) { perror("listen"); return 1; }          /* was: listen(s, ) */
    printf("listening\n"); fflush(stdout);

    struct sockaddr_in in_addr;
    socklen_t len = sizeof(in_addr);
    int client = accept(s, (struct sockaddr *) &in_addr, &len);    /* was: accept(socket, ... in_addr ...) */
    printf("client fd %d from %s:%d\n", client, inet_ntoa(in_addr.sin_addr), ntohs(in_addr.sin_port));
    close(client);
    close(s);
    return 0;
}
"""

REUSEPORT_SERVER = """\
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(('0.0.0.0', {port}))
s.listen()
print('listening', flush=True)
while True:
    c, _ = s.accept()
    c.sendall(str(os.getpid()).encode())
    c.close()
"""

Out = Callable[[str], None]


class Demo:
    def __init__(self, out: Out, *, in_netns: bool) -> None:
        self.out = out
        self.in_netns = in_netns
        self.procs: list[subprocess.Popen[str]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="rebind-demo-"))
        self.can_destroy = in_netns and _can_destroy()
        self.step_no = 0

    # -- plumbing ------------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.step_no += 1
        self.out(f"\n[bold cyan]Step {self.step_no}. {title}[/]")

    def say(self, text: str) -> None:
        self.out(f"  {text}")

    def show(self, text: str, style: str = "") -> None:
        from rich.markup import escape

        for line in text.rstrip().splitlines():
            self.out(f"    [{style}]{escape(line)}[/]" if style else f"    {escape(line)}")

    def rebind(self, *args: str) -> str:
        env = dict(os.environ, NO_COLOR="1", COLUMNS="110")
        self.out(f"  [bold]$ rebind {' '.join(args)}[/]")
        res = subprocess.run(
            [sys.executable, "-m", "rebind", *args], capture_output=True, text=True, env=env, timeout=30
        )
        text = (res.stdout + res.stderr).rstrip()
        self.show(text)
        return text

    def start_server(self, code: str, name: str) -> subprocess.Popen[str]:
        path = self.tmp / name
        path.write_text(code)
        return self.start([sys.executable, "-u", str(path)])

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def wait_ready(self, p: subprocess.Popen[str]) -> bool:
        assert p.stdout is not None
        line = p.stdout.readline()
        return line.strip().startswith("listening")

    def connect_and_finish(self, port: int, server: subprocess.Popen[str]) -> str:
        """The `nc 127.0.0.1 PORT` step: connect, let the server print and exit, then close."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            out, err = server.communicate(timeout=10)
            c.settimeout(5)
            # The server exited first, so *its* side goes to TIME_WAIT (the active closer).
            while c.recv(4096):
                pass
        return out + err

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # by pid, through the Popen handle of a process we started
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def clear_port(self, port: int) -> int:
        """Remove TIME_WAIT leftovers with SOCK_DESTROY, or move on to a fresh port."""
        if self.can_destroy:
            from rebind.kernel import diag
            from rebind.kernel.walk import walk
            from rebind.model.query import SocketQuery
            from rebind.model.records import Proto, State

            w = walk(SocketQuery.create(protos=[Proto.TCP], ports=[port], states=[State.TIME_WAIT]))
            # SOCK_DESTROY names a socket by its cookie, which only the netlink reader gives.
            if w.source == "netlink":
                leftovers = list(w.records)  # the dump ends before the first destroy
                for r in leftovers:
                    diag.destroy(r)
                self.say(
                    f"(SOCK_DESTROY removed {len(leftovers)} TIME_WAIT socket(s) on {port}, "
                    "instead of waiting 60 s)"
                )
                return port
        new = _free_port()
        self.say(f"(no SOCK_DESTROY here: continuing on port {new} instead of waiting 60 s)")
        return new

    # -- the story -----------------------------------------------------------------------------

    def run(self) -> bool:
        port = 12345 if self.in_netns else _free_port()
        ok = True
        self.step("The post's server binds the port and waits for a client")
        self.show(POST_SERVER.format(setsockopt="", port=port), "dim")
        srv = self.start_server(POST_SERVER.format(setsockopt="", port=port), "server.py")
        if not self.wait_ready(srv):
            self.say("the server did not start")
            return False
        self.rebind("ls", str(port))

        self.step("A client connects (the post uses `nc 127.0.0.1 PORT`); the server prints and exits")
        self.show(self.connect_and_finish(port, srv))
        self.say("The server closed first, so its end of the connection now sits in TIME_WAIT:")
        self.rebind("ls", str(port))

        self.step("Restarting the server fails")
        again = self.start_server(POST_SERVER.format(setsockopt="", port=port), "server.py")
        _, err = again.communicate(timeout=10)
        self.show(err.strip().splitlines()[-1] if err.strip() else "(no error?)", "red")
        ok &= "Errno 98" in err
        self.rebind("why", str(port))

        self.step("The post's fix, SO_REUSEADDR, fails too: the old socket did not have it")
        self.say("On Linux both sockets need SO_REUSEADDR, and a TIME_WAIT keeps the flag of the socket")
        self.say("that closed. The old server never set it, so the fixed server cannot start yet:")
        fixed = POST_SERVER.format(setsockopt=REUSEADDR_LINE, port=port)
        again = self.start_server(fixed, "server_fixed.py")
        _, err = again.communicate(timeout=10)
        self.show(err.strip().splitlines()[-1] if err.strip() else "(no error?)", "red")
        ok &= "Errno 98" in err
        self.rebind("why", str(port), "--reuseaddr")

        self.step("Once the old socket had SO_REUSEADDR too, the restart works")
        port = self.clear_port(port)
        fixed = POST_SERVER.format(setsockopt=REUSEADDR_LINE, port=port)
        srv = self.start_server(fixed, "server_fixed.py")
        self.wait_ready(srv)
        self.connect_and_finish(port, srv)
        self.say("The fixed server served a client and exited; its TIME_WAIT carries SO_REUSEADDR:")
        self.rebind("why", str(port), "--reuseaddr")
        srv = self.start_server(fixed, "server_fixed.py")
        started = self.wait_ready(srv)
        self.show(
            "restart with SO_REUSEADDR: " + ("listening — no Errno 98" if started else "FAILED"), "green"
        )
        ok &= started
        srv.kill()
        srv.wait()

        ok &= self.c_step(port)
        ok &= self.reuseport_step()

        self.step("Summary")
        self.say("• SO_REUSEADDR helps only if the *old* socket had it too: set it in every server.")
        self.say("• Better still, never close the listener on restart: `rebind run --listen PORT -- CMD`.")
        self.say("• Linux has SO_REUSEPORT since 3.9 (same user, kernel load balancing).")
        self.say("• Client pitfall from the post: a client that binds a fixed port with SO_REUSEADDR can")
        self.say("  take over its own old TIME_WAIT to the same peer; prefer IP_BIND_ADDRESS_NO_PORT.")
        return ok

    def c_step(self, port: int) -> bool:
        cc = shutil.which("cc") or shutil.which("gcc")
        self.step("The post's C server, corrected so that it compiles")
        if cc is None:
            self.say("(no C compiler on this machine: skipped)")
            return True
        src = self.tmp / "server.c"
        src.write_text(C_SERVER.replace("#include <unistd.h>", "#include <unistd.h>\n#include <stdlib.h>"))
        exe = self.tmp / "server"
        res = subprocess.run([cc, "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            self.show(res.stderr, "red")
            return False
        self.say("Fixed: `listen(s, )` -> `listen(s, 16)`, and accept() gets the socket fd and &in_addr.")
        port = self.clear_port(port)
        srv = self.start([str(exe), str(port)])
        self.wait_ready(srv)
        self.show(self.connect_and_finish(port, srv))
        srv = self.start([str(exe), str(port)])
        started = self.wait_ready(srv)
        self.show(
            "C server restarted over its own TIME_WAIT: " + ("listening" if started else "FAILED"),
            "green" if started else "red",
        )
        srv.kill()
        srv.wait()
        return started

    def reuseport_step(self) -> bool:
        self.step("SO_REUSEPORT exists on Linux (since 3.9): two servers, one port, load-balanced")
        port = _free_port() if not self.in_netns else 12346
        a = self.start_server(REUSEPORT_SERVER.format(port=port), "rp.py")
        b = self.start_server(REUSEPORT_SERVER.format(port=port), "rp.py")
        if not (self.wait_ready(a) and self.wait_ready(b)):
            self.say("could not start both servers")
            return False
        seen = set()
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                seen.add(c.recv(32).decode())
        self.say(f"40 connections were served by {len(seen)} different processes: {', '.join(sorted(seen))}")
        self.rebind("ls", str(port), "--state", "listen")
        return len(seen) == 2

    # -- `rebind demo --trace` ---------------------------------------------------------------

    def trace_story(self, netns_inode: int) -> bool:
        """The failed restart, caught by `rebind trace` with its reason (docs/trace.md)."""
        port = 12345
        self.step("`rebind trace` starts recording failing binds (this namespace only)")
        self.out(f"  [bold]$ rebind trace --netns {netns_inode} --count 1[/]")
        tracer = self.start(
            [sys.executable, "-m", "rebind", "trace", "--netns", str(netns_inode), "--count", "1"]
        )
        assert tracer.stderr is not None and tracer.stdout is not None
        first = tracer.stderr.readline().strip()
        if "tracing" not in first:
            tracer.wait(30)
            self.show(first or tracer.stderr.read().strip() or "rebind trace did not start", "red")
            return False
        self.step("The post's server serves one client and exits: its side is left in TIME_WAIT")
        srv = self.start_server(POST_SERVER.format(setsockopt="", port=port), "server.py")
        if not self.wait_ready(srv):
            self.say("the server did not start")
            return False
        self.connect_and_finish(port, srv)
        self.step("The restart fails with Errno 98 ... and the recorder says why, as it happened")
        again = self.start_server(POST_SERVER.format(setsockopt="", port=port), "server.py")
        _, err = again.communicate(timeout=10)
        self.show(err.strip().splitlines()[-1] if err.strip() else "(no error?)", "red")
        try:
            out, summary = tracer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.say("rebind trace printed nothing within 30 s")
            return False
        line = out.strip()
        self.show(line, "yellow")
        self.show(summary.strip(), "dim")
        self.say("By the time anyone runs `rebind why`, this TIME_WAIT may be gone; the line stays.")
        self.say("Record it for later: `rebind trace --record fails.jsonl`, read with `rebind history`.")
        return "Errno 98" in err and "EADDRINUSE" in line and f"TIME_WAIT 127.0.0.1:{port} → " in line


def run_trace_demo(out: Out) -> bool:
    """`rebind demo --trace`: needs root, a private network namespace and `rebind trace`."""
    from rebind.kernel import netns

    t0 = time.monotonic()
    if not netns.namespaces_permitted():
        out("[red]rebind demo --trace needs a private network namespace (run as root).[/]")
        return False
    with ExitStack() as stack:
        inode = stack.enter_context(netns.private_netns())
        out("[dim]Running in a private network namespace: nothing here touches the machine's ports.[/]")
        demo = Demo(out, in_netns=True)
        stack.callback(demo.cleanup)
        ok = demo.trace_story(inode)
    out(f"\n[dim]Demo finished in {time.monotonic() - t0:.1f} s.[/]")
    return ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_destroy() -> bool:
    from rebind.kernel.sysctl import CAP_NET_ADMIN, has_cap, kernel_version

    return has_cap(CAP_NET_ADMIN) and kernel_version() >= (6, 0)


def run_demo(out: Out) -> bool:
    """Run the whole story; True when every step behaved as the story says."""
    from rebind.kernel import netns

    t0 = time.monotonic()
    with ExitStack() as stack:
        in_netns = netns.namespaces_permitted()
        if in_netns:
            stack.enter_context(netns.private_netns())
            out("[dim]Running in a private network namespace: nothing here touches the machine's ports.[/]")
        else:
            out("[yellow]Network namespaces are not permitted here: using free high ports on 127.0.0.1.[/]")
        demo = Demo(out, in_netns=in_netns)
        stack.callback(demo.cleanup)
        ok = demo.run()
    out(f"\n[dim]Demo finished in {time.monotonic() - t0:.1f} s.[/]")
    return ok


# ---------------------------------------------------------------------------------------------
# `rebind demo --client`: the client half (issue 10)

# A client that binds a fixed local port with SO_REUSEADDR before connecting: the post's warning.
FIXED_PORT_CLIENT = """\
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', {lport}))
print('bound', flush=True)
try:
    s.connect(('127.0.0.1', {port}))
except OSError as e:
    print(f'connect: {{e}}', flush=True)
    sys.exit(1)
print('connected', flush=True)
time.sleep(600)
"""

# Opens connections until the kernel refuses, then holds them (or closes them first: TIME_WAIT).
MANY_CLIENTS = """\
import socket, sys, time
held = []
while True:
    try:
        held.append(socket.create_connection(('127.0.0.1', {port})))
    except OSError as e:
        print(f'{{len(held)}} connections, then: {{e}}', flush=True)
        break
time.sleep(600)  # killed by the demo: the kernel closes every socket, client side first
"""

ACCEPTING_SERVER = """\
import socket, threading, time
s = socket.create_server(('127.0.0.1', {port}), backlog=128)
print('listening', flush=True)
kept = []
while True:
    c, _ = s.accept()
    kept.append(c)
    # Close after the client does, so the client's side becomes the TIME_WAIT entry.
    threading.Thread(target=lambda c=c: (c.recv(1), c.close()), daemon=True).start()
"""

RANGE = (40000, 40009)


class ClientDemo(Demo):
    def run(self) -> bool:
        ok = True
        lo, hi = RANGE
        _set_sysctl("ip_local_port_range", f"{lo} {hi}")
        self.step(f"A private namespace with a tiny ephemeral range: {lo}-{hi} (10 ports)")
        self.say("Servers listen on 127.0.0.1:9000 and :9001; every client port comes from the range.")
        for port in (9000, 9001):
            srv = self.start_server(ACCEPTING_SERVER.format(port=port), f"server{port}.py")
            if not self.wait_ready(srv):
                self.say("the server did not start")
                return False

        self.step("The post's client pitfall: a fixed local port with SO_REUSEADDR")
        self.show(FIXED_PORT_CLIENT.format(lport=40001, port=9000), "dim")
        first = self.start_server(FIXED_PORT_CLIENT.format(lport=40001, port=9000), "fixed1.py")
        ok &= self._line(first) == "bound" and self._line(first) == "connected"
        second = self.start_server(FIXED_PORT_CLIENT.format(lport=40001, port=9000), "fixed2.py")
        self._line(second)
        err = self._line(second)
        self.show(f"second client: bind() works (SO_REUSEADDR), then {err}", "red")
        ok &= "Cannot assign requested address" in err
        self.say("Same local port, same server: the same 4-tuple. No kernel setting fixes this design:")
        out = self.rebind("why", "--connect", "127.0.0.1:9000", "--from", "127.0.0.1:40001", "--reuseaddr")
        ok &= "EADDRNOTAVAIL" in out

        self.step("Ephemeral exhaustion: one process opens connections until connect() fails")
        many = self.start([sys.executable, "-u", "-c", MANY_CLIENTS.format(port=9000)])
        line = self._line(many)
        self.show(line, "red")
        ok &= "Cannot assign requested address" in line
        out = self.rebind("why", "--connect", "127.0.0.1:9000")
        ok &= "EADDRNOTAVAIL" in out
        self.say("Ports are shared across destinations: connections to 127.0.0.1:9001 still work ...")
        self.say("(rebind reads the ports' bind buckets with a BPF iterator; where it cannot, the model")
        self.say('gives its worst case, "may fail"; --probe asks the kernel with one real connect())')
        out = self.rebind("why", "--connect", "127.0.0.1:9001", "--probe")
        ok &= "got local port" in out and ("would get a local port" in out or "may fail" in out)
        self.say("... unless the client binds before connecting (bind(ip, 0) needs a wholly unused port):")
        out = self.rebind(
            "why", "--connect", "127.0.0.1:9001", "--bind-before-connect", "--from", "127.0.0.1"
        )
        ok &= "EADDRINUSE" in out
        ok &= self._no_port_works()

        self.step("TIME_WAIT: the client closes first, and its ports stay taken ...")
        many.kill()  # the kernel closes its sockets: the client side closes first
        many.wait()
        self._wait_time_wait()
        self.say("With tcp_tw_reuse=0 every entry blocks its 4-tuple for 60 s:")
        _set_sysctl("tcp_tw_reuse", "0")
        out = self.rebind("why", "--connect", "127.0.0.1:9000")
        ok &= "not reusable now" in out
        self.say("With the default tcp_tw_reuse=2 (loopback only), connect() takes an entry over once it")
        self.say("is older than tcp_tw_reuse_delay (1 s) and carries TCP timestamps:")
        _set_sysctl("tcp_tw_reuse", "2")
        from rebind.connect_diagnosis import connect_diagnose

        deadline = time.monotonic() + 5  # polls the model until the entries are old enough
        while time.monotonic() < deadline and not all(
            t.reusable is not False
            for t in connect_diagnose("127.0.0.1", 9000, owners=False).result.time_waits
        ):
            time.sleep(0.05)
        out = self.rebind("why", "--connect", "127.0.0.1:9000", "--probe")
        ok &= "✓" in out and "got local port" in out

        self.step("Summary")
        self.say("• Never bind a fixed client port; with SO_REUSEADDR two clients to one server collide.")
        self.say("• bind(ip, 0) before connect() needs IP_BIND_ADDRESS_NO_PORT, or a wholly unused port.")
        self.say("• Reuse connections; add source addresses; widen the range and reserve server ports in it.")
        self.say("• `rebind why --connect HOST:PORT` says where the range went and who holds it.")
        return ok

    def _line(self, p: subprocess.Popen[str]) -> str:
        """The next line a demo client prints ('' once it exited). A plain readline(): select()
        on the pipe would miss a second line already sitting in the text wrapper's buffer."""
        assert p.stdout is not None
        return p.stdout.readline().strip()

    def _no_port_works(self) -> bool:
        self.say("With IP_BIND_ADDRESS_NO_PORT set before bind(), the same client gets a port:")
        s = socket.socket()
        try:
            s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
            s.bind(("127.0.0.1", 0))
            s.connect(("127.0.0.1", 9001))
            port = s.getsockname()[1]
            self.show(f"IP_BIND_ADDRESS_NO_PORT + bind(127.0.0.1, 0) + connect(): local port {port}", "green")
            return True
        except OSError as e:
            self.show(f"failed: {e}", "red")
            return False
        finally:
            s.close()

    def _wait_time_wait(self) -> None:
        from rebind.kernel.walk import walk
        from rebind.model.query import SocketQuery
        from rebind.model.records import Proto, State

        query = SocketQuery.create(protos=[Proto.TCP], port_range=RANGE, states=[State.TIME_WAIT])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            n = sum(1 for r in walk(query).records if r.remote.port == 9000)
            if n >= 9:
                return
            time.sleep(0.02)


def _set_sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:
        f.write(value)


def run_client_demo(out: Out) -> bool:
    """The client half, replayed in a private network namespace (root needed: sysctls are per netns)."""
    from rebind.kernel import netns

    t0 = time.monotonic()
    if not netns.namespaces_permitted():
        out("[yellow]`rebind demo --client` needs a private network namespace (root): it sets sysctls.[/]")
        return False
    with ExitStack() as stack:
        stack.enter_context(netns.private_netns())
        out("[dim]Running in a private network namespace: the tiny port range exists only there.[/]")
        demo = ClientDemo(out, in_netns=True)
        stack.callback(demo.cleanup)
        ok = demo.run()
    out(f"\n[dim]Demo finished in {time.monotonic() - t0:.1f} s.[/]")
    return ok
