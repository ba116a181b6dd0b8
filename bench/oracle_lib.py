"""Kernel oracle for the conflict model: random scenarios built for real, checked by bind()/listen().

Test and benchmark harness, not part of the rebind package (it forks setuid helpers and binds
real ports): bench/oracle.py and tests/kernel/test_oracle.py use it.

A scenario is 1-4 existing sockets on one port (listening, bound-only, accepted child, client
side, TIME_WAIT, orphan FIN_WAIT2, UDP), then 1-3 probe sockets that bind (and listen, now or
after the next probe). Before every probe the holders are read with rebind's own inet_diag
reader and given to the model with the flags the scenario set (the ground truth); the model's
prediction is compared with what the kernel does.

Sockets of uid 65534 are created by a forked helper that called setuid(65534) and are passed
back over SCM_RIGHTS: they keep sk_uid 65534 while this (root) process binds them.

Must run inside a private network namespace (tests: the ``netns`` fixture; bench: ``run``).
"""

from __future__ import annotations

import enum
import errno
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from rebind.kernel.calibrate import calibration
from rebind.kernel.diag import iter_sockets
from rebind.model.conflict import (
    BindRequest,
    BucketState,
    Holder,
    KernelSettings,
    Outcome,
    PortState,
    ReuseportCache,
    SockOpts,
    Stage,
    Verdict,
    check_listen,
    effective_v6only,
    evaluate,
    reuseport_cache_after,
    udp_chain_order,
)
from rebind.model.records import Endpoint, Proto, SocketRecord

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
NOBODY = 65534
ADDRS = (
    "0.0.0.0",
    "127.0.0.1",
    "127.0.0.2",
    "127.1.2.3",
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:127.0.0.2",
    "::ffff:0.0.0.0",
)
NONLOCAL = ("192.0.2.1", "2001:db8::1")
#: The model's settings for the lab's namespaces, with this kernel build's calibrated rules
#: (kernel/calibrate.py: its own throwaway namespace, cached per build).
SETTINGS = KernelSettings(
    local_addresses=frozenset({IPv4Address("127.0.0.1"), IPv6Address("::1")}),
    udp_first_match=calibration().udp_first_match,
)
#: Where client-side sockets connect to (outside the scenario port range, below ephemeral ports).
SERVER_PORT = 31999


class Kind(enum.StrEnum):
    LISTEN = "listen"
    BOUND = "bound"
    CHILD = "child"  # accepted connection, open
    TIME_WAIT = "time-wait"  # accepted connection, server closed first, then the client
    FIN_WAIT2 = "fin-wait2"  # accepted connection closed by the server, client silent: orphan
    CLIENT = "client"  # outgoing connection bound to the port
    CLIENT_TIME_WAIT = "client-time-wait"
    CLIENT_FIN_WAIT2 = "client-fin-wait2"
    UDP = "udp"
    UDP_CONNECTED = "udp-connected"


CHILD_KINDS = frozenset({Kind.CHILD, Kind.TIME_WAIT, Kind.FIN_WAIT2})
CLIENT_KINDS = frozenset({Kind.CLIENT, Kind.CLIENT_TIME_WAIT, Kind.CLIENT_FIN_WAIT2})


class ListenMode(enum.StrEnum):
    NOW = "now"
    LATER = "later"  # after the following probes
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Spec:
    proto: Proto
    addr: str
    v6only: bool | None
    reuseaddr: bool
    reuseport: bool
    uid: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.addr else socket.AF_INET

    def __str__(self) -> str:
        flags = [n for n, v in (("REUSEADDR", self.reuseaddr), ("REUSEPORT", self.reuseport)) if v]
        if self.v6only is not None:
            flags.append(f"v6only={int(self.v6only)}")
        a = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{self.proto.value} {a} uid={self.uid} {'+'.join(flags) or 'plain'}"


