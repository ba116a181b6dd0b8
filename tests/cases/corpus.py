"""The corpus of reproduced real cases (issue 20): one entry per reported situation.

Each case names the public thread it comes from (project, number, title: what the reporter saw),
how it is rebuilt here, the cause `rebind why` must name and the fix it must print; the runner
(tests/cases/test_corpus.py) builds it in a throwaway network namespace, checks the cause, runs
the printed fix exactly as printed, and then binds the way the reporter's server wanted to.

Kinds of reproduction:

* ``daemon``: the real packaged daemon (tests/cases/daemons.py), in a sandbox
  (tests/cases/sandbox.py); the fix is the catalogue's, run line by line.
* ``python``: Python stand-ins for the reporter's own server (a dev server, a reloader's child,
  a restarted server's TIME_WAIT): the situation is the kernel's sockets, not the program.
* ``nat``: a NodePort Service: kube-proxy's KUBE-NODEPORTS rule, installed in the namespace as
  kube-proxy writes it; the printed kubectl lines run against a stand-in that drops or restores
  the rule, as kube-proxy does when the Service goes or comes back.
* ``recorded``: the holder cannot run here (systemd-resolved needs systemd as PID 1):
  recognition from recorded kernel facts, the fix's file steps in a scratch root. Counted apart
  in the pass rate (tests/cases/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------
# Stand-in servers (each prints 'ready' once its sockets exist)

LISTEN = """
import socket, time
fam = socket.AF_INET6 if ':' in {addr!r} else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, {reuseaddr})
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, {v6only})
s.bind(({addr!r}, {port}))
s.listen()
print('ready', flush=True)
time.sleep(600)
"""

UDP = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({addr!r}, {port}))
print('ready', flush=True)
time.sleep(600)
"""

# A dev server's reloader: the parent binds, its child serves, the parent dies (^C reached only
# the parent, or an IDE killed only the process it started): the child keeps the listener.
ORPHAN = """
import os, socket, time
s = socket.socket()
s.bind(({addr!r}, {port}))
s.listen()
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""

# Pre-fork workers sharing one listener (gunicorn, a forking server).
SHARED = """
import os, socket, time
s = socket.socket()
s.bind(({addr!r}, {port}))
s.listen()
for _ in range(2):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print('ready', flush=True)
time.sleep(600)
"""

# A server without SO_REUSEADDR that closed a connection first and exited: its TIME_WAIT keeps
# the port for 60 s (the reporter's "restart fails for a minute").
TIME_WAIT = """
import socket
s = socket.socket()
s.bind(({addr!r}, {port}))
s.listen()
c = socket.create_connection(({addr!r}, {port}))
a, _ = s.accept()
a.close()
c.close()
s.close()
print('ready', flush=True)
"""

# Bound, never listening: a server that crashed between bind() and listen() in a process that
# lives on (a test harness reserving a port), invisible to lsof's LISTEN filter.
BOUND = """
import socket, time
s = socket.socket()
s.bind(({addr!r}, {port}))
print('ready', flush=True)
time.sleep(600)
"""


@dataclass(frozen=True)
class Proc:
    snippet: str
    addr: str = "0.0.0.0"
    reuseaddr: int = 0
    v6only: int = 1
    #: The snippet exits after set-up (TIME_WAIT) or prints a pid to adopt (ORPHAN).
    exits: bool = False


@dataclass(frozen=True)
class Case:
    id: str
    #: The public thread: "owner/repo#N: title".
    thread: str
    #: What the reporter hit, in one line.
    situation: str
    kind: str  # "daemon" | "python" | "nat" | "recorded"
    port: int
    proto: str = "tcp"
    daemon: str | None = None
    procs: tuple[Proc, ...] = ()
    #: Extra arguments to `rebind why PORT`.
    why: tuple[str, ...] = ()
    #: The cause `why` must name: "wellknown:ID", "blocker:KIND", "localhost:KIND".
    cause: str = ""
    #: The fix to apply: "wellknown" (the catalogue's lines), "fix:TITLE-PREFIX" (a printed
    #: fix's command, on a terminal, answering y), "localhost:v4|v6" (the split line that frees
    #: that side), "dual-stack" (restart the stand-in as printed: bind '::' with IPV6_V6ONLY=0).
    fix: str = ""
    #: After the fix, the reporter's server binds this (address, reuseaddr).
    bind_addr: str = "0.0.0.0"
    note: str = ""


def _d(
    id: str, thread: str, situation: str, daemon: str, port: int, proto: str = "tcp", note: str = ""
) -> Case:
    """A well-known daemon, for real: the cause is the catalogue's entry, the fix its lines."""
    return Case(
        id,
        thread,
        situation,
        "daemon",
        port,
        proto,
        daemon=daemon,
        cause=f"wellknown:{daemon}",
        fix="wellknown",
        note=note,
    )


