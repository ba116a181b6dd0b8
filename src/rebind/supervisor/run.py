"""`rebind run`: hold the listening sockets for good and run generations of the app on them.

The socket is bound once, by us, and never closed while we live, so there is no moment in which
the port is unbound: connections that arrive while no generation accepts wait in the socket's
accept queue (they belong to the socket, not to a process) and the next generation takes them.
A reload starts generation N+1 on the same sockets, waits until it *serves* (READY=1 from its
process tree, or one of its processes waiting on the socket, see procscan), and only then asks
generation N to stop (SIGTERM, --grace, SIGKILL to every process of it).

Every decision is made by the pure state machine in ``machine.py``; this module only turns
selectors, signals, /proc and fork into its events and carries out its actions.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rebind.errors import ExitCode, Fault, RebindError, UsageError
from rebind.model.validate import parse_seconds
from rebind.supervisor import machine as m
from rebind.supervisor import members, procscan
from rebind.supervisor.control import ControlServer, Request, read_request
from rebind.supervisor.fdreserve import SHORTAGE, SPAWN_NEEDS, FdReserve
from rebind.supervisor.inherit import adopt, passed_fds
from rebind.supervisor.listen import bind_datagram, bind_listener
from rebind.supervisor.notify import FdDisposal, NotifyMessage, NotifyReceiver, OuterNotifier
from rebind.supervisor.spawn import RESET_SIGNALS, become_subreaper, resolve_command, spawn
from rebind.supervisor.spec import ListenSpec
from rebind.supervisor.watchdog import TOKEN_ENV, Watchdog
from rebind.textsafe import visible

FORWARD = (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP = (signal.SIGTERM, signal.SIGINT)
_ENV_DROP = (
    b"LISTEN_PID",
    b"LISTEN_FDS",
    b"LISTEN_FDNAMES",
    b"NOTIFY_SOCKET",
    b"REBIND_GENERATION",
    TOKEN_ENV,
)
MAX_BACKLOG = 2**31 - 1  # listen() takes an int; the kernel clamps it to net.core.somaxconn
CONTROL_IDLE = 5.0  # a control client that has not sent its line by then is dropped
CONTROL_MAX = 32  # control clients still sending their line at once
ACCEPT_BACKOFF = 1.0  # after EMFILE/ENFILE in accept(): stop accepting this long
NOTIFY_BUDGET = 64  # sd_notify datagrams handled per wake-up; the rest wait for the next one
PASSED_FDS_MAX = 64  # fds passed to the notify socket still waiting to be closed: then stop reading
SCAN_NEEDS = 2  # fds a readiness scan holds at once (a /proc directory and a file in it)
NOTIFY_RESUME = 0.1  # while reading is paused: how often the closer's backlog is looked at
LOG_ONCE_MAX = 1024  # senders remembered for "log once"
MEMBERS_EVERY = 5.0  # how often live generations' process lists are recorded (a /proc pass)
LINGER_POLL = 0.25  # how often a lingering generation is checked for being empty
# What a server that binds the port itself prints when our socket holds it (Python, nginx, Go, ...).
ADDR_IN_USE = (b"Address already in use", b"EADDRINUSE", b"[Errno 98]")
TEE_CHUNK = 65536
STABLE_AFTER = m.STABLE_AFTER


class ReadyMode(enum.Enum):
    # A process of the new tree is seen serving every socket (waiting on it, or holding a
    # connection it accepted from it). READY=1 only makes us look at once: gunicorn's arbiter
    # sends it before its workers have imported the app (issue 13), so it proves nothing alone.
    AUTO = "auto"
    NOTIFY = "notify"  # only READY=1 on NOTIFY_SOCKET (trust the app: it must mean "serving")
    ACCEPT = "accept"  # only /proc, as AUTO but without listening to READY=1
    NONE = "none"  # ready as soon as exec succeeded


Restart = m.RestartPolicy


class BindFailed(RebindError):
    fault = Fault.USER

    @property
    def exit_code(self) -> int:
        return int(ExitCode.NO_MATCH)  # "port busy", as `rebind why` reports it


@dataclass(frozen=True, slots=True)
class RunConfig:
    argv: tuple[str, ...]
    listen: tuple[ListenSpec, ...]
    ready: ReadyMode = ReadyMode.AUTO
    ready_timeout: float = 30.0
    grace: float = 10.0
    restart: m.RestartPolicy = m.RestartPolicy.ON_FAILURE
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    control: str | None = None
    pid_file: str | None = None
    reuseport: bool = False
    backlog: int | None = None
    stop_signal: int = signal.SIGTERM  # what a replaced (or timed-out) generation gets
    drain: float = 0.0  # after the stop signal: this long to finish, then SIGTERM to all of it

    def __post_init__(self) -> None:
        # Validated here, not only in the CLI: inf/nan/huge durations crash select() with
        # OverflowError at the first reload (issue 8), and the API builds RunConfig directly.
        parse_seconds(self.ready_timeout, what="--ready-timeout", minimum=0.1)
        parse_seconds(self.grace, what="--grace")
        parse_seconds(self.backoff_initial, what="backoff")
        parse_seconds(self.backoff_max, what="--backoff-max")
        parse_seconds(self.drain, what="--drain")
        if self.backlog is not None and not (
            isinstance(self.backlog, int) and 1 <= self.backlog <= MAX_BACKLOG
        ):
            raise UsageError(f"--backlog {self.backlog!r} is out of range (1-{MAX_BACKLOG})")
        if self.stop_signal not in set(signal.valid_signals()):
            raise UsageError(f"--stop-signal {self.stop_signal!r} is not a signal")
        if not self.argv:
            raise UsageError("no command to run")
        if not self.listen:
            raise UsageError("give at least one --listen [HOST:]PORT")

    def machine_config(self) -> m.Config:
        return m.Config(
            ready_timeout=self.ready_timeout,
            grace=self.grace,
            restart=self.restart,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            ready_on_spawn=self.ready is ReadyMode.NONE,
            stop_signal=self.stop_signal,
            drain=self.drain,
        )


def parse_signal(value: str) -> int:
    """`TERM`, `SIGTERM`, `sigquit` or `15` -> the signal number; UsageError otherwise."""
    text = value.strip().upper()
    if text.isascii() and text.isdigit():
        number = int(text)
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        number = getattr(signal.Signals, name, 0) if name.isidentifier() else 0
    if number not in set(signal.valid_signals()) or number == 0:
        raise UsageError(f"--stop-signal {value!r} is not a signal name or number (e.g. TERM, QUIT, 3)")
    return int(number)


def exit_code(status: int) -> int:
    """Shell convention: a child killed by signal N is reported as 128+N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def bind_all(
    specs: Sequence[ListenSpec],
    reuseport: bool,
    backlog: int | None,
    adopted: dict[int, socket.socket] | None = None,
) -> list[socket.socket]:
    """Bind every spec not ADOPTED (passed by systemd); on failure close all and explain in one line."""
    adopted = dict(adopted or {})
    bound: list[socket.socket] = []
    try:
        for i, spec in enumerate(specs):
            sock = adopted.pop(i, None)
            bound.append(sock if sock is not None else _bind_one(spec, reuseport, backlog))
    except BaseException:
        for s in (*bound, *adopted.values()):
            s.close()
        raise
    return _park_high(bound)