@dataclass(frozen=True, slots=True)
class Existing:
    spec: Spec
    kind: Kind
    keep_listener: bool = True
    #: Accepted child: setsockopt(SO_REUSEADDR) on the child before it closes (B4/B5).
    child_reuseaddr: bool | None = None
    #: LISTEN/BOUND: clear SO_REUSEADDR and SO_REUSEPORT after bind (listen) -- the bucket's
    #: fast-reuse cache keeps the bind-time values (used by the asking property only).
    clear_after_bind: bool = False

    def __str__(self) -> str:
        extra = ""
        if self.kind in CHILD_KINDS:
            extra = " (listener kept)" if self.keep_listener else " (listener closed)"
            if self.child_reuseaddr is not None:
                extra += f" child REUSEADDR={int(self.child_reuseaddr)}"
        return f"{self.kind.value}: {self.spec}{extra}"


@dataclass(frozen=True, slots=True)
class Probe:
    spec: Spec
    listen: ListenMode

    def __str__(self) -> str:
        return f"probe {self.spec} listen={self.listen.value}"


@dataclass(frozen=True, slots=True)
class Scenario:
    index: int
    port: int
    existing: tuple[Existing, ...]
    probes: tuple[Probe, ...]

    def __str__(self) -> str:
        lines = [f"scenario #{self.index} port {self.port}"]
        lines += [f"  existing {e}" for e in self.existing]
        lines += [f"  {p}" for p in self.probes]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Check:
    """One model prediction against the kernel."""

    scenario: Scenario
    probe: int
    stage: Stage
    predicted: Outcome
    #: None: the call succeeded; else its errno.
    actual: int | None
    holders: tuple[Holder, ...]
    unstable: bool = False

    @property
    def agree(self) -> bool:
        p = self.predicted
        if p.verdict is Verdict.OK:
            return self.actual is None
        if p.verdict is Verdict.DEPENDS:
            return False  # every flag is known here: DEPENDS is a model bug
        return self.actual == p.errno and (p.stage or Stage.BIND) is self.stage

    def __str__(self) -> str:
        p = self.predicted
        pred = "ok" if p.verdict is Verdict.OK else f"{p.verdict.value} {errno.errorcode.get(p.errno or 0)}"
        pred += f" at {p.stage.value}" if p.stage else ""
        act = "ok" if self.actual is None else errno.errorcode.get(self.actual, str(self.actual))
        lines = [
            str(self.scenario),
            f"  check: probe {self.probe} {self.stage.value}(): model {pred}, kernel {act}"
            + (" [states were still settling]" if self.unstable else ""),
        ]
        for h in self.holders:
            r = h.socket
            lines.append(
                f"    holder {r.proto.value} {r.state.name}{' mini' if r.is_mini else ''} {r.local}"
                f" -> {r.remote} uid={r.uid} v6only={r.v6only} ra={h.opts.reuseaddr} rp={h.opts.reuseport}"
            )
        lines += [f"    blocker: {b.reason}" for b in p.blockers]
        lines += [f"    note: {n}" for n in p.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Random scenarios.


def _spec(rng: random.Random, proto: Proto, addrs: tuple[str, ...] = ADDRS) -> Spec:
    addr = rng.choice(addrs)
    a = ip_address(addr)
    v6only: bool | None = None
    if a.version == 6 and a.ipv4_mapped is None:
        v6only = rng.choice((None, False, True))
    return Spec(proto, addr, v6only, rng.random() < 0.5, rng.random() < 0.4, rng.choice((0, 0, NOBODY)))


def random_scenario(rng: random.Random, index: int, port: int) -> Scenario:
    existing = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.2:
            existing.append(Existing(_spec(rng, Proto.UDP), rng.choice((Kind.UDP, Kind.UDP_CONNECTED))))
            continue
        kind = rng.choice([k for k in Kind if k not in (Kind.UDP, Kind.UDP_CONNECTED)])
        spec = _spec(rng, Proto.TCP)
        if kind in CLIENT_KINDS and ip_address(spec.addr).is_unspecified and rng.random() < 0.5:
            spec = _spec(rng, Proto.TCP, tuple(a for a in ADDRS if not ip_address(a).is_unspecified))
        child_ra = rng.choice((None, None, not spec.reuseaddr)) if kind in CHILD_KINDS else None
        existing.append(Existing(spec, kind, rng.random() < 0.5, child_ra))
    probes = []
    for _ in range(rng.randint(1, 3)):
        proto = Proto.UDP if rng.random() < 0.25 else Proto.TCP
        addrs = ADDRS + NONLOCAL if rng.random() < 0.05 else ADDRS
        mode = rng.choice((ListenMode.NOW, ListenMode.NOW, ListenMode.LATER, ListenMode.NEVER))
        probes.append(Probe(_spec(rng, proto, addrs), mode if proto is Proto.TCP else ListenMode.NEVER))
    return Scenario(index, port, tuple(existing), tuple(probes))


# --------------------------------------------------------------------------------------------
# Building scenarios for real.


class _UidHelper:
    """A forked child with uid 65534 that creates sockets and passes them back (SCM_RIGHTS)."""

    def __init__(self, uid: int = NOBODY) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                parent.close()
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                while msg := child.recv(16):
                    fam, typ = struct.unpack("ii", msg)
                    with socket.socket(fam, typ | socket.SOCK_CLOEXEC) as s:
                        socket.send_fds(child, [b"s"], [s.fileno()])
            except BaseException:
                code = 1
            os._exit(code)
        child.close()
        self.pid = pid
        self._sock = parent

    def socket(self, family: int, kind: int) -> socket.socket:
        self._sock.send(struct.pack("ii", family, kind))
        _, fds, _, _ = socket.recv_fds(self._sock, 16, 1)
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        self._sock.close()
        os.waitpid(self.pid, 0)


def _endpoint(s: socket.socket, peer: bool = False) -> Endpoint:
    name = s.getpeername() if peer else s.getsockname()
    return Endpoint(ip_address(name[0]), name[1])


@dataclass
class _Run:
    """Bookkeeping for one scenario: what the oracle knows about every socket it made."""

    port: int
    open: list[socket.socket] = field(default_factory=list)
    opts: dict[int, SockOpts] = field(default_factory=dict)  # inode -> flags
    seq: dict[int, int] = field(default_factory=dict)  # inode -> bind order (UDP chain order)
    mini: dict[tuple[Endpoint, Endpoint], SockOpts] = field(default_factory=dict)
    expect_mini: set[tuple[Endpoint, Endpoint]] = field(default_factory=set)
    cache: ReuseportCache | None = None
    listeners: list[tuple[socket.socket, SockOpts]] = field(default_factory=list)

    @property
    def port_state(self) -> PortState:
        """What the oracle knows of the port's kernel state: the bucket cache it tracked, and
        the UDP holders in chain order (Lab.holders sorts them so)."""
        return PortState(BucketState.of_cache(self.cache), udp_chain_order=True)

    def keep(self, s: socket.socket, opts: SockOpts) -> None:
        self.open.append(s)
        ino = os.fstat(s.fileno()).st_ino
        self.opts[ino] = opts
        self.seq[ino] = len(self.seq)

    def closing(self, s: socket.socket, opts: SockOpts) -> None:
        """s is about to close and may leave a timewait mini-socket with these flags."""
        key = (_endpoint(s), _endpoint(s, peer=True))
        self.mini[key] = opts
        self.expect_mini.add(key)
        if s in self.open:
            self.open.remove(s)
        s.close()


def _request(spec: Spec, port: int, listen: bool) -> BindRequest:
    return BindRequest(
        spec.proto,
        ip_address(spec.addr),
        port,
        reuseaddr=spec.reuseaddr,
        reuseport=spec.reuseport,
        v6only=spec.v6only,
        uid=spec.uid,
        listen=listen,
    )


class Lab:
    """Builds and checks scenarios in the current thread's network namespace."""

    def __init__(self, settings: KernelSettings = SETTINGS) -> None:
        self.settings = settings
        self.helper = _UidHelper()
        self.server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.server.bind(("::", SERVER_PORT))
        self.server.listen(64)

    def close(self) -> None:
        self.server.close()
        self.helper.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sockets -----------------------------------------------------------------------------

    def _socket(self, spec: Spec) -> socket.socket:
        kind = socket.SOCK_STREAM if spec.proto is Proto.TCP else socket.SOCK_DGRAM
        if spec.uid == NOBODY:
            s = self.helper.socket(spec.family, kind)
        else:
            s = socket.socket(spec.family, kind | socket.SOCK_CLOEXEC)
        if spec.reuseaddr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.reuseport:
            s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        if spec.family == socket.AF_INET6 and spec.v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.v6only))
        return s

    def opts_for(self, spec: Spec) -> SockOpts:
        """The ground truth the oracle hands the model: the flags it set, and sk_ipv6only."""
        v6only = None
        if spec.family == socket.AF_INET6:
            v6only = effective_v6only(ip_address(spec.addr), spec.v6only, self.settings)
        return SockOpts(spec.reuseaddr, spec.reuseport, v6only)

    def _joined(self, run: _Run, spec: Spec) -> None:
        """A TCP get_port() on the port succeeded: inet_csk_update_fastreuse()."""
        if spec.proto is Proto.TCP:
            a = ip_address(spec.addr)
            v6 = effective_v6only(a, spec.v6only, self.settings)
            run.cache = reuseport_cache_after(
                run.cache, addr=a, v6only=v6, uid=spec.uid, reuseport=spec.reuseport
            )

    def _bound(self, run: _Run, spec: Spec) -> socket.socket:
        s = self._socket(spec)
        try:
            s.bind((spec.addr, run.port))
        except OSError:
            s.close()
            raise
        self._joined(run, spec)
        return s

    @staticmethod
    def _dial_target(spec: Spec) -> tuple[int, str]:
        """Where a client reaches a listener bound to spec.addr."""
        a = ip_address(spec.addr)
        if isinstance(a, IPv4Address):
            return socket.AF_INET, "127.0.0.1" if a.is_unspecified else spec.addr
        if a.ipv4_mapped is not None:
            m = a.ipv4_mapped
            return socket.AF_INET, "127.0.0.1" if m.is_unspecified else str(m)
        if a.is_unspecified and spec.v6only is False:
            return socket.AF_INET, "127.0.0.1"
        return socket.AF_INET6, "::1" if a.is_unspecified else spec.addr

    # -- existing sockets --------------------------------------------------------------------

    def _build(self, run: _Run, e: Existing) -> None:
        spec = e.spec
        opts = self.opts_for(spec)
        if e.kind in (Kind.UDP, Kind.UDP_CONNECTED):
            s = self._bound(run, spec)
            if e.kind is Kind.UDP_CONNECTED:
                s.connect((_peer_for(spec), 9))
            run.keep(s, opts)
        elif e.kind is Kind.LISTEN:
            s = self._bound(run, spec)
            s.listen(8)
            self._joined(run, spec)
            opts = _cleared(s, opts) if e.clear_after_bind else opts
            run.keep(s, opts)
            run.listeners.append((s, opts))
        elif e.kind is Kind.BOUND:
            s = self._bound(run, spec)
            run.keep(s, _cleared(s, opts) if e.clear_after_bind else opts)
        elif e.kind in CHILD_KINDS:
            self._build_child(run, e, opts)
        else:
            self._build_client(run, e, opts)

    def _build_child(self, run: _Run, e: Existing, opts: SockOpts) -> None:
        lst = self._bound(run, e.spec)
        lst.listen(8)
        self._joined(run, e.spec)
        run.keep(lst, opts)
        run.listeners.append((lst, opts))
        fam, target = self._dial_target(e.spec)
        client = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        client.connect((target, run.port))
        run.open.append(client)  # client side: ephemeral port, not a holder
        # The connection may land on another listener of ours (a SO_REUSEPORT group, or a more
        # specific address): accept it where it is; the child copies *that* listener's flags.
        child, opts = _accept_any(run.listeners)
        copts = opts
        if e.child_reuseaddr is not None:
            child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(e.child_reuseaddr))
            copts = SockOpts(e.child_reuseaddr, opts.reuseport, opts.v6only)
        run.keep(child, copts)
        if not e.keep_listener:
            run.listeners.remove((lst, opts_of(run, lst)))
            run.open.remove(lst)
            lst.close()
        if e.kind is Kind.TIME_WAIT:
            run.closing(child, copts)
            run.open.remove(client)
            client.close()
        elif e.kind is Kind.FIN_WAIT2:
            run.closing(child, copts)

    def _build_client(self, run: _Run, e: Existing, opts: SockOpts) -> None:
        s = self._bound(run, e.spec)
        s.connect((_peer_for(e.spec), SERVER_PORT))
        peer, _ = self.server.accept()
        run.keep(s, opts)
        run.open.append(peer)
        if e.kind is Kind.CLIENT_TIME_WAIT:
            run.closing(s, opts)
            run.open.remove(peer)
            peer.close()
        elif e.kind is Kind.CLIENT_FIN_WAIT2:
            run.closing(s, opts)

    # -- reading and checking ----------------------------------------------------------------

    def snapshot(self, ports: list[int]) -> dict[int, list[SocketRecord]]:
        """One inet_diag dump (rebind's reader) for a contiguous batch of ports."""
        out: dict[int, list[SocketRecord]] = {p: [] for p in ports}
        for r in iter_sockets(port_range=(min(ports), max(ports))):
            if r.local.port in out:
                out[r.local.port].append(r)
        return out

    def holders(self, run: _Run, records: list[SocketRecord], exclude: int | None = None) -> list[Holder]:
        """The port's sockets with the flags the oracle set; UDP ones in hash-chain order."""
        hs = [Holder(r, self._opts(run, r)) for r in records if exclude is None or r.inode != exclude]
        tcp = [h for h in hs if h.socket.proto is Proto.TCP]
        udp = sorted(
            (h for h in hs if h.socket.proto is Proto.UDP),
            key=lambda h: run.seq.get(h.socket.inode or -1, -1),
        )
        return tcp + udp_chain_order(udp)

    @staticmethod
    def _opts(run: _Run, r: SocketRecord) -> SockOpts:
        if r.is_mini:
            return run.mini.get((r.local, r.remote), SockOpts())
        return run.opts.get(r.inode or -1, SockOpts())

    def _settle(self, runs: list[_Run]) -> bool:
        """Wait (bounded) until every expected timewait mini-socket shows up; False if not."""
        deadline = time.monotonic() + 2.0
        while True:
            snap = self.snapshot([r.port for r in runs])
            if all(r.expect_mini <= {(x.local, x.remote) for x in snap[r.port] if x.is_mini} for r in runs):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)

    def run(self, sc: Scenario) -> list[Check]:
        return self.run_batch([sc])

    def run_batch(self, scenarios: list[Scenario]) -> list[Check]:
        """Run scenarios (contiguous distinct ports) in lockstep: one dump per step for all."""
        runs = [_Run(sc.port) for sc in scenarios]
        try:
            return self._run_batch(scenarios, runs)
        finally:
            for run in runs:
                for s in run.open:
                    s.close()

    def _run_batch(self, scenarios: list[Scenario], runs: list[_Run]) -> list[Check]:
        ports = [r.port for r in runs]
        for sc, run in zip(scenarios, runs, strict=True):
            for e in sc.existing:
                try:
                    self._build(run, e)
                except OSError:
                    pass  # this existing socket conflicts with an earlier one: the scenario goes on
        unstable = not self._settle(runs)
        checks: list[Check] = []
        later: list[list[tuple[int, Probe, socket.socket]]] = [[] for _ in runs]
        for i in range(max(len(sc.probes) for sc in scenarios)):
            snap = self.snapshot(ports)
            for k, (sc, run) in enumerate(zip(scenarios, runs, strict=True)):
                if i < len(sc.probes):
                    hs = self.holders(run, snap[run.port])
                    checks.append(self._probe(sc, run, i, sc.probes[i], hs, later[k], unstable))
        for j in range(max(len(x) for x in later)):
            snap = self.snapshot(ports)
            for k, (sc, run) in enumerate(zip(scenarios, runs, strict=True)):
                if j < len(later[k]):
                    i, p, s = later[k][j]
                    hs = self.holders(run, snap[run.port], exclude=os.fstat(s.fileno()).st_ino)
                    req = _request(p.spec, sc.port, True)
                    predicted = check_listen(req, hs, self.settings, port=run.port_state)
                    actual = _call(s.listen, 8)
                    if actual is None:
                        self._joined(run, p.spec)
                    checks.append(Check(sc, i, Stage.LISTEN, predicted, actual, tuple(hs), unstable))
        return checks

    def real_bind(self, run: _Run, p: Probe) -> tuple[Stage, int | None]:
        """The user's real bind (and listen, if the probe listens now): where it failed, errno."""
        s = self._socket(p.spec)
        actual = _call(s.bind, (p.spec.addr, run.port))
        if actual is not None:
            s.close()
            return Stage.BIND, actual
        run.open.append(s)
        if p.listen is ListenMode.NOW:
            err = _call(s.listen, 8)
            if err is not None:
                return Stage.LISTEN, err
        return Stage.BIND, None

    def _probe(
        self,
        sc: Scenario,
        run: _Run,
        i: int,
        p: Probe,
        hs: list[Holder],
        later: list[tuple[int, Probe, socket.socket]],
        unstable: bool,
    ) -> Check:
        req = _request(p.spec, run.port, p.listen is ListenMode.NOW)
        predicted = evaluate(req, hs, self.settings, port=run.port_state)
        s = self._socket(p.spec)
        actual = _call(s.bind, (p.spec.addr, run.port))
        stage = Stage.BIND
        if actual is None:
            self._joined(run, p.spec)
            run.keep(s, self.opts_for(p.spec))
            if p.listen is ListenMode.NOW:
                actual = _call(s.listen, 8)
                stage = Stage.LISTEN if actual is not None else stage
                if actual is None:
                    self._joined(run, p.spec)
            elif p.listen is ListenMode.LATER:
                later.append((i, p, s))
        else:
            s.close()
        return Check(sc, i, stage, predicted, actual, tuple(hs), unstable)


