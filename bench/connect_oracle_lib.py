"""Kernel oracle for the client-side model (:mod:`rebind.model.connect`).

Each scenario runs in a **fresh network namespace**: a tiny ``ip_local_port_range`` (1–20 ports,
sometimes odd-sized), reserved ports, ``tcp_tw_reuse`` 0/1/2, ``tcp_tw_reuse_delay``, servers on
loopback (127.0.0.1, 127.0.0.2, ::1), then existing clients built for real — plain connect(),
bind-before-connect with and without IP_BIND_ADDRESS_NO_PORT, fixed-port clients with and without
SO_REUSEADDR, listeners and bound-only sockets in the range, TIME_WAIT and orphaned FIN_WAIT2
entries (with or without TCP timestamps, young or old), connected and bound UDP sockets — and
finally one new client. The model is given the socket table read with rebind's own inet_diag
reader, the sysctls read from /proc, and the ground truth inet_diag cannot show (how each socket
got its port, timestamps, SO_REUSEADDR); its verdict is compared with what the kernel does
(:func:`rebind.connect_diagnosis.probe`).

Needs root (unshare, sysctl writes). Only loopback addresses are used.
"""

from __future__ import annotations

import enum
import errno
import random
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import ip_address

from rebind.model.connect import (
    ConnectRequest,
    ConnectResult,
    PortHolder,
    Verdict,
    evaluate_connect,
)
from rebind.model.records import Endpoint, Proto, SocketEntry, SocketRecord, State

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE = 51
SERVERS = (("127.0.0.1", 9000), ("127.0.0.1", 9001), ("127.0.0.2", 9000), ("::1", 9000))
V4_SOURCES = ("127.0.0.1", "127.0.0.2")


class How(enum.StrEnum):
    PLAIN = "connect"
    BBC = "bind0+connect"
    NOPORT = "NO_PORT+bind0+connect"
    FIXED = "bindP+connect"


class End(enum.StrEnum):
    OPEN = "open"
    TIME_WAIT = "time-wait"
    FIN_WAIT2 = "fin-wait2"


class Other(enum.StrEnum):
    LISTENER = "listener"
    BOUND = "bound"
    UDP_CONN = "udp-connect"
    UDP_BOUND = "udp-bound"
    UDP_DUAL = "udp6-dualstack-connect"


@dataclass(frozen=True, slots=True)
class Existing:
    how: How | Other
    server: int
    src: str | None = None
    port: int = 0
    reuseaddr: bool = False
    timestamps: bool = True
    end: End = End.OPEN

    def __str__(self) -> str:
        host, dport = SERVERS[self.server]
        opts = ("+SO_REUSEADDR" if self.reuseaddr else "") + ("" if self.timestamps else " no-ts")
        at = f" {self.src}:{self.port}" if self.src or self.port else ""
        return f"{self.how}{at} -> {host}:{dport}{opts} [{self.end}]"


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    proto: Proto
    how: How
    server: int
    src: str | None = None
    port: int = 0
    reuseaddr: bool = False
    per_socket_range: tuple[int, int] | None = None

    def request(self) -> ConnectRequest:
        host, dport = SERVERS[self.server]
        return ConnectRequest.create(
            host,
            dport,
            src=self.src,
            proto=self.proto,
            bind_before_connect=self.how in (How.BBC, How.NOPORT),
            bind_address_no_port=self.how is How.NOPORT,
            local_port=self.port if self.how is How.FIXED else None,
            reuseaddr=self.reuseaddr,
            port_range=self.per_socket_range,
        )