# Each table below is one way a situation arises; a row is one reported case of it:
# (id, thread, situation, ...). The builders turn rows into Cases; CASES keeps their order.

#: (id, thread, situation, daemon, port[, proto[, note]])
DAEMONS: tuple[tuple[Any, ...], ...] = (
    (
        "avahi-node-mdns",
        "mdns-js/node-mdns-js#31: Error: bind EADDRINUSE",
        "an mDNS library cannot bind 0.0.0.0:5353 while avahi-daemon runs",
        "avahi-daemon",
        5353,
        "udp",
    ),
    (
        "avahi-blocks-others",
        "avahi/avahi#308: avahi-daemon blocks mDNS for others",
        "custom mDNS discovery only works with avahi-daemon stopped",
        "avahi-daemon",
        5353,
        "udp",
    ),
    (
        "avahi-zeroconf-go",
        "grandcat/zeroconf#63: listen udp4 224.0.0.0:5353: bind: address already in use",
        "Go zeroconf resolver fails on 5353 on a host with avahi-daemon",
        "avahi-daemon",
        5353,
        "udp",
    ),
    (
        "cups-airprint",
        "thyrlian/AirPdfPrinter#2: the phone can find the printer, but printing says Offline",
        "a containerised CUPS cannot open 0.0.0.0:631: the host's cupsd holds it",
        "cupsd",
        631,
    ),
    (
        "cups-two-schedulers",
        "apple/cups#1169: not possible to start several cupsd on one host",
        "a second cupsd cannot bind 631 on localhost",
        "cupsd",
        631,
    ),
    (
        "dnsmasq-already-running",
        "KiaraGrouwstra/nix-config#45: dnsmasq: failed to create listening socket for 127.0.0.1: Address already in use",
        "dnsmasq's service fails because a dnsmasq already answers on 0.0.0.0:53",
        "dnsmasq",
        53,
        "udp",
    ),
    (
        "dnsmasq-siriproxy",
        "plamoni/SiriProxy#342: DNSmasq Error",
        "restarting a configured dnsmasq fails: another DNS server (a dnsmasq) holds 53",
        "dnsmasq",
        53,
        "udp",
    ),
    (
        "dnsmasq-nixos-restart",
        "NixOS/nixpkgs#126177: dnsmasq unable to restart after nixos-rebuild switch",
        "the new dnsmasq cannot bind 53 while the old instance still holds it",
        "dnsmasq",
        53,
        "udp",
    ),
    (
        "libvirt-dnsmasq-openstack",
        "bilelmsekni/OpenStack-Grizzly-Install-Guide#91: dnsmasq: failed to create listening socket for port 53",
        "a DNS service cannot bind 0.0.0.0:53 on a host that runs libvirt's default network",
        "libvirt-dnsmasq",
        53,
        "udp",
        "the thread does not name the holder; libvirt's dnsmasq on virbr0 is the one such hosts run, rebuilt here",
    ),
    (
        "libvirt-dnsmasq-pihole",
        "pi-hole/FTL#1861: dnsmasq: failed to create listening socket for port 53: Address already in use",
        "Pi-hole's embedded dnsmasq fails on 53 on a desktop with libvirt's virbr0 network",
        "libvirt-dnsmasq",
        53,
        "udp",
        "rebuilt with libvirt's dnsmasq as the holder (the thread asks the user to find it)",
    ),
    (
        "rpcbind-nfs-container",
        "ehough/docker-nfs-server#51: Cannot bind to port 111",
        "an NFS server container cannot publish 111: rpcbind runs on the host",
        "rpcbind",
        111,
    ),
    (
        "rpcbind-socket-gluster",
        "heketi/heketi#653: Failed to start Configuring GlusterFS in container",
        "rpcbind.socket failed to listen on sockets: Address already in use (another rpcbind holds 111)",
        "rpcbind",
        111,
    ),
    (
        "sshd-gogs",
        "gogs/gogs#6464: Failed to start SSH server: listen tcp 0.0.0.0:22: bind: address already in use",
        "the built-in SSH server of gogs wants 22, the host's sshd has it",
        "sshd",
        22,
    ),
    (
        "sshd-gitea-arm",
        "Kunde21/raspberry-dev#7: Bind to port 22 on 0.0.0.0 failed: Address in use",
        "a Gitea container's sshd cannot take 22 from the host's",
        "sshd",
        22,
    ),
    (
        "sshd-gitlab",
        "dchqinc/dchq-on-premise-issue-tracker#17: Port binding fails on port 22",
        "publishing a GitLab container on 22: the host's sshd holds it",
        "sshd",
        22,
    ),
    (
        "apache-vs-nginx-aws",
        "StreisandEffect/streisand#91: https on Amazon AWS is not working out of the box",
        "nginx: bind() to 0.0.0.0:80 failed (98): the default apache2 install holds 80",
        "apache2",
        80,
    ),
    (
        "apache-vs-nginx-bbb",
        "bigbluebutton/bigbluebutton#1127: Can not start nginx service",
        "nginx cannot start: Apache already uses port 80",
        "apache2",
        80,
    ),
    (
        "nginx-default-easyengine",
        "EasyEngine/easyengine#10: Nginx Doesn't Start Properly",
        "[emerg] bind() to 0.0.0.0:80 failed (98): an nginx with the default site already holds 80",
        "nginx-default-site",
        80,
    ),
    (
        "nginx-default-fruitywifi",
        "xtr4nge/FruityWifi#224: Imposible start nginx",
        "[emerg] bind() to [::]:80 failed (98): the packaged default site listens on [::]:80 too",
        "nginx-default-site",
        80,
    ),
    (
        "docker-proxy-stale-25981",
        "moby/moby#25981: Docker-proxy binds on ports but no container is running (anymore)",
        "docker-proxy keeps a published port after its container is gone",
        "docker-proxy",
        8080,
    ),
    (
        "docker-proxy-stale-26527",
        "moby/moby#26527: Docker proxy using ports after removal of containers",
        "Bind for 0.0.0.0:PORT failed: port is already allocated, with no container",
        "docker-proxy",
        8080,
    ),
    (
        "docker-proxy-hangs-7856",
        "moby/moby#7856: docker-proxy does not die / hangs around / blocks port",
        "a stopped container's docker-proxy still holds its host port",
        "docker-proxy",
        8080,
    ),
    (
        "docker-proxy-allocated-20486",
        "moby/moby#20486: Cannot start containers: port is already allocated",
        "after a host rebuild, docker-proxy processes hold ports no running container publishes",
        "docker-proxy",
        8080,
    ),
)