def _cleared(s: socket.socket, opts: SockOpts) -> SockOpts:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 0)
    return SockOpts(False, False, opts.v6only)


def opts_of(run: _Run, s: socket.socket) -> SockOpts:
    return run.opts[os.fstat(s.fileno()).st_ino]


def _accept_any(listeners: list[tuple[socket.socket, SockOpts]]) -> tuple[socket.socket, SockOpts]:
    ready, _, _ = select.select([s for s, _ in listeners], [], [], 5.0)
    if not ready:
        raise OSError(errno.ETIMEDOUT, "the test connection reached none of our listeners")
    lst = ready[0]
    child, _ = lst.accept()
    return child, next(o for s, o in listeners if s is lst)


def _peer_for(spec: Spec) -> str:
    """A loopback peer that a socket bound to spec.addr can reach."""
    a = ip_address(spec.addr)
    if isinstance(a, IPv4Address):
        return "127.0.0.1"
    if a.ipv4_mapped is not None or (a.is_unspecified and not spec.v6only):
        return "::ffff:127.0.0.1"
    return "::1"


def _call(fn: Callable[[Any], None], arg: object) -> int | None:
    try:
        fn(arg)
    except OSError as exc:
        return exc.errno
    return None


def run_scenarios(
    count: int,
    seed: int,
    *,
    port_base: int = 10000,
    lab: Lab | None = None,
    start: int = 0,
    batch: int = 50,
) -> Iterator[Check]:
    """Run ``count`` random scenarios on ports port_base.. in the current namespace."""
    rng = random.Random(seed)
    own = lab is None
    lab = lab or Lab()
    try:
        for k0 in range(0, count, batch):
            scs = [random_scenario(rng, start + k, port_base + k) for k in range(k0, min(count, k0 + batch))]
            yield from lab.run_batch(scs)
    finally:
        if own:
            lab.close()


