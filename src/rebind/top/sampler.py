"""One refresh of `rebind top`: kernel-filtered dumps, owners, then the pure view model.

What each refresh reads (measured on mkload.py's 211k-socket table, bench/top.py):

* every refresh: TCP listeners (the listening hash: well under 1 ms) and UDP sockets, filtered
  in the kernel by port (inet_diag bytecode) when ports are watched;
* as a budgeted job (rebind.top.cadence): bound-but-not-listening TCP sockets (the kernel walks
  the whole bind hash, bhash2, for them: ~55 ms of kernel time on that table), the other TCP
  states of watched ports -- connections, TIME_WAIT, FIN_WAIT2 (the established hash walk) --
  and the owner scan (a BPF task-file iterator or /proc). On an idle machine they are cheap and
  run every refresh; on a big table they run less often, countdowns are extrapolated from the
  timers the kernel reported, and the view says how old that part is;
* ``--all``: listening/bound sockets of every port, plus the TIME_WAIT / orphan FIN_WAIT2
  leftovers of those ports and of ports outside the ephemeral range (server-side leftovers that
  block a restart). Client connections are never read.

Owners are cached by socket inode between owner scans (a socket's holders change only through
fork, exit or fd passing); a holding socket never seen before forces a scan at once, and owners
whose process is gone are dropped at every refresh (one stat each).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address

from rebind.model.localhost import LocalhostResolution
from rebind.model.records import Owner, Proto, SocketEntry, SocketRecord, State
from rebind.model.sockstate import SockState, SockStates
from rebind.top.cadence import Cadence
from rebind.top.model import PortKey, Snapshot, SocketRow, build_ports, build_rows, left_now, reduce_holders

#: TCP states that are not "holding" the port for a server: connections and leftovers.
OTHER_TCP_STATES = frozenset(State) - {State.LISTEN, State.BOUND_INACTIVE, State.CLOSE}
#: Leftover states read for --all (the timewait mini-sockets: they count down).
LEFTOVER_STATES = frozenset({State.TIME_WAIT, State.FIN_WAIT2})
UDP_STATES = frozenset({State.CLOSE, State.ESTABLISHED})

BOUND, OTHERS, OWNERS = "bound-inactive", "connections+leftovers", "owners"
#: The kernel's own state of the ports' sockets (BPF, root): flags, TCP bind bucket, UDP chain.
KERNEL = "kernel state"


class Sampler:
    def __init__(
        self,
        ports: Sequence[int] = (),
        *,
        all_ports: bool = False,
        owners: bool = True,
        interval: float = 1.0,
    ) -> None:
        from rebind.kernel.owners import proc_root
        from rebind.kernel.sysctl import kernel_settings

        self.ports = tuple(sorted(set(ports)))
        self.all_ports = all_ports or not self.ports
        self.owners = owners
        self.settings = kernel_settings()
        self.uid = os.geteuid()
        self.watched = tuple(PortKey(p, Proto.TCP) for p in self.ports)
        self.cadence = Cadence(interval)
        for name in (BOUND, OTHERS, OWNERS, KERNEL):
            self.cadence.job(name)
        self.proc = proc_root()
        self.source = "netlink"
        self.warnings: tuple[str, ...] = ()
        self._bound: list[SocketRecord] = []
        self._others: list[SocketRecord] = []
        self._others_mono = 0.0
        self._other_rows: dict[PortKey, tuple[SocketRow, ...]] = {}
        self._other_socks: dict[PortKey, list[SocketRecord]] = {}
        self._owners: dict[int, tuple[Owner, ...]] = {}
        self._kernel: dict[int, SockState] = {}

    # -- kernel reads ---------------------------------------------------------------------------

    def _localhost(self) -> LocalhostResolution:
        """Issue 20: how localhost resolves, read once (top marks split-brain ports)."""
        res: LocalhostResolution | None = getattr(self, "_lh", None)
        if res is None:
            from rebind.kernel.resolver import localhost_resolution

            res = self._lh = localhost_resolution(0)
        return res

    def _dump(
        self, protos: Iterable[Proto], states: Iterable[State], ports: Sequence[int] | None
    ) -> list[SocketRecord]:
        from rebind.kernel.walk import walk
        from rebind.model.query import SocketQuery

        w = walk(SocketQuery.create(ports=ports, protos=protos, states=states))
        self.source = w.source
        if w.warnings:
            self.warnings = w.warnings
        return list(w.records)

    def _fast(self) -> list[SocketRecord]:
        out: dict[tuple[object, ...], SocketRecord] = {}
        if self.ports:
            for r in self._dump([Proto.TCP], [State.LISTEN], self.ports):
                out[_ident(r)] = r
            for r in self._dump([Proto.UDP], UDP_STATES, self.ports):
                out[_ident(r)] = r
        if self.all_ports:
            for r in self._dump([Proto.TCP], [State.LISTEN], None):
                out[_ident(r)] = r
            for r in self._dump([Proto.UDP], [State.CLOSE], None):
                out[_ident(r)] = r
        return list(out.values())

    def _read_bound(self) -> list[SocketRecord]:
        out: dict[tuple[object, ...], SocketRecord] = {}
        if self.ports:
            for r in self._dump([Proto.TCP], [State.BOUND_INACTIVE], self.ports):
                out[_ident(r)] = r
        if self.all_ports:
            for r in self._dump([Proto.TCP], [State.BOUND_INACTIVE], None):
                out[_ident(r)] = r
        return list(out.values())

    def _read_others(self, held: set[int]) -> list[SocketRecord]:
        out: dict[tuple[object, ...], SocketRecord] = {}
        if self.ports:
            for r in self._dump([Proto.TCP], OTHER_TCP_STATES, self.ports):
                out[_ident(r)] = r
        if self.all_ports:
            low, high = self.settings.ip_local_port_range
            for r in self._dump([Proto.TCP], LEFTOVER_STATES, None):
                port = r.local.port
                if r.is_mini and (port in held or not low <= port <= high):
                    out[_ident(r)] = r
        return list(out.values())

    # -- owners ---------------------------------------------------------------------------------

    def _scan_owners(self, records: Iterable[SocketRecord]) -> None:
        from rebind.kernel.owners import find_owners

        found, report = find_owners(r for r in records if r.inode)
        self._owners = found
        if report.inaccessible:
            self.warnings = (
                f"{report.inaccessible} process(es) not inspected (not root?): owners may be missing",
            )

    def _prune_owners(self) -> None:
        """Drop owners whose process has exited since the last scan (one stat per process)."""
        pids = {o.pid for owners in self._owners.values() for o in owners}
        gone = {p for p in pids if not os.path.exists(f"{self.proc}/{p}")}
        if gone:
            self._owners = {
                ino: tuple(o for o in owners if o.pid not in gone) for ino, owners in self._owners.items()
            }

    # -- one refresh ----------------------------------------------------------------------------

    def sample(self) -> Snapshot:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        cad = self.cadence
        now = time.monotonic()
        fast = self._fast()
        if cad.due(BOUND, now):
            t = time.thread_time()
            self._bound = self._read_bound()
            cad.job(BOUND).ran(now, time.thread_time() - t)
        holding = fast + self._bound
        others_fresh = cad.due(OTHERS, now)
        if others_fresh:
            t = time.thread_time()
            self._others = self._read_others({r.local.port for r in holding})
            self._others_mono = now
            cad.job(OTHERS).ran(now, time.thread_time() - t)
        if self.owners:
            job = cad.job(OWNERS)
            if any(r.inode and r.inode not in self._owners for r in holding):
                job.forced = True  # a new server socket: show who holds it now, not later
            if cad.due(OWNERS, now) or others_fresh:
                t = time.thread_time()
                self._scan_owners([*holding, *self._others])
                job.ran(now, time.thread_time() - t)
            else:
                self._prune_owners()
        if others_fresh:
            self._group_others()
        entries = [SocketEntry(r, self._owners.get(r.inode, ()) if r.inode else ()) for r in holding]
        rows, socks = self._current_others(now)
        if cad.due(KERNEL, now):
            t = time.thread_time()
            self._kernel = self._read_kernel([*holding, *(r for rs in socks.values() for r in rs)])
            cad.job(KERNEL).ran(now, time.thread_time() - t)
        ports = build_ports(
            entries,
            settings=self.settings,
            uid=self.uid,
            watched=self.watched,
            sampled=now,
            extra_rows=rows,
            extra_sockets=socks,
            localhost=self._localhost(),
            kernel=self._kernel,
        )
        return Snapshot(
            ports=ports,
            taken_at=time.time(),
            mono=now,
            cpu_s=time.thread_time() - cpu0,
            wall_s=time.perf_counter() - wall0,
            source=self.source,
            warnings=self.warnings,
        )

    def _read_kernel(self, records: Sequence[SocketRecord]) -> dict[int, SockState]:
        """The sockets' kernel state by cookie, read as `why` reads it (kernel/sockstates.py:
        iterator_plan per port, carried out at once by read_kernel_ports: one listening-hash
        walk, lookups by 4-tuple, the UDP walk), so the bindable column is judged with the
        sockets' own flags and the port's bucket/chain. Empty where BPF cannot run: the answers
        that hinge on it stay "?"."""
        from rebind.kernel.sockstates import iterator_plan, read_kernel_ports
        from rebind.model.request import BindRequest

        entries = [SocketEntry(r) for r in records]
        keys = sorted(
            {(r.proto.value, r.local.port) for r in records} | {(k.proto.value, k.port) for k in self.watched}
        )
        plans = [
            (req, iterator_plan(req, entries, {}))
            for proto, port in sorted(keys)
            for req in (BindRequest(proto=Proto(proto), addr=IPv4Address("0.0.0.0"), port=port),)
        ]
        got = read_kernel_ports(entries, plans)
        return got.by_cookie() if isinstance(got, SockStates) else {}

    def _group_others(self) -> None:
        groups: dict[PortKey, list[SocketRecord]] = {}
        for r in self._others:
            groups.setdefault(PortKey(r.local.port, r.proto), []).append(r)
        self._other_rows = {
            k: build_rows(
                [SocketEntry(r, self._owners.get(r.inode, ()) if r.inode else ()) for r in recs],
                self._others_mono,
            )
            for k, recs in groups.items()
        }
        self._other_socks = {k: reduce_holders(recs) for k, recs in groups.items()}

    def _current_others(
        self, now: float
    ) -> tuple[dict[PortKey, tuple[SocketRow, ...]], dict[PortKey, list[SocketRecord]]]:
        """Rows and sockets read at the last connections/leftovers dump, minus expired timers."""
        age_ms = int((now - self._others_mono) * 1000)
        rows = {
            k: tuple(r for r in rs if r.left_ms is None or left_now(r.left_ms, r.sampled, now))
            for k, rs in self._other_rows.items()
        }
        socks = {
            k: [r for r in rs if not r.is_mini or r.expires_ms is None or r.expires_ms > age_ms]
            for k, rs in self._other_socks.items()
        }
        return {k: v for k, v in rows.items() if v}, socks

    def slowed(self) -> dict[str, float]:
        """Parts of the refresh that run less often than every refresh (name -> period, s)."""
        return self.cadence.slowed()

    def age(self, name: str, now: float) -> float | None:
        return self.cadence.job(name).age(now)


def _ident(r: SocketRecord) -> tuple[object, ...]:
    return (r.proto, r.family, r.state, r.local, r.remote, r.cookie)