#: A server without SO_REUSEADDR restarted within a minute: its TIME_WAIT holds the port.
#: (id, thread, situation, port)
TIME_WAITS: tuple[tuple[str, str, str, int], ...] = (
    (
        "timewait-pelican",
        "getpelican/pelican#1264: Server fails with socket.error: [Errno 98] Address already in use",
        "pelican's dev server restarted within a minute of serving a page",
        8000,
    ),
    (
        "timewait-modbus-tk",
        "ljean/modbus-tk#82: [Errno 98] Address already in use",
        "a Modbus TCP server restarted with the same arguments right after closing",
        5020,
    ),
    (
        "timewait-umodbus",
        "AdvancedClimateSystems/uModbus#18: Unable to set socket options",
        "examples re-run too quickly fail: the previous run left TIME_WAIT",
        5021,
    ),
    (
        "timewait-power-dev",
        "mlcommons/power-dev#61: Fix OSError: [Errno 98] Address already in use",
        "server interrupted with ^C after a telnet client connected, restarted at once",
        4950,
    ),
    (
        "timewait-getsomecats",
        "getsomecat/GetSomeCats#19: Use SO_REUSEADDR before binding to a port",
        "ThreadingTCPServer restarted after serving one request: Errno 98",
        7122,
    ),
)