# --------------------------------------------------------------------------------------------
# Asking never changes the answer: the user's real bind with and without `rebind why` first.


@dataclass(frozen=True, slots=True)
class AskCheck:
    """One scenario built twice (two ports): the same later binds (other users' binds that come
    after the question), then the asked probe's real bind, on an untouched copy and on a copy
    that `rebind why` (with its trial binds) just looked at; and whether why's verdict,
    headline and bindable agree."""

    scenario: Scenario
    without: tuple[Stage, int | None]
    with_why: tuple[Stage, int | None]
    verdict: str
    bindable: bool
    headline: str
    consistent: bool
    #: why said bindable (from a trial) but the real bind failed, or the reverse.
    wrong: bool
    #: The two copies never reached the same state (an expected TIME_WAIT did not show up
    #: within the settle deadline, as the oracle's own checks flag): nothing to compare.
    unstable: bool = False
    #: Binds that come after the question (before the asked one), and their results per copy.
    later: tuple[Probe, ...] = ()
    later_without: tuple[tuple[Stage, int | None], ...] = ()
    later_with_why: tuple[tuple[Stage, int | None], ...] = ()

    @property
    def same(self) -> bool:
        return self.unstable or (self.without == self.with_why and self.later_without == self.later_with_why)

    def __str__(self) -> str:
        lines = [str(self.scenario)]
        for p, a, b in zip(self.later, self.later_without, self.later_with_why, strict=True):
            lines.append(f"  later {p}: without why {_res(a)}  with why {_res(b)}")
        lines.append(f"  asked: without why: {_res(self.without)}  with why: {_res(self.with_why)}")
        lines.append(
            f"  why: {self.verdict} bindable={self.bindable} consistent={self.consistent}: {self.headline}"
        )
        return "\n".join(lines)


