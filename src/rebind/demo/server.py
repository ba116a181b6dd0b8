"""`rebind demo` and `rebind demo --trace`: the origin post's server story, step by step."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

from rebind.demo.stage import Out, Stage, free_port

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


class Demo(Stage):
    """The post's server: its failed restart, the fix that fails too, and what works."""

    def run(self) -> bool:
        port = 12345 if self.in_netns else free_port()
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
        port = free_port() if not self.in_netns else 12346
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