#: A dev server's reloader child outlives its parent and keeps the listener (127.0.0.1).
#: (id, thread, situation, port)
ORPHANS: tuple[tuple[str, str, str, int], ...] = (
    (
        "orphan-werkzeug-503",
        "pallets/werkzeug#503: Parent task doesn't properly kill children",
        "killing the debug-mode parent leaves the reloader's child serving",
        5000,
    ),
    (
        "orphan-flask-1304",
        "pallets/flask#1304: Dev server fails to terminate, becomes orphan",
        "after toggling debug, the old server process kept the port",
        5001,
    ),
    (
        "orphan-fastmcp-reload",
        "PrefectHQ/fastmcp#3070: Fix --reload port conflict when using explicit port",
        "SIGKILL to `uv` orphans the real server, which keeps the port",
        8002,
    ),
    (
        "orphan-thonny",
        "thonny/thonny#3029: TC port aren't liberated",
        "the IDE's Stop button kills the process it started, not Flask's child",
        5002,
    ),
)

#: The server (an earlier run, a second instance) still listens on 0.0.0.0.
#: (id, thread, situation, port)
LISTENERS: tuple[tuple[str, str, str, int], ...] = (
    (
        "listener-jpmc",
        "insidesherpa/JPMC-tech-task-1-PY3#232: OSError: [Errno 98] Address already in use",
        "the server is still running in another terminal",
        8080,
    ),
    (
        "listener-os-lab",
        "SJTU-IPADS/OS-Course-Lab#99: OSError: [Errno 98] Address already in use",
        "a server from an earlier run was never closed",
        12345,
    ),
    (
        "listener-time-server",
        "codeplea/Hands-On-Network-Programming-with-C#6: Chap02 - Time Server Bind failing",
        "bind() failed (98): another program uses 8080",
        8080,
    ),
    (
        "listener-second-instance",
        "quantumcore/remote_hacker_probe#5: Bind Error",
        "the program was started twice: the first instance holds the port",
        1234,
    ),
)

#: localhost split-brain: two listeners, one per family. (id, thread, situation, port, first
#: listener's address, second's, the side the fix frees: "v4" or "v6"; the reporter then binds
#: that side: ::1 for v6, 0.0.0.0 for v4)
SPLITS: tuple[tuple[str, str, str, int, str, str, str], ...] = (
    (
        "split-vite-1395",
        "vitejs/vite#1395: The port was overwritten when the server was created",
        "an IPv4 project on 3000 and vite on IPv6 3000: the browser gets vite",
        3000,
        "127.0.0.1",
        "::1",
        "v6",
    ),
    (
        "split-vite-5241",
        "vitejs/vite#5241: a problem related to the vite server port",
        "vite and a koa server both on 3000 with no conflict reported",
        3000,
        "0.0.0.0",
        "::1",
        "v4",
    ),
    (
        "split-vite-10638",
        "vitejs/vite#10638: Check 0.0.0.0 as well as localhost/127.0.0.1 when checking for used port",
        "Next.js on 0.0.0.0:3000, vite starts on localhost:3000 unnoticed",
        3000,
        "0.0.0.0",
        "::1",
        "v6",
    ),
    (
        "split-vite-12205",
        "vitejs/vite#12205: Dev servers are opened in identical ports",
        "`vite dev` and `vite dev --host` both on localhost:5173",
        5173,
        "::1",
        "0.0.0.0",
        "v6",
    ),
    (
        "split-tuval-8593",
        "kamp-us/phoenix#8593: The Tuval desk page binds IPv4 only, so a second server on ::1 silently takes localhost",
        "the browser's localhost landed on a stranger's vite on [::1]:5173",
        5173,
        "127.0.0.1",
        "::1",
        "v6",
    ),
    (
        "split-aphex-312",
        "IcelandicIcecream/aphex#312: Port 5173 is not checked if it is already in use",
        "two SvelteKit/vite projects on 5173, one with --host",
        5173,
        "::1",
        "0.0.0.0",
        "v4",
    ),
)