def _res(r: tuple[Stage, int | None]) -> str:
    stage, err = r
    return "ok" if err is None else f"{stage.value}: {errno.errorcode.get(err, err)}"


def random_asking_scenario(rng: random.Random, index: int, port: int) -> Scenario:
    """A random scenario; some existing sockets clear their flags after bind (the kernel's
    fast-reuse cache keeps the bind-time values: what a careless probe would reset)."""
    sc = random_scenario(rng, index, port)
    existing = tuple(
        replace(e, clear_after_bind=rng.random() < 0.3) if e.kind in (Kind.LISTEN, Kind.BOUND) else e
        for e in sc.existing
    )
    return replace(sc, existing=existing, probes=sc.probes[:1])


def random_later_binds(rng: random.Random, count: int) -> tuple[Probe, ...]:
    """Other users' binds after the question: mostly TCP, often SO_REUSEPORT (what the bucket's
    fast-reuse cache decides), on every address of the scenarios."""
    out = []
    for _ in range(count):
        proto = Proto.UDP if rng.random() < 0.15 else Proto.TCP
        mode = rng.choice((ListenMode.NOW, ListenMode.NEVER)) if proto is Proto.TCP else ListenMode.NEVER
        out.append(Probe(_spec(rng, proto), mode))
    return tuple(out)


