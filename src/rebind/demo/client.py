"""`rebind demo --client`: the client half (issue 10): fixed ports, bind-before-connect,
ephemeral exhaustion and TIME_WAIT, in a private namespace with a tiny port range."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import ExitStack

from rebind.demo.stage import Out, Stage

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


class ClientDemo(Stage):
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