#: A one-family listener that localhost reaches only one way. (id, thread, situation, port,
#: address: the cause is localhost:ipv4-only or ipv6-only after its family)
ONE_FAMILY: tuple[tuple[str, str, str, int, str], ...] = (
    (
        "v4only-node-40702",
        "nodejs/node#40702: Unable to connect to establish a TCP connection (ECONNREFUSED)",
        "browser and curl reach localhost:3004, Node 17 gets ECONNREFUSED ::1",
        3004,
        "127.0.0.1",
    ),
    (
        "v4only-mysql-2547",
        "mysqljs/mysql#2547: Node 17.4, MySQL Server 8.0 ... ECONNREFUSED ::1:3306",
        "MySQL on 127.0.0.1:3306, Node 17 connects to ::1",
        3306,
        "127.0.0.1",
    ),
    (
        "v4only-solana-375",
        "solana-labs/example-helloworld#375: Node v17.1.0 resolves localhost differently",
        "the validator on 127.0.0.1:8899; fetch to localhost fails with ::1",
        8899,
        "127.0.0.1",
    ),
    (
        "v6only-vscode-openapi",
        "42Crunch/vscode-openapi#228: connect ECONNREFUSED 127.0.0.1:4200",
        "the app listens on ::1 only; a client that tries 127.0.0.1 is refused",
        4200,
        "::1",
    ),
)

#: systemd-resolved's stub on 127.0.0.53:53 (recorded facts). (id, thread, situation, proto)
RESOLVED: tuple[tuple[str, str, str, str], ...] = (
    (
        "resolved-moby-32545",
        "moby/moby#32545: Can't listen on port 53 with systemd on host",
        "docker run -p 53:53/udp fails: systemd-resolved's stub on 127.0.0.53:53",
        "udp",
    ),
    (
        "resolved-docker-bind-65",
        "sameersbn/docker-bind#65: listen tcp 0.0.0.0:53: bind: address already in use",
        "a bind9 container cannot publish 53 over TCP",
        "tcp",
    ),
    (
        "resolved-adguard-4283",
        "AdguardTeam/AdGuardHome#4283: Port 53 already in use",
        "AdGuard Home's own guide: a resolved.conf.d drop-in with DNSStubListener=no",
        "udp",
    ),
)

#: A NodePort Service's kube-proxy rule captures a host port. (id, thread, situation, port)
NODEPORTS: tuple[tuple[str, str, str, int], ...] = (
    (
        "nodeport-kubernetes-76892",
        "kubernetes/kubernetes#76892: Set the svc nodeport to 6443 causes the cluster to not work properly",
        "a NodePort rule captures a host port a host server listens on",
        30080,
    ),
    (
        "nodeport-kubernetes-100643",
        "kubernetes/kubernetes#100643: Consider: remove node-port conflict prevention in kube-proxy and kubelet",
        "kube-proxy no longer holds NodePort sockets: a host server binds fine and never sees traffic",
        30081,
    ),
    (
        "nodeport-kubernetes-35641",
        "kubernetes/kubernetes#35641: kube-proxy iptables rules not created",
        "can't open nodePort for common/a-analysis175:8008: a host process holds the NodePort",
        30082,
    ),
)

RESOLVED_NOTE = "systemd-resolved needs systemd as PID 1"
NODEPORT_NOTE = "no cluster here: kube-proxy's rule is installed as it writes it; kubectl is a stand-in"