def run_asking(
    count: int, seed: int, *, lab: Lab, port_base: int = 40000, start: int = 0, later: int = 3
) -> Iterator[AskCheck]:
    """``later``: how many other binds follow the question (before the asked bind) on both copies."""
    from rebind.diagnosis import diagnose

    rng = random.Random(seed)
    for k in range(count):
        sc = random_asking_scenario(rng, start + k, port_base + 2 * k)
        others = random_later_binds(rng, rng.randint(0, later))
        twin = replace(sc, port=sc.port + 1)
        runs = [_Run(sc.port), _Run(twin.port)]
        try:
            for s, run in ((sc, runs[0]), (twin, runs[1])):
                for e in s.existing:
                    try:
                        lab._build(run, e)
                    except OSError:
                        pass
            unstable = not lab._settle(runs) or not _same_state(lab, sc.port, twin.port)
            p = sc.probes[0]
            later_without = tuple(lab.real_bind(runs[1], q) for q in others)
            without = lab.real_bind(runs[1], p)
            req = _request(p.spec, sc.port, p.listen is ListenMode.NOW)
            d = diagnose(req)
            later_with = tuple(lab.real_bind(runs[0], q) for q in others)
            with_why = lab.real_bind(runs[0], p)
            consistent = _consistent_answer(d)
            wrong = (
                not others
                and d.trial is not None
                and d.bindable
                and with_why[1] is not None
                and with_why[0] is Stage.BIND
            )
            yield AskCheck(
                sc,
                without,
                with_why,
                d.verdict.value,
                d.bindable,
                d.headline,
                consistent,
                wrong,
                unstable,
                others,
                later_without,
                later_with,
            )
        finally:
            for run in runs:
                for s in run.open:
                    s.close()


def _same_state(lab: Lab, a: int, b: int) -> bool:
    """Both copies show the same sockets (states, addresses, flags' carriers), ports aside."""
    snap = lab.snapshot([a, b])

    def shape(port: int) -> list[tuple[str, str, str, bool]]:
        return sorted((r.proto.value, r.state.name, str(r.local.addr), r.is_mini) for r in snap[port])

    return shape(a) == shape(b)


def _consistent_answer(d: Any) -> bool:
    """Headline, verdict and bindable (hence exit code and JSON) say the same thing."""
    line = d.headline
    if d.bindable:
        return d.verdict.value == "free" and " is free" in line and "busy" not in line
    return " is free" not in line and (d.verdict.value != "busy" or " is busy" in line)
