"""`rebind run`: hold the listening sockets for good and run generations of the app on them.

The socket is bound once, by us, and never closed while we live, so there is no moment in which
the port is unbound: connections that arrive while no generation accepts wait in the socket's
accept queue (they belong to the socket, not to a process) and the next generation takes them.
A reload starts generation N+1 on the same sockets, waits until it *serves* (READY=1 from its
process tree, or one of its processes waiting on the socket, see procscan), and only then asks
generation N to stop (SIGTERM, --grace, SIGKILL to every process of it).

Every decision is made by the pure state machine in ``machine.py``. This module is the event
loop: selectors and signals in, machine events fed, actions carried out. Its rooms: ``config``
(RunConfig), ``hold`` (binding), ``generations`` (the processes of each generation: start,
record, signal), ``readiness`` (/proc scans and READY=1 as ``Ready`` events), ``tee`` (each
generation's stderr), ``control`` (the --control socket's clients as ``Reload`` events).
Selector callbacks return the machine events they found (or None); the loop feeds each one as
it comes, so a callback that handles several messages sees the state each event left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from rebind.errors import ExitCode, RebindError
from rebind.supervisor import machine as m
from rebind.supervisor.config import RunConfig, exit_code
from rebind.supervisor.control import ControlDesk
from rebind.supervisor.fdreserve import SPAWN_NEEDS, FdReserve
from rebind.supervisor.generations import Generations, fork_generation
from rebind.supervisor.hold import bind_all
from rebind.supervisor.inherit import adopt, passed_fds
from rebind.supervisor.notify import OuterNotifier
from rebind.supervisor.pidfile import remove_pid_file, write_pid_file
from rebind.supervisor.readiness import Readiness
from rebind.supervisor.spawn import RESET_SIGNALS, become_subreaper, resolve_command
from rebind.supervisor.tee import Tees
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

Callback = Callable[[], Iterable[m.Event] | None]  # what the selector's keys carry


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
        self.outer = outer  # systemd's NOTIFY_SOCKET (Type=notify / notify-reload, fd store)
        self.on_reload = on_reload  # the outcome of every reload (for metrics)
        self.on_serving = on_serving  # the number of the generation now serving (for metrics)
        self.log = log or stderr_log
        self.exe = resolve_command(config.argv, os.environ)
        self.gens = Generations()
        self.sel = selectors.DefaultSelector()
        # Taken last, after our own sockets: a full table must not stop a restart (issue 18 item 2).
        self.reserve = FdReserve()
        self.ready = Readiness(
            config.ready, self.sel, self.sockets, self.reserve, self.gens, self.log, lambda: self.state
        )
        self.control: ControlDesk | None = None
        self.signals: list[int] = []
        self.token = secrets.token_hex(16).encode()  # REBIND_SUPERVISOR: marks all we started
        self.wake_r, self.wake_w = socket.socketpair()
        self.tees = Tees(self.sel)

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
        self.ready.open()
        if self.cfg.control:
            self.control = ControlDesk(self.cfg.control, self.sel, self.reserve, self.log, self._status)
        self._store_fds()
        # With the sockets in systemd's fd store they are meant to outlive us: the watchdog must
        # not wait for them to vanish (nor hunt their holders, PID 1 among them).
        self.gens.watchdog = Watchdog(frozenset() if self.outer else self.ready.inodes, self.token)
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
        self.gens.kill_all()
        if self.gens.watchdog is not None:
            self.gens.watchdog.close()
        signal.set_wakeup_fd(-1)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if self.control is not None:
            self.control.close_clients()
        self.tees.close_all()
        self.ready.close()
        if self.control is not None:
            self.control.close()
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()
        self.reserve.close()

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

    def feed_all(self, events: Iterable[m.Event] | None) -> None:
        for event in events or ():
            self.feed(event)

    def _step(self) -> None:
        for key, _ in self.sel.select(self._timeout()):
            callback: Callback = key.data
            self.feed_all(callback())
        signals, self.signals = self.signals, []
        for sig in signals:
            self._handle_signal(sig)
        self._reap()
        now = time.monotonic()
        self.feed_all(m.timer_events(self.state, now))
        self._housekeeping(now)
        self.feed_all(self.ready.scan(now))

    def _timeout(self) -> float | None:
        if self.signals:
            return 0
        now = time.monotonic()
        times = [t for t in (self.state.next_deadline(),) if t is not None]
        times += self.ready.wake_at(now)
        if self.control is not None:
            times += self.control.wake_at()
        if self.state.gens:
            times.append(self.gens.next_record(self.state))
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)

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
        if self.control is not None:
            self.control.resume_if_due(now)
        self.ready.housekeeping()
        if self.control is not None:
            self.control.drop_idle(now)
        if self.reserve.short:
            self.reserve.refill()  # slots freed above (or anywhere) go to the reserve first
        if now >= self.gens.next_record(self.state):
            self.feed_all(self.gens.record(self.state.gens, now))

    def _reap(self) -> None:
        reaped_other = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            number = self.gens.reaped(pid)
            if number is None:
                reaped_other = True  # an orphan of some generation, re-parented to us
                continue
            self._relisten_if_shut()
            remaining = bool(self.gens.members(number))
            seen = self.tees.leader_exited(number)
            self.feed(m.Exited(number, exit_code(status), remaining, time.monotonic(), seen))
        if reaped_other and any(g.role is m.Role.LINGERING for g in self.state.gens):
            self.gens.recorded_at = 0.0  # look again now: the generation may be empty

    def _relisten_if_shut(self) -> None:
        # shutdown(2) on a listening socket acts on the socket, not the fd: a generation that
        # calls it stops the port for everyone. It stays bound, so listen() again restores it.
        for s in self.sockets:
            if s.type != socket.SOCK_STREAM:
                continue  # a UDP socket never listens (listen() is EOPNOTSUPP)
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self.log(f"listening socket {s.getsockname()} was shut down by a generation; listening again")
                s.listen(socket.SOMAXCONN if self.cfg.backlog is None else self.cfg.backlog)

    def _status(self) -> str:
        return self.state.describe(self.gens.name)

    # -- actions ----------------------------------------------------------------------------------

    def _do(self, action: m.Action) -> None:
        if isinstance(action, m.Log):
            self.log(action.line)
        elif isinstance(action, m.Spawn):
            self._spawn(action)
        elif isinstance(action, m.SignalLeader):
            self.gens.signal_leader(action.number, action.sig)
        elif isinstance(action, m.SignalRest):
            self.gens.signal_rest(action.number, action.sig)
        elif isinstance(action, m.Reply):
            if self.control is not None:
                self.control.reply(action.waiters, action.line)
        elif isinstance(action, m.ScanNow):
            self.ready.look_now(time.monotonic())
        elif isinstance(action, m.Forget):
            self.gens.forget(action.number)
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
        if self.ready.address is not None:
            env[b"NOTIFY_SOCKET"] = self.ready.address.encode()
        return env

    def _spawn(self, action: m.Spawn) -> None:
        n = action.number
        attempts = 0
        reset = (*RESET_SIGNALS, signal.SIGHUP, signal.SIGCHLD, *STOP, *FORWARD)
        fds = [s.fileno() for s in self.sockets]

        def fork() -> tuple[int, int]:
            nonlocal attempts
            attempts += 1
            # The stderr tee is worth the reserve, not worth not starting: after the reserve (or
            # without one) the generation runs without it.
            optional = attempts > 1 or len(self.reserve.fds) < SPAWN_NEEDS
            return fork_generation(self.exe, self.cfg.argv, self._env(n), fds, reset, optional)

        try:
            pid, r = self.reserve.retry(fork, self.log, f"start generation {n}")
        except (RebindError, OSError) as exc:
            self.feed(_spawn_failed(n, exc))
            return
        if r >= 0:
            self.tees.add(r, n)
        self.gens.started(n, pid)
        self.ready.look_now(time.monotonic())
        self.log(f"generation {n} (pid {pid}) started ({action.why})")
        self.feed(m.Spawned(n, time.monotonic()))


def _spawn_failed(n: int, exc: BaseException) -> m.SpawnFailed:
    if isinstance(exc, RebindError):
        return m.SpawnFailed(n, str(exc), exc.exit_code, time.monotonic())
    # fork() or pipe2() failed (EAGAIN, ENOMEM, EMFILE): a failed generation, try again later
    reason = f"cannot start a process: {getattr(exc, 'strerror', None) or exc}"
    return m.SpawnFailed(n, reason, int(ExitCode.ENVIRONMENT), time.monotonic())


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