def _bind_one(spec: ListenSpec, reuseport: bool, backlog: int | None) -> socket.socket:
    try:
        if spec.proto == "udp":
            return bind_datagram(spec.host, spec.port, reuseport=reuseport)
        return bind_listener(spec.host, spec.port, reuseport=reuseport, backlog=backlog)
    except socket.gaierror as exc:
        raise BindFailed(f"cannot listen on {spec}: {spec.host!r}: {exc.strerror}") from None
    except OSError as exc:
        notes: list[str] = getattr(exc, "__notes__", [])
        detail = "; ".join(p.strip().lstrip("- ") for note in notes for p in note.splitlines() if p.strip())
        msg = f"cannot listen on {spec}: {exc.strerror or exc}"
        raise BindFailed(msg + (f" — {detail}" if detail else "")) from None


def _park_high(socks: list[socket.socket]) -> list[socket.socket]:
    """Move our copies above 3+n so placing them at 3, 4, ... in a child never clobbers one."""
    floor = 3 + len(socks)
    out = []
    for s in socks:
        fd = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, floor)
        out.append(socket.socket(s.family, s.type, s.proto, fileno=fd))
        s.close()
    return out


@dataclass(slots=True)
class Procs:
    """What the supervisor tracks of each generation's processes (the machine knows none of it)."""

    leaders: dict[int, int] = field(default_factory=dict)  # number -> leader pid (until reaped)
    by_pid: dict[int, int] = field(default_factory=dict)  # leader pid -> number
    groups: dict[int, int] = field(default_factory=dict)  # number -> process group id (until forgotten)
    known: dict[int, set[members.Identity]] = field(default_factory=dict)  # number -> recorded members
    recorded_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        config: RunConfig,
        sockets: Sequence[socket.socket],
        log: Callable[[str], None] | None = None,
        outer: OuterNotifier | None = None,
        on_reload: Callable[[m.ReloadDone], None] | None = None,
        on_serving: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg = config
        self.mcfg = config.machine_config()
        self.state = m.State()
        self.sockets = list(sockets)
        self.inodes = frozenset(os.fstat(s.fileno()).st_ino for s in self.sockets)
        # Listening TCP sockets' ports: "holds a connection it accepted" proves serving (procscan).
        self.tcp_ports = {
            os.fstat(s.fileno()).st_ino: int(s.getsockname()[1])
            for s in self.sockets
            if s.type == socket.SOCK_STREAM
        }
        self.outer = outer  # systemd's NOTIFY_SOCKET (Type=notify / notify-reload, fd store)
        self.on_reload = on_reload  # the outcome of every reload (for metrics)
        self.on_serving = on_serving  # the number of the generation now serving (for metrics)
        self.log = log or stderr_log
        self.exe = resolve_command(config.argv, os.environ)
        self.procs = Procs()
        self.watchdog: Watchdog | None = None
        self.sel = selectors.DefaultSelector()
        self.notify: NotifyReceiver | None = None
        self.disposal = FdDisposal(PASSED_FDS_MAX)
        # Taken last, after our own sockets: a full table must not stop a restart (issue 18 item 2).
        self.reserve = FdReserve()
        self.control: ControlServer | None = None
        self.io = _IoState()
        self.token = secrets.token_hex(16).encode()  # REBIND_SUPERVISOR: marks all we started
        self.wake_r, self.wake_w = socket.socketpair()
        # Each generation's stderr comes through a pipe we copy to ours, to see for sure when it
        # failed with "Address already in use" (issue 13): read end -> [generation, last bytes].
        self.tees: dict[int, _Tee] = {}
        self.addr_in_use: set[int] = set()

    # -- set-up and tear-down -------------------------------------------------------------------

    def run(self) -> int:
        old_handlers = self._install()
        try:
            self.feed(m.Boot(time.monotonic()))
            while self.state.phase is not m.Phase.DONE:
                self._step()
            return self.state.final if self.state.final is not None else 0
        finally:
            self._teardown(old_handlers)

    def _install(self) -> dict[int, object]:
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._drain_wake)
        if self.cfg.ready in (ReadyMode.AUTO, ReadyMode.NOTIFY):
            self.notify = NotifyReceiver()
            self.sel.register(self.notify, selectors.EVENT_READ, self._on_notify)
        if self.cfg.control:
            self.control = ControlServer(self.cfg.control)
            self.sel.register(self.control, selectors.EVENT_READ, self._on_control)
        self._store_fds()
        # With the sockets in systemd's fd store they are meant to outlive us: the watchdog must
        # not wait for them to vanish (nor hunt their holders, PID 1 among them).
        self.watchdog = Watchdog(frozenset() if self.outer else self.inodes, self.token)
        old: dict[int, object] = {}
        for sig in (signal.SIGHUP, signal.SIGCHLD, *STOP, *FORWARD):
            old[sig] = signal.signal(sig, self._on_signal)
        # The C handler writes here, so a select() retried after EINTR (PEP 475) still wakes.
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        return old

    def _store_fds(self) -> None:
        """FDSTORE=1: systemd keeps our sockets while we restart (FileDescriptorStoreMax=); we get
        them back with LISTEN_FDS/LISTEN_FDNAMES. systemd ignores an fd it already stores."""
        if self.outer is None:
            return
        for spec, s in zip(self.cfg.listen, self.sockets, strict=True):
            if not self.outer.send(f"FDSTORE=1\nFDNAME={spec.name}", (s.fileno(),)):
                self.log(f"could not hand {spec} to the service manager's fd store")

    def _teardown(self, old_handlers: dict[int, object]) -> None:
        # Only when run() unwinds on an error is anything of a generation left: kill it all.
        for number in {*self.procs.known, *self.procs.leaders, *self.procs.groups}:
            self._signal_rest(number, signal.SIGKILL)
        for pid in list(self.procs.by_pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._reap_orphans()
        if self.watchdog is not None:
            self.watchdog.close()
        signal.set_wakeup_fd(-1)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        for req in self.io.requests:
            req.conn.close()
        for req in self.io.waiters.values():
            req.reply("failed: supervisor exiting")
        for fd in list(self.tees):
            self._close_tee(fd)
        if self.notify is not None:
            # Datagrams still queued on it may carry fds whose release waits (a lingering TCP
            # socket): closing it here could hang our exit, so the closer thread drops it.
            self.disposal.dispose((self.notify.sock.detach(),), foreign=False)
        self.disposal.close()
        if self.control is not None:
            self.control.close()
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()
        self.reserve.close()

    def _reap_orphans(self) -> None:
        """Kill and reap processes that re-parented to us (we are a child subreaper)."""
        me = os.getpid()
        watchdog = self.watchdog.pid if self.watchdog else -1
        try:
            snap = members.snapshot()
        except members.ScanFailed:
            return
        for p in snap.values():
            if p.ppid == me and p.pid != watchdog:
                if not p.zombie:
                    members.signal_verified((p.pid, p.start), signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, 0)

    # -- the loop -------------------------------------------------------------------------------

    def feed(self, event: m.Event) -> None:
        before = self.state.serving
        self.state, actions = m.step(self.mcfg, self.state, event)
        after = self.state.serving
        # Before the actions: a Reply among them may make its reader scrape the metrics at once.
        if self.on_serving is not None and after is not None and after is not before:
            self.on_serving(after.number)
        for action in actions:
            self._do(action)

    def _step(self) -> None:
        for key, _ in self.sel.select(self._timeout()):
            key.data()
        signals, self.io.signals = self.io.signals, []
        for sig in signals:
            self._handle_signal(sig)
        self._reap()
        now = time.monotonic()
        for event in m.timer_events(self.state, now):
            self.feed(event)
        self._housekeeping(now)
        starting = self.state.starting
        if starting and self.cfg.ready in (ReadyMode.AUTO, ReadyMode.ACCEPT) and now >= self.io.next_scan:
            self._scan(starting, now)

    def _timeout(self) -> float | None:
        if self.io.signals:
            return 0
        times = [t for t in (self.state.next_deadline(), self.io.control_resume) if t is not None]
        if self.io.notify_paused:
            times.append(time.monotonic() + NOTIFY_RESUME)
        if self.state.starting and self.cfg.ready in (ReadyMode.AUTO, ReadyMode.ACCEPT):
            times.append(self.io.next_scan)
        if self.io.requests:
            times.append(min(r.since for r in self.io.requests) + CONTROL_IDLE)
        if self.state.gens:
            times.append(self._next_record())
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.io.signals.append(sig)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(512):
                pass

    def _handle_signal(self, sig: int) -> None:
        now = time.monotonic()
        if sig == signal.SIGHUP:
            self.log("SIGHUP: reload")
            self.feed(m.Reload(None, now))
        elif sig in STOP:
            self.feed(m.Stop(sig, now))
        elif sig in FORWARD:
            self.feed(m.Forward(sig, now))

    def _housekeeping(self, now: float) -> None:
        if self.control is not None and self.io.control_resume is not None and now >= self.io.control_resume:
            self.io.control_resume = None
            self.sel.register(self.control, selectors.EVENT_READ, self._on_control)
        if self.notify is not None and self.io.notify_paused and self.disposal.pending < PASSED_FDS_MAX // 2:
            self.io.notify_paused = False
            self.sel.register(self.notify, selectors.EVENT_READ, self._on_notify)
        for req in [r for r in self.io.requests if now - r.since >= CONTROL_IDLE]:
            self._drop_request(req)  # idle: it must not hold a slot (or the loop) forever
        if self.reserve.short:
            self.reserve.refill()  # slots freed above (or anywhere) go to the reserve first
        if now >= self._next_record():
            self._record(now)

    def _next_record(self) -> float:
        lingering = any(g.role is m.Role.LINGERING for g in self.state.gens)
        return self.procs.recorded_at + (LINGER_POLL if lingering else MEMBERS_EVERY)

    def _record(self, now: float) -> None:
        """Record who belongs to which generation; notice lingering generations that emptied."""
        self.procs.recorded_at = now
        try:
            snap = members.snapshot()
        except members.ScanFailed:
            return  # out of fds for a moment: look again at the next round
        for gen in self.state.gens:
            found = self._members(gen.number, snap)
            self.procs.known[gen.number] = found
            if gen.role is m.Role.LINGERING and not found:
                self.feed(m.Emptied(gen.number, now))

    def _members(self, number: int, snap: dict[int, members.ProcInfo] | None = None) -> set[members.Identity]:
        """Live processes of generation NUMBER; what was recorded if /proc cannot be read now."""
        if snap is None:
            try:
                snap = members.snapshot()
            except members.ScanFailed:
                return set(self.procs.known.get(number, set()))
        others = {pid for n, pid in self.procs.leaders.items() if n != number}
        # Leaders of other generations are never members of this one, nor is the watchdog.
        exclude = frozenset(others | ({self.watchdog.pid} if self.watchdog else set()))
        group = self.procs.groups.get(number)
        # A process group id stays reserved while the group has members; once empty, the pid
        # may be reused, e.g. by a newer generation's leader (whose group is not ours).
        if group in others:
            group = None
        known = self.procs.known.get(number, set())
        return members.members(
            number, self.procs.leaders.get(number), group, known, os.getpid(), snap, exclude
        )

    # -- actions ----------------------------------------------------------------------------------

    def _do(self, action: m.Action) -> None:
        if isinstance(action, m.Log):
            self.log(action.line)
        elif isinstance(action, m.Spawn):
            self._spawn(action)
        elif isinstance(action, m.SignalLeader):
            self._signal_leader(action.number, action.sig)
        elif isinstance(action, m.SignalRest):
            self._signal_rest(action.number, action.sig)
        elif isinstance(action, m.Reply):
            self._reply(action.waiters, action.line)
        elif isinstance(action, m.Forget):
            self.procs.known.pop(action.number, None)
            self.procs.groups.pop(action.number, None)
        elif isinstance(action, m.NotifyOuter):
            if self.outer is not None:
                text = action.state
                if "READY=1" in text.splitlines():
                    text += f"\nMAINPID={os.getpid()}"  # we are the stable main pid, not the app
                self.outer.send(text)
        elif isinstance(action, m.ReloadDone):
            if self.on_reload is not None:
                self.on_reload(action)
        elif isinstance(action, m.Finish):
            pass  # run() returns state.final

    def _env(self, number: int) -> dict[bytes, bytes]:
        # os.environb: a variable that is not UTF-8 is passed through untouched (issue 8).
        env = {k: v for k, v in os.environb.items() if k not in _ENV_DROP}
        env[b"LISTEN_FDS"] = str(len(self.sockets)).encode()
        env[b"LISTEN_FDNAMES"] = ":".join(s.name for s in self.cfg.listen).encode()
        env[b"REBIND_GENERATION"] = str(number).encode()
        env[TOKEN_ENV] = self.token
        if self.notify is not None:
            env[b"NOTIFY_SOCKET"] = self.notify.address.encode()
        return env

    def _spawn(self, action: m.Spawn) -> None:
        n = action.number
        attempts = 0

        def fork() -> tuple[int, int]:
            nonlocal attempts
            attempts += 1
            # The stderr tee is worth the reserve, not worth not starting: after the reserve (or
            # without one) the generation runs without it.
            return self._fork(n, tee_optional=attempts > 1 or len(self.reserve.fds) < SPAWN_NEEDS)

        try:
            pid, r = self.reserve.retry(fork, self.log, f"start generation {n}")
        except (RebindError, OSError) as exc:
            self._spawn_failed(n, exc)
            return
        if r >= 0:
            os.set_blocking(r, False)
            self.tees[r] = _Tee(n)
            self.sel.register(r, selectors.EVENT_READ, lambda: self._on_tee(r))
        self._spawned(n, pid, action)

    def _fork(self, n: int, tee_optional: bool) -> tuple[int, int]:
        """Start generation N; (its leader's pid, the read end of its stderr pipe or -1)."""
        reset = (*RESET_SIGNALS, signal.SIGHUP, signal.SIGCHLD, *STOP, *FORWARD)
        fds = [s.fileno() for s in self.sockets]
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            if not tee_optional:
                raise
            r = w = -1
        try:
            pid = spawn(self.exe, self.cfg.argv, self._env(n), fds, reset, w if w >= 0 else None)
        except BaseException:
            if r >= 0:
                os.close(r)
            raise
        finally:
            if w >= 0:
                os.close(w)
        return pid, r

    def _spawn_failed(self, n: int, exc: BaseException) -> None:
        if isinstance(exc, RebindError):
            self.feed(m.SpawnFailed(n, str(exc), exc.exit_code, time.monotonic()))
            return
        # fork() or pipe2() failed (EAGAIN, ENOMEM, EMFILE): a failed generation, try again later
        reason = f"cannot start a process: {getattr(exc, 'strerror', None) or exc}"
        self.feed(m.SpawnFailed(n, reason, int(ExitCode.ENVIRONMENT), time.monotonic()))

    def _spawned(self, n: int, pid: int, action: m.Spawn) -> None:
        self.procs.leaders[n] = pid
        self.procs.groups[n] = pid  # spawn() makes the leader a process group leader
        self.procs.by_pid[pid] = n
        if self.watchdog is not None:
            self.watchdog.watch(pid)
        self.io.next_scan = time.monotonic()
        self.log(f"generation {n} (pid {pid}) started ({action.why})")
        self.feed(m.Spawned(n, time.monotonic()))

    def _on_tee(self, fd: int) -> None:
        tee = self.tees.get(fd)
        if tee is None:
            return
        for _ in range(16):  # bounded per wake-up: a chatty app cannot starve the loop
            try:
                data = os.read(fd, TEE_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_tee(fd)
                return
            _write_all(2, data)
            window = tee.tail + data
            if any(marker in window for marker in ADDR_IN_USE):
                self.addr_in_use.add(tee.number)
            tee.tail = window[-64:]

    def _close_tee(self, fd: int) -> None:
        if self.tees.pop(fd, None) is not None:
            self.sel.unregister(fd)
            os.close(fd)

    def _drain_tee(self, number: int) -> None:
        """Its leader exited: read what it wrote before we decide why it failed."""
        for fd, tee in list(self.tees.items()):
            if tee.number == number:
                self._on_tee(fd)

    def _signal_leader(self, number: int, sig: int) -> None:
        pid = self.procs.leaders.get(number)
        if pid is None:
            return
        # Record the whole generation first: a `sh -c` wrapper that exits on this signal leaves
        # orphans that only this record ties to the generation.
        self.procs.known[number] = self.procs.known.get(number, set()) | self._members(number)
        # Safe by pid: a leader is our unreaped child, so its pid cannot be recycled yet.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _signal_rest(self, number: int, sig: int) -> None:
        targets = self._members(number)
        self.procs.known[number] = self.procs.known.get(number, set()) | targets
        for ident in targets:
            members.signal_verified(ident, sig)

    def _reply(self, waiters: tuple[int, ...], line: str) -> None:
        for w in waiters:
            req = self.io.waiters.pop(w, None)
            if req is not None:
                req.reply(line)

    # -- readiness ----------------------------------------------------------------------------------

    def _scan(self, gen: m.Gen, now: float) -> None:
        # Fast polling at first (most apps are ready within a second), then gentler.
        self.io.next_scan = now + (0.01 if now - gen.started < 2.0 else 0.1)
        leader = self.procs.leaders.get(gen.number)
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
            self.feed(m.Ready(gen.number, "; ".join(sorted({str(s) for s in found.values()})), now))

    def _on_notify(self) -> None:
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
                self._on_ready_message(msg.pid)
            if self.disposal.full:
                # The closer thread is behind (a close that waits): every further message may
                # install up to 253 fds in our table. Leave them queued in the kernel until it
                # catches up; READY=1 waits too, /proc scans (auto, accept) do not.
                self.log(f"{self.disposal.pending} passed fds not closed yet: pausing the notify socket")
                self.sel.unregister(self.notify)
                self.io.notify_paused = True
                return

    def _dispose(self, msg: NotifyMessage) -> None:
        """Close fds passed with a notify message (we keep no fd store), never blocking the loop.

        The kernel-attested sender decides how: from a live generation's tree, its sockets are
        left as they are (the app may still use them); from anyone else they get SO_LINGER {1, 0}.
        """
        ours = any(self._in_generation(msg.pid, g) for g in self.state.gens)
        self.disposal.dispose(msg.fds, foreign=not ours)
        if ours or msg.pid in self.io.fd_senders:
            return
        if len(self.io.fd_senders) < LOG_ONCE_MAX:
            self.io.fd_senders.add(msg.pid)
            self.log(
                f"closed {len(msg.fds)} fd(s) passed by pid {msg.pid} (uid {msg.uid}) to the notify socket:"
                " not a process of a generation (logged once)"
            )

    def _in_generation(self, sender: int, gen: m.Gen | None) -> bool:
        leader = self.procs.leaders.get(gen.number) if gen else None
        if gen is None or leader is None or sender <= 0:
            return False
        # Only "no" is cached, per (generation, sender): a flood from one outsider costs one /proc
        # walk, and a cached "yes" could outlive its process and vouch for a recycled pid.
        key = (gen.number, sender)
        if key in self.io.outsiders:
            return False
        if procscan.in_tree(sender, leader):
            return True
        if len(self.io.outsiders) >= LOG_ONCE_MAX:
            self.io.outsiders.clear()
        self.io.outsiders.add(key)
        return False

    def _on_ready_message(self, sender: int) -> None:
        gen = self.state.starting
        # The kernel-attested sender pid must belong to the *new* generation's tree: a READY=1
        # from the old generation (or anyone else in the netns) proves nothing.
        if gen is not None and self._in_generation(sender, gen):
            if self.cfg.ready is ReadyMode.NOTIFY:
                self.feed(m.Ready(gen.number, f"READY=1 from pid {sender}", time.monotonic()))
            else:
                # auto: READY=1 from a pre-fork parent comes before its workers serve; look now,
                # and keep looking until a process of the tree really serves every socket.
                self.log(f"READY=1 from pid {sender} (generation {gen.number}); waiting until it serves")
                self.io.next_scan = time.monotonic()
            return
        if self._in_generation(sender, self.state.serving):
            return
        if sender in self.io.ignored:
            self.io.ignored_count += 1
            return
        if len(self.io.ignored) < LOG_ONCE_MAX:
            self.io.ignored.add(sender)
            self.log(f"ignoring READY=1 from pid {sender}: not in a starting generation's tree (logged once)")
        else:
            self.io.ignored_count += 1

    # -- children ------------------------------------------------------------------------------------

    def _reap(self) -> None:
        reaped_other = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            number = self.procs.by_pid.pop(pid, None)
            if number is None:
                reaped_other = True  # an orphan of some generation, re-parented to us
                continue
            self.procs.leaders.pop(number, None)
            self._relisten_if_shut()
            remaining = bool(self._members(number))
            self._drain_tee(number)
            seen = number in self.addr_in_use
            self.addr_in_use.discard(number)
            self.feed(m.Exited(number, exit_code(status), remaining, time.monotonic(), seen))
        if reaped_other and any(g.role is m.Role.LINGERING for g in self.state.gens):
            self.procs.recorded_at = 0.0  # look again now: the generation may be empty

    def _relisten_if_shut(self) -> None:
        # shutdown(2) on a listening socket acts on the socket, not the fd: a generation that
        # calls it stops the port for everyone. It stays bound, so listen() again restores it.
        for s in self.sockets:
            if s.type != socket.SOCK_STREAM:
                continue  # a UDP socket never listens (listen() is EOPNOTSUPP)
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self.log(f"listening socket {s.getsockname()} was shut down by a generation; listening again")
                s.listen(socket.SOMAXCONN if self.cfg.backlog is None else self.cfg.backlog)

    # -- control socket -------------------------------------------------------------------------

    def _on_control(self) -> None:
        assert self.control is not None
        control = self.control
        try:
            # One reserved fd may answer a client; the rest stays for starting a generation.
            req = self.reserve.retry(control.accept, self.log, "accept a control client", 1, SPAWN_NEEDS)
        except OSError as exc:
            if exc.errno not in (*SHORTAGE, errno.ENOBUFS, errno.ENOMEM):
                raise
            # Out of descriptors: the pending connection stays in the backlog and select() would
            # report it again at once. Stop watching the socket for a while instead of spinning.
            if not self.io.emfile_logged:
                self.log(
                    f"control socket: accept() failed ({exc.strerror}); pausing it for {ACCEPT_BACKOFF:g}s"
                )
                self.io.emfile_logged = True
            self.sel.unregister(self.control)
            self.io.control_resume = time.monotonic() + ACCEPT_BACKOFF
            return
        if req is None:
            return
        self.io.emfile_logged = False  # accept() works again: log the next shortage once more
        if req.uid not in (0, os.getuid()):
            req.reply("failed: permission denied")
            return
        if len(self.io.requests) >= CONTROL_MAX:
            req.reply("failed: busy")
            return
        req.since = time.monotonic()
        self.io.requests.append(req)
        self.sel.register(req.conn, selectors.EVENT_READ, lambda: self._on_request(req))

    def _drop_request(self, req: Request) -> None:
        self.sel.unregister(req.conn)
        self.io.requests.remove(req)
        req.conn.close()

    def _on_request(self, req: Request) -> None:
        if not read_request(req):
            return
        self.sel.unregister(req.conn)
        self.io.requests.remove(req)
        if req.command == "reload":
            self.log("reload requested on the control socket")
            self.io.next_waiter += 1
            self.io.waiters[self.io.next_waiter] = req
            self.feed(m.Reload(self.io.next_waiter, time.monotonic()))
        elif req.command == "status":
            req.reply(f"ok: {self._status()}")
        else:
            req.reply(f"failed: unknown command {visible(req.command or '')!r} (reload, status)")

    def _status(self) -> str:
        def name(n: int) -> str:
            pid = self.procs.leaders.get(n)
            return f"generation {n}" + (f" (pid {pid})" if pid else "")

        return m.describe(self.state, name)


@dataclass(slots=True)
class _Tee:
    number: int  # the generation whose stderr this pipe carries
    tail: bytes = b""  # the last bytes read: a marker may straddle two reads


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # EPIPE/EIO/ENOSPC: drop it, as stderr_log does
        while data:
            data = data[os.write(fd, data) :]


@dataclass(slots=True)
class _IoState:
    """What the event loop itself needs between wake-ups."""

    signals: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)  # control clients still sending their line
    waiters: dict[int, Request] = field(default_factory=dict)  # reload requests awaiting the outcome
    next_waiter: int = 0
    next_scan: float = 0.0
    control_resume: float | None = None
    emfile_logged: bool = False
    ignored: set[int] = field(default_factory=set)
    outsiders: set[tuple[int, int]] = field(default_factory=set)  # (generation, pid) not in its tree
    ignored_count: int = 0
    fd_senders: set[int] = field(default_factory=set)  # foreign pids that passed fds (logged once)
    notify_paused: bool = False  # too many passed fds waiting to be closed: not reading


def write_pid_file(path: str) -> None:
    """Write our pid to PATH atomically, without following anything another user planted.

    The temporary file is created in PATH's directory with O_CREAT|O_EXCL|O_NOFOLLOW under an
    unguessable name (a planted symlink or file makes the open fail, never redirects it) and
    renamed over PATH (rename replaces a symlink at PATH, it does not follow it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not base:
        raise UsageError(f"--pid-file {path!r}: not a file name")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, flags, 0o644)
    except OSError as exc:
        raise UsageError(f"--pid-file {path}: cannot create a file in {directory}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # whatever the umask: `rebind reload --pid-file` may run as another user
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(tmp, path)  # atomic: `rebind reload --pid-file` never reads half a pid
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsageError(f"--pid-file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def remove_pid_file(path: str) -> None:
    """Remove PATH if it still names us (another supervisor may have taken it over)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        content = os.read(fd, 32)
    except OSError:
        content = b""
    finally:
        os.close(fd)
    if content.strip() == str(os.getpid()).encode():
        with contextlib.suppress(OSError):
            os.unlink(path)


def stderr_log(message: str) -> None:
    """One line on stderr. Logging never stops the supervisor (issue 8, item 5): a closed reader
    (EPIPE: `| head`, a restarted log shipper), EIO (terminal gone) or ENOSPC drop the line.
    SIGPIPE stays ignored (Python's default), so EPIPE is an error here, not a death."""
    data = f"rebind run: {visible(message)}\n".encode("utf-8", "backslashreplace")
    with contextlib.suppress(OSError):
        while data:
            written = os.write(2, data)
            data = data[written:]


def seal_inherited_fds(keep: Sequence[int] = ()) -> None:
    """Mark every fd >= 3 we inherited close-on-exec: generations get the sockets and nothing else."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= 3 and fd not in keep:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def supervise(
    config: RunConfig,
    log: Callable[[str], None] | None = None,
    on_reload: Callable[[m.ReloadDone], None] | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> int:
    """Bind, run generations until told to stop; returns the exit status to use.

    Everything that can be refused is checked before anything is bound: the command, the pid file.
    """
    seal_inherited_fds()
    resolve_command(config.argv, os.environ)  # fail on a missing CMD before binding anything
    if config.pid_file:
        write_pid_file(config.pid_file)
    outer = OuterNotifier.from_env(dict(os.environ))
    try:
        # Socket activation or our own sockets back from systemd's fd store (a restart of rebind).
        passed = passed_fds(os.environ, os.getpid())
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        adopted = adopt(config.listen, passed, config.backlog, log or stderr_log) if passed else {}
        sockets = bind_all(config.listen, config.reuseport, config.backlog, adopted)
        try:
            become_subreaper()
            for spec, s in zip(config.listen, sockets, strict=True):
                (log or stderr_log)(f"listening on {spec} (fd {s.fileno()})")
            return Supervisor(config, sockets, log, outer, on_reload, on_serving).run()
        finally:
            for s in sockets:
                s.close()
    finally:
        if outer is not None:
            outer.close()
        if config.pid_file:
            remove_pid_file(config.pid_file)