@dataclass(frozen=True, slots=True)
class Scenario:
    index: int
    proto: Proto
    lo: int
    hi: int
    reserved: tuple[int, ...]
    tw_reuse: int
    tw_reuse_delay_ms: int
    existing: tuple[Existing, ...]
    probe: ProbeSpec

    def __str__(self) -> str:
        lines = [
            f"scenario {self.index}: {self.proto.value} range {self.lo}-{self.hi} "
            f"reserved {list(self.reserved)} tcp_tw_reuse={self.tw_reuse} delay={self.tw_reuse_delay_ms}ms"
        ]
        lines += [f"  existing: {e}" for e in self.existing]
        p = self.probe
        lines.append(f"  probe: {p.request().describe} src={p.src} range={p.per_socket_range}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Check:
    scenario: Scenario
    verdict: Verdict
    predicted_errno: str | None
    actual_ok: bool
    actual_errno: str | None
    built: int
    result: ConnectResult | None = None
    skipped: str | None = None

    @property
    def agree(self) -> bool:
        if self.skipped:
            return True
        if self.verdict is Verdict.MAY_FAIL:
            return True
        if self.verdict is Verdict.OK:
            return self.actual_ok
        return not self.actual_ok and self.actual_errno == self.predicted_errno

    def __str__(self) -> str:
        got = "ok" if self.actual_ok else self.actual_errno
        extra = ""
        if self.result is not None:
            extra = f"\n  model: {self.result.headline}\n  {self.result.outcome.explanation}"
        said = f"{self.verdict.value} {self.predicted_errno or ''}"
        return f"{self.scenario}\n  predicted {said}, kernel: {got}{extra}"


# ---------------------------------------------------------------------------------------------
# Random scenarios


def random_scenario(rng: random.Random, index: int) -> Scenario:
    proto = Proto.UDP if rng.random() < 0.15 else Proto.TCP
    size = rng.choice([1, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 16, 20, 3, 5, 11])
    lo = rng.randrange(40000, 50000)
    hi = lo + size - 1
    reserved = tuple(sorted(rng.sample(range(lo, hi + 1), rng.choice([0, 0, 0, 1, 2]) if size > 2 else 0)))
    n = rng.randint(0, size + 4)
    existing = tuple(_random_existing(rng, proto, lo, hi) for _ in range(n))
    probe = _random_probe(rng, proto, lo, hi, existing)
    return Scenario(
        index,
        proto,
        lo,
        hi,
        reserved,
        rng.choice([0, 1, 2]),
        rng.choice([1, 1, 60000]),
        existing,
        probe,
    )


def _server_for(rng: random.Random, v6: float = 0.15) -> int:
    return 3 if rng.random() < v6 else rng.randrange(3)


def _src_for(rng: random.Random, server: int) -> str:
    return "::1" if SERVERS[server][0] == "::1" else rng.choice(V4_SOURCES)


def _random_existing(rng: random.Random, proto: Proto, lo: int, hi: int) -> Existing:
    server = _server_for(rng)
    if proto is Proto.UDP:
        kind = rng.choice([Other.UDP_CONN, Other.UDP_CONN, Other.UDP_BOUND, Other.UDP_DUAL])
        if kind is Other.UDP_DUAL:
            server = 3
        port = rng.randint(lo, hi) if kind is Other.UDP_BOUND and rng.random() < 0.5 else 0
        src = rng.choice(["0.0.0.0", "127.0.0.1", "127.0.0.2"]) if kind is Other.UDP_BOUND else None
        return Existing(kind, server, src, port, reuseaddr=rng.random() < 0.4)
    r = rng.random()
    if r < 0.12:
        kind = rng.choice([Other.LISTENER, Other.BOUND])
        port = rng.randint(lo, hi) if rng.random() < 0.4 else 0
        return Existing(kind, server, _src_for(rng, server), port, reuseaddr=rng.random() < 0.5)
    how = rng.choices([How.PLAIN, How.BBC, How.NOPORT, How.FIXED], [5, 2, 2, 2])[0]
    src = _src_for(rng, server) if how is not How.PLAIN else None
    port = rng.randint(lo, hi) if how is How.FIXED else 0
    end = rng.choices([End.OPEN, End.TIME_WAIT, End.FIN_WAIT2], [5, 4, 1])[0]
    return Existing(how, server, src, port, rng.random() < 0.6, rng.random() < 0.8, end)


def _random_probe(
    rng: random.Random, proto: Proto, lo: int, hi: int, existing: tuple[Existing, ...]
) -> ProbeSpec:
    server = _server_for(rng)
    weights = [5, 2, 2, 2] if proto is Proto.TCP else [5, 1, 2, 1]
    how = rng.choices([How.PLAIN, How.BBC, How.NOPORT, How.FIXED], weights)[0]
    src = _src_for(rng, server) if how is not How.PLAIN else None
    port = 0
    if how is How.FIXED:
        used = [e.port for e in existing if e.port]
        port = rng.choice(used) if used and rng.random() < 0.6 else rng.randint(lo, hi)
    per_socket = None
    if how in (How.PLAIN, How.NOPORT) and rng.random() < 0.1 and hi > lo:
        a = rng.randint(lo, hi)
        b = rng.randint(a, hi)
        per_socket = (a, b)
    return ProbeSpec(proto, how, server, src, port, rng.random() < 0.5, per_socket)


# ---------------------------------------------------------------------------------------------
# Building for real


def _sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:
        f.write(value)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


Key = tuple[Endpoint, Endpoint]


@dataclass
class _Truth:
    explicit: dict[Key, bool] = field(default_factory=dict)
    timestamps: dict[Key, bool] = field(default_factory=dict)
    reuseaddr: dict[Key, bool] = field(default_factory=dict)
    expect: dict[Key, End] = field(default_factory=dict)

    def add(self, key: Key, explicit: bool, ts: bool, reuse: bool, end: End) -> None:
        self.explicit[key] = explicit
        self.timestamps[key] = ts
        self.reuseaddr[key] = reuse
        if end is End.OPEN:
            self.expect.pop(key, None)
        else:
            self.expect[key] = end


def _ep(addr: tuple[object, ...]) -> Endpoint:
    return Endpoint(ip_address(str(addr[0])), int(str(addr[1])))


class Lab:
    """One scenario's sockets; everything is closed by :meth:`close`."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.socks: list[socket.socket] = []
        self.servers: list[socket.socket] = []
        self.truth = _Truth()
        self.built = 0

    def close(self) -> None:
        for s in self.socks + self.servers:
            s.close()

    def keep(self, s: socket.socket) -> socket.socket:
        self.socks.append(s)
        return s

    def setup(self) -> None:
        sc = self.sc
        _sysctl("ip_local_port_range", f"{sc.lo} {sc.hi}")
        _sysctl("ip_local_reserved_ports", ",".join(map(str, sc.reserved)))
        _sysctl("tcp_tw_reuse", str(sc.tw_reuse))
        try:
            _sysctl("tcp_tw_reuse_delay", str(sc.tw_reuse_delay_ms))
        except OSError:
            pass  # before 6.14
        kind = socket.SOCK_STREAM if sc.proto is Proto.TCP else socket.SOCK_DGRAM
        for host, port in SERVERS:
            s = socket.socket(_family(host), kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            if sc.proto is Proto.TCP:
                s.listen(512)
            self.servers.append(s)
        for e in sc.existing:
            try:
                self._build(e)
                self.built += 1
            except OSError:
                pass  # the range may be full already: that is part of the scenario

    def _build(self, e: Existing) -> None:
        host, dport = SERVERS[e.server]
        if self.sc.proto is Proto.UDP:
            self._build_udp(e, host, dport)
            return
        _sysctl("tcp_timestamps", "1" if e.timestamps else "0")
        fam = _family(e.src or host)
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            if e.reuseaddr:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if isinstance(e.how, Other):
                s.bind((e.src or host, e.port))
                if e.how is Other.LISTENER:
                    s.listen()
                self.keep(s)
                self.truth.add((_ep(s.getsockname()), _peer(s)), True, e.timestamps, e.reuseaddr, End.OPEN)
                return
            if e.how is How.NOPORT:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            if e.how in (How.BBC, How.NOPORT):
                s.bind((e.src, 0))
            elif e.how is How.FIXED:
                s.bind((e.src, e.port))
            s.connect((host, dport))
        except OSError:
            s.close()
            raise
        server = self.servers[e.server]
        peer, _ = server.accept()
        key = (_ep(s.getsockname()), _ep(s.getpeername()))
        explicit = e.how in (How.BBC, How.FIXED)
        self.truth.add(key, explicit, e.timestamps, e.reuseaddr, e.end)
        if e.end is End.OPEN:
            self.keep(s)
            self.keep(peer)
        elif e.end is End.TIME_WAIT:
            s.close()  # the client closes first: its side becomes the time-wait entry
            peer.close()
        else:
            s.close()  # the server never closes: an orphaned FIN_WAIT2 mini-socket
            self.keep(peer)

    def _build_udp(self, e: Existing, host: str, dport: int) -> None:
        if e.how is Other.UDP_DUAL:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        else:
            s = socket.socket(_family(e.src or host), socket.SOCK_DGRAM)
        try:
            if e.reuseaddr:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if e.how is Other.UDP_BOUND:
                s.bind((e.src or "0.0.0.0", e.port))
            else:
                s.connect((host, dport))
        except OSError:
            s.close()
            raise
        self.keep(s)
        name = s.getsockname()
        self.truth.reuseaddr[(_ep(name), _peer(s))] = e.reuseaddr
        self.truth.explicit[(_ep(name), _peer(s))] = e.how is Other.UDP_BOUND

    def records(self) -> list[SocketRecord]:
        from rebind.kernel.diag import iter_sockets

        sc = self.sc
        recs = list(iter_sockets(protos=[sc.proto], port_range=(sc.lo, sc.hi)))
        p = sc.probe.port
        if p and not sc.lo <= p <= sc.hi:
            recs += list(iter_sockets(protos=[sc.proto], ports=[p]))
        return recs

    def settle(self, deadline_s: float = 3.0) -> list[SocketRecord] | None:
        """Wait (bounded, polling) until the closes are done and old entries old enough."""
        deadline = time.monotonic() + deadline_s
        want_age = self.sc.tw_reuse_delay_ms < 1000
        while True:
            recs = self.records()
            states = {(r.local, r.remote): r for r in recs}
            done = all(
                (
                    k in states
                    and states[k].is_mini
                    and (end is End.FIN_WAIT2 or states[k].state is State.TIME_WAIT)
                )
                for k, end in self.truth.expect.items()
            )
            if done and want_age:
                # tcp_tw_reuse_delay=1 ms: let every entry be clearly older (idiag_expires ticks in jiffies).
                done = all(r.expires_ms is None or r.expires_ms <= 59_980 for r in recs if r.is_mini)
            if done:
                return recs
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)

    def holders(self, recs: list[SocketRecord]) -> list[PortHolder]:
        out = []
        for r in recs:
            key = (r.local, r.remote)
            if r.proto is Proto.UDP:
                reuse = self.truth.reuseaddr.get(key, False)
                bound = self.truth.explicit.get(key, r.remote.port == 0)
                out.append(PortHolder(SocketEntry(r), explicit=bound, reuseaddr=reuse, reuseport=False))
                continue
            if r.state in (State.LISTEN, State.BOUND_INACTIVE):
                explicit = True
            else:
                # Not built by the scenario as a client: a server side, on its listener's port.
                explicit = self.truth.explicit.get(key, True)
            out.append(
                PortHolder(
                    SocketEntry(r),
                    explicit=explicit,
                    timestamps=self.truth.timestamps.get(key),
                    reuseaddr=self.truth.reuseaddr.get(key, False),
                    reuseport=False,
                )
            )
        return out


def _peer(s: socket.socket) -> Endpoint:
    """The peer as inet_diag shows it: the wildcard of the family, port 0, when unconnected."""
    try:
        return _ep(s.getpeername())
    except OSError:
        return Endpoint(ip_address("::" if s.family == socket.AF_INET6 else "0.0.0.0"), 0)


def run_one(sc: Scenario, *, blind: bool = False, summary: bool = True, lookups: bool = False) -> Check:
    """Build ``sc`` in a fresh network namespace, predict, then connect() for real.

    ``blind``: the model gets what `rebind why --connect` reads (kernel/connect_facts.gather:
    no ground truth about how each port was taken); its answer must then never be better than
    the kernel's (the worst case, issue 17). ``summary``: as the CLI reads it, the range's
    ports from the bind hash where the request allows (gather(summary=True)); False: every
    socket of the range, one by one. ``lookups``: with ``summary``, the named sockets by lookups
    and bucket walks (kernel/connect_lookup.py, `rebind trace`'s way) where they can be."""
    from rebind.connect_diagnosis import probe
    from rebind.kernel.connect_facts import connect_settings, route_source
    from rebind.kernel.netns import private_netns

    with ExitStack() as stack:
        stack.enter_context(private_netns())
        lab = Lab(sc)
        stack.callback(lab.close)
        lab.setup()
        recs = lab.settle()
        req = sc.probe.request()
        if recs is None:
            return Check(sc, Verdict.MAY_FAIL, None, False, None, lab.built, skipped="did not settle")
        _sysctl("tcp_timestamps", "1")
        settings = connect_settings()
        src = route_source(req.dst, req.dport, bound=req.src)
        if blind:
            from rebind.kernel.connect_facts import gather

            facts = gather(req, owners=True, settings=settings, summary=summary, lookups=lookups)
            res = evaluate_connect(
                req,
                facts.holders,
                settings,
                route_src=src,
                bind_settings=facts.bind_settings,
                servers=facts.servers,
                buckets=facts.buckets,
            )
        else:
            res = evaluate_connect(req, lab.holders(recs), settings, route_src=src)
        p = probe(req)
        name = errno.errorcode.get(p.errno) if p.errno and not p.ok else None
        return Check(
            sc,
            res.outcome.verdict,
            res.outcome.errno_name,
            p.ok,
            name,
            lab.built,
            result=res,
        )


def run_scenarios(
    n: int, seed: int, *, start: int = 0, blind: bool = False, summary: bool = True, lookups: bool = False
) -> Iterator[Check]:
    rng = random.Random(seed)
    for i in range(start, start + n):
        yield run_one(random_scenario(rng, i), blind=blind, summary=summary, lookups=lookups)
