"""Is the new generation ready? What the witnesses see, each as a machine event.

Two witnesses (docs/supervisor.md, "Readiness"): a /proc scan that sees a process of the new
generation's tree serving every socket (procscan), and READY=1 on our notify socket from a sender
the kernel attests (SCM_CREDENTIALS) to be in that tree (``m.Notified``: the machine decides what
it means, the proof in ``notify`` mode, a reason to look at once in ``auto`` mode). Fds passed
along with a message are closed here without ever blocking the loop (issue 18): the sender
decides how (notify.FdDisposal).
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator, Sequence

from rebind.supervisor import machine as m
from rebind.supervisor import procscan
from rebind.supervisor.config import ReadyMode
from rebind.supervisor.fdreserve import FdReserve
from rebind.supervisor.generations import Generations
from rebind.supervisor.notify import FdDisposal, NotifyMessage, NotifyReceiver

NOTIFY_BUDGET = 64  # sd_notify datagrams handled per wake-up; the rest wait for the next one
PASSED_FDS_MAX = 64  # fds passed to the notify socket still waiting to be closed: then stop reading
NOTIFY_RESUME = 0.1  # while reading is paused: how often the closer's backlog is looked at
SCAN_NEEDS = 2  # fds a readiness scan holds at once (a /proc directory and a file in it)
LOG_ONCE_MAX = 1024  # senders remembered for "log once"


class Readiness:
    def __init__(
        self,
        mode: ReadyMode,
        sel: selectors.BaseSelector,
        sockets: Sequence[socket.socket],
        reserve: FdReserve,
        gens: Generations,
        log: Callable[[str], None],
        state: Callable[[], m.State],
    ) -> None:
        self.mode = mode
        self.sel = sel
        self.reserve = reserve
        self.gens = gens
        self.log = log
        self.state = state  # the machine's state now (it changes between two messages of a batch)
        self.inodes = frozenset(os.fstat(s.fileno()).st_ino for s in sockets)
        # Listening TCP sockets' ports: "holds a connection it accepted" proves serving (procscan).
        self.tcp_ports = {
            os.fstat(s.fileno()).st_ino: int(s.getsockname()[1])
            for s in sockets
            if s.type == socket.SOCK_STREAM
        }
        self.notify: NotifyReceiver | None = None
        self.disposal = FdDisposal(PASSED_FDS_MAX)
        self.next_scan = 0.0
        self.paused = False  # too many passed fds waiting to be closed: not reading
        self.ignored: set[int] = set()
        self.ignored_count = 0
        self.outsiders: set[tuple[int, int]] = set()  # (generation, pid) not in its tree
        self.fd_senders: set[int] = set()  # foreign pids that passed fds (logged once)

    def open(self) -> None:
        if self.mode.listens:
            self.notify = NotifyReceiver()
            self.sel.register(self.notify, selectors.EVENT_READ, self.on_notify)

    @property
    def address(self) -> str | None:
        """NOTIFY_SOCKET for the generations, None when READY=1 is not listened to."""
        return self.notify.address if self.notify is not None else None

    def look_now(self, now: float) -> None:
        self.next_scan = now

    def wake_at(self, now: float) -> list[float]:
        times = [now + NOTIFY_RESUME] if self.paused else []
        if self.state().starting and self.mode.scans:
            times.append(self.next_scan)
        return times

    def housekeeping(self) -> None:
        if self.notify is not None and self.paused and self.disposal.pending < PASSED_FDS_MAX // 2:
            self.paused = False
            self.sel.register(self.notify, selectors.EVENT_READ, self.on_notify)

    def close(self) -> None:
        if self.notify is not None:
            # Datagrams still queued on it may carry fds whose release waits (a lingering TCP
            # socket): closing it here could hang our exit, so the closer thread drops it.
            self.disposal.dispose((self.notify.sock.detach(),), foreign=False)
        self.disposal.close()

    # -- the /proc witness --------------------------------------------------------------------------

    def scan(self, now: float) -> Iterator[m.Event]:
        gen = self.state().starting
        if gen is None or not self.mode.scans or now < self.next_scan:
            return
        # Fast polling at first (most apps are ready within a second), then gentler.
        self.next_scan = now + (0.01 if now - gen.started < 2.0 else 0.1)
        leader = self.gens.leaders.get(gen.number)
        if leader is None:
            return
        try:
            # A scan holds one or two fds at a time and takes EMFILE for "not found": with the
            # table full, a restart would never be seen to serve. The reserve lends them.
            with self.reserve.lent(SCAN_NEEDS):
                found = procscan.serving(leader, self.inodes, self.tcp_ports)
        except OSError:
            return  # e.g. EMFILE while listing /proc: scan again shortly
        if len(found) == len(self.inodes):
            yield m.Ready(gen.number, "; ".join(sorted({str(s) for s in found.values()})), now)

    # -- the notify witness -------------------------------------------------------------------------

    def on_notify(self) -> Iterator[m.Event]:
        assert self.notify is not None
        # A budget per wake-up: a READY=1 flood from any local user cannot starve the loop
        # (issue 8, item 21); what is left is read at the next wake-up.
        for _ in range(NOTIFY_BUDGET):
            got = self.notify.receive(1)
            if not got:
                return
            msg = got[0]
            if msg.fds:
                self._dispose(msg)
            if msg.get("READY") == "1":
                yield from self._ready_message(msg.pid)
            if self.disposal.full:
                # The closer thread is behind (a close that waits): every further message may
                # install up to 253 fds in our table. Leave them queued in the kernel until it
                # catches up; READY=1 waits too, /proc scans (auto, accept) do not.
                self.log(f"{self.disposal.pending} passed fds not closed yet: pausing the notify socket")
                self.sel.unregister(self.notify)
                self.paused = True
                return

    def _dispose(self, msg: NotifyMessage) -> None:
        """Close fds passed with a notify message (we keep no fd store), never blocking the loop.

        The kernel-attested sender decides how: from a live generation's tree, its sockets are
        left as they are (the app may still use them); from anyone else they get SO_LINGER {1, 0}.
        """
        ours = any(self._in_generation(msg.pid, g) for g in self.state().gens)
        self.disposal.dispose(msg.fds, foreign=not ours)
        if ours or msg.pid in self.fd_senders:
            return
        if len(self.fd_senders) < LOG_ONCE_MAX:
            self.fd_senders.add(msg.pid)
            self.log(
                f"closed {len(msg.fds)} fd(s) passed by pid {msg.pid} (uid {msg.uid}) to the notify socket:"
                " not a process of a generation (logged once)"
            )

    def _in_generation(self, sender: int, gen: m.Gen | None) -> bool:
        leader = self.gens.leaders.get(gen.number) if gen else None
        if gen is None or leader is None or sender <= 0:
            return False
        # Only "no" is cached, per (generation, sender): a flood from one outsider costs one /proc
        # walk, and a cached "yes" could outlive its process and vouch for a recycled pid.
        key = (gen.number, sender)
        if key in self.outsiders:
            return False
        if procscan.in_tree(sender, leader):
            return True
        if len(self.outsiders) >= LOG_ONCE_MAX:
            self.outsiders.clear()
        self.outsiders.add(key)
        return False

    def _ready_message(self, sender: int) -> Iterator[m.Event]:
        state = self.state()
        # The kernel-attested sender pid must belong to a live generation's tree: a READY=1 from
        # anyone else in the netns proves nothing. What it means (the proof in notify mode, a
        # reason to look now in auto mode, nothing from the serving generation) is the machine's.
        for gen in (state.starting, state.serving):
            if gen is not None and self._in_generation(sender, gen):
                yield m.Notified(gen.number, sender, time.monotonic())
                return
        if sender in self.ignored:
            self.ignored_count += 1
            return
        if len(self.ignored) < LOG_ONCE_MAX:
            self.ignored.add(sender)
            self.log(f"ignoring READY=1 from pid {sender}: not in a starting generation's tree (logged once)")
        else:
            self.ignored_count += 1