def _python(
    row: tuple[str, str, str, int], *procs: Proc, cause: str, fix: str, bind_addr: str = "0.0.0.0"
) -> Case:
    """The reporter's own server, rebuilt with Python stand-ins."""
    id, thread, situation, port = row
    return Case(id, thread, situation, "python", port, procs=procs, cause=cause, fix=fix, bind_addr=bind_addr)


def _split(row: tuple[str, str, str, int, str, str, str]) -> Case:
    id, thread, situation, port, first, second, side = row
    return _python(
        (id, thread, situation, port),
        Proc(LISTEN, first),
        Proc(LISTEN, second),
        cause="localhost:split",
        fix=f"localhost:{side}",
        bind_addr="::1" if side == "v6" else "0.0.0.0",
    )


def _one_family(row: tuple[str, str, str, int, str]) -> Case:
    id, thread, situation, port, addr = row
    family = "ipv6" if ":" in addr else "ipv4"
    return _python(
        (id, thread, situation, port),
        Proc(LISTEN, addr),
        cause=f"localhost:{family}-only",
        fix="dual-stack",
    )


CASES: tuple[Case, ...] = (
    # -- well-known daemons, for real ------------------------------------------------------------
    *(_d(*row) for row in DAEMONS),
    # -- the reporter's own server: Python stand-ins ---------------------------------------------
    *(
        _python(
            row,
            Proc(TIME_WAIT, "127.0.0.1", exits=True),
            cause="blocker:time-wait",
            fix="fix:Destroy the leftover",
        )
        for row in TIME_WAITS
    ),
    *(
        _python(
            row,
            Proc(ORPHAN, "127.0.0.1", exits=True),
            cause="blocker:inherited-listener",
            fix="fix:Stop the orphaned child",
            bind_addr="127.0.0.1",
        )
        for row in ORPHANS
    ),
    *(
        _python(row, Proc(LISTEN), cause="blocker:listener", fix="fix:Stop the process holding")
        for row in LISTENERS
    ),
    Case(
        "shared-workers-uvicorn",
        "Kludex/uvicorn#1177: Add check if childs are still alive and shutdown instead of hanging",
        "workers of a multi-process server still hold the listener",
        "python",
        8001,
        procs=(Proc(SHARED),),
        cause="blocker:shared-listener",
        fix="fix:Stop the process holding",
    ),
    Case(
        "udp-osc",
        "kivy/oscpy#18: socket.error: [Errno 98] Address already in use",
        "re-creating an OSC UDP listener while the old socket is open",
        "python",
        3002,
        "udp",
        procs=(Proc(UDP, "127.0.0.1"),),
        cause="blocker:udp",
        fix="fix:Stop the process holding",
        bind_addr="127.0.0.1",
    ),
    Case(
        "bound-not-listening",
        "daeken/httprebind#5: socket.error: [Errno 98] Address already in use",
        "a port bound but not listening blocks the server, and lsof -iTCP -sTCP:LISTEN shows nothing",
        "python",
        8053,
        procs=(Proc(BOUND, "127.0.0.1"),),
        cause="blocker:bound-inactive",
        fix="fix:Stop the process holding",
    ),
    # -- localhost split-brain ---------------------------------------------------------------------
    *(_split(row) for row in SPLITS),
    *(_one_family(row) for row in ONE_FAMILY),
    # -- cannot run here: recorded facts ---------------------------------------------------------
    *(
        Case(
            id,
            thread,
            situation,
            "recorded",
            53,
            proto,
            cause="wellknown:systemd-resolved",
            fix="wellknown",
            note=RESOLVED_NOTE,
        )
        for id, thread, situation, proto in RESOLVED
    ),
    # -- kube-proxy NodePorts: the real iptables rule in the namespace, kubectl a stand-in ---------
    *(
        Case(
            id,
            thread,
            situation,
            "nat",
            port,
            cause="wellknown:kube-proxy-nodeport",
            fix="wellknown",
            note=NODEPORT_NOTE,
        )
        for id, thread, situation, port in NODEPORTS
    ),
)
