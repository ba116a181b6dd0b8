"""`rebind run`: hold the listening sockets for good and run generations of the app on them.

The socket is bound once, by us, and never closed while we live, so there is no moment in which
the port is unbound: connections that arrive while no generation accepts wait in the socket's
accept queue (they belong to the socket, not to a process) and the next generation takes them.
A reload starts generation N+1 on the same sockets, waits until it *serves* (READY=1 from its
process tree, or one of its processes waiting on the socket, see procscan), and only then asks
generation N to stop (SIGTERM, --grace, SIGKILL to its process group).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rebind.errors import ExitCode, Fault, RebindError
from rebind.supervisor import procscan
from rebind.supervisor.control import ControlServer, Request, read_request
from rebind.supervisor.listen import bind_listener
from rebind.supervisor.notify import NotifyReceiver
from rebind.supervisor.spawn import RESET_SIGNALS, become_subreaper, resolve_command, spawn
from rebind.supervisor.spec import ListenSpec

FORWARD = (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP = (signal.SIGTERM, signal.SIGINT)
STABLE_AFTER = 10.0  # a generation up this long resets the crash backoff
_ENV_DROP = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


class ReadyMode(enum.Enum):
    AUTO = "auto"  # whichever comes first: READY=1 or serving seen in /proc
    NOTIFY = "notify"  # only READY=1 on NOTIFY_SOCKET
    ACCEPT = "accept"  # only /proc: a process of the generation waits on every socket
    NONE = "none"  # ready as soon as exec succeeded


class Restart(enum.Enum):
    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    NO = "no"


class GenState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


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
    restart: Restart = Restart.ON_FAILURE
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    control: str | None = None
    pid_file: str | None = None
    reuse_port: bool = False
    backlog: int | None = None


@dataclass(slots=True)
class Generation:
    number: int
    pid: int
    started: float
    state: GenState = GenState.STARTING
    ready_at: float | None = None
    deadline: float | None = None  # ready deadline while STARTING, SIGKILL time while STOPPING
    waiters: list[Request] = field(default_factory=list)

    def __str__(self) -> str:
        return f"generation {self.number} (pid {self.pid})"


def exit_code(status: int) -> int:
    """Shell convention: a child killed by signal N is reported as 128+N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def bind_all(specs: Sequence[ListenSpec], reuse_port: bool, backlog: int | None) -> list[socket.socket]:
    """Bind every spec; on failure close what was bound and explain in one line."""
    bound: list[socket.socket] = []
    try:
        for spec in specs:
            bound.append(_bind_one(spec, reuse_port, backlog))
    except BaseException:
        for s in bound:
            s.close()
        raise
    return _park_high(bound)


def _bind_one(spec: ListenSpec, reuse_port: bool, backlog: int | None) -> socket.socket:
    try:
        return bind_listener(spec.host, spec.port, reuse_port=reuse_port, backlog=backlog)
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
        out.append(socket.socket(fileno=fd))
        s.close()
    return out


class Supervisor:
    def __init__(
        self,
        config: RunConfig,
        sockets: Sequence[socket.socket],
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = config
        self.sockets = list(sockets)
        self.inodes = frozenset(os.fstat(s.fileno()).st_ino for s in self.sockets)
        self.log = log or _stderr_log
        self.exe = resolve_command(config.argv, os.environ)
        self.gens: dict[int, Generation] = {}
        self.current: Generation | None = None
        self.pending: Generation | None = None
        self.queued: list[Request] | None = None  # a reload asked for while one is in progress
        self.number = 0
        self.ever_ready = False
        self.crashes = 0
        self.restart_at: float | None = None
        self.next_scan = 0.0
        self.stopping_all = False
        self.final: int | None = None
        self.final_from: Generation | None = None  # whose exit status becomes ours on shutdown
        self.signals: list[int] = []
        self.sel = selectors.DefaultSelector()
        self.notify: NotifyReceiver | None = None
        self.control: ControlServer | None = None
        self.requests: list[Request] = []
        self.wake_r, self.wake_w = socket.socketpair()

    # -- set-up and tear-down -------------------------------------------------------------------

    def run(self) -> int:
        old_handlers = self._install()
        try:
            self._start("start")
            while not self._done():
                self._step()
            return self.final if self.final is not None else 0
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
        if self.cfg.pid_file:
            _write_pid_file(self.cfg.pid_file)
        old: dict[int, object] = {}
        for sig in (signal.SIGHUP, signal.SIGCHLD, *STOP, *FORWARD):
            old[sig] = signal.signal(sig, self._on_signal)
        # The C handler writes here, so a select() retried after EINTR (PEP 475) still wakes.
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        return old

    def _teardown(self, old_handlers: dict[int, object]) -> None:
        for gen in list(self.gens.values()):  # only when run() is unwinding on an error
            with contextlib.suppress(ProcessLookupError):
                os.killpg(gen.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(gen.pid, 0)
        self._reap_orphans()
        signal.set_wakeup_fd(-1)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        for req in self.requests:
            req.conn.close()
        for closable in (self.notify, self.control):
            if closable is not None:
                closable.close()
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()
        if self.cfg.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.pid_file)

    def _reap_orphans(self) -> None:
        """Kill and reap processes that re-parented to us (we are a child subreaper)."""
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and procscan.read_ppid(int(entry.name)) == me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry.name), 0)

    # -- the loop -------------------------------------------------------------------------------

    def _done(self) -> bool:
        return self.stopping_all and not self.gens

    def _step(self) -> None:
        for key, _ in self.sel.select(self._timeout()):
            key.data()
        signals, self.signals = self.signals, []
        for sig in signals:
            self._handle_signal(sig)
        self._reap()
        now = time.monotonic()
        self._timers(now)
        if self.pending and self.cfg.ready in (ReadyMode.AUTO, ReadyMode.ACCEPT) and now >= self.next_scan:
            self._scan(self.pending, now)

    def _timeout(self) -> float | None:
        times = [g.deadline for g in self.gens.values() if g.deadline is not None]
        if self.restart_at is not None:
            times.append(self.restart_at)
        if self.pending and self.cfg.ready in (ReadyMode.AUTO, ReadyMode.ACCEPT):
            times.append(self.next_scan)
        if self.signals:
            return 0
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(512):
                pass

    def _handle_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self.log("SIGHUP: reload")
            self._reload(None)
        elif sig in STOP:
            self._shutdown(sig)
        elif sig in FORWARD:
            target = self.current or self.pending
            if target:
                self._kill(target.pid, sig)

    # -- generations ------------------------------------------------------------------------------

    def _env(self, number: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
        env["LISTEN_FDS"] = str(len(self.sockets))
        env["LISTEN_FDNAMES"] = ":".join(s.name for s in self.cfg.listen)
        env["REBIND_GENERATION"] = str(number)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.address
        return env

    def _start(self, why: str, waiters: list[Request] | None = None) -> None:
        self.restart_at = None
        self.number += 1
        reset = (*RESET_SIGNALS, signal.SIGHUP, signal.SIGCHLD, *STOP, *FORWARD)
        fds = [s.fileno() for s in self.sockets]
        try:
            pid = spawn(self.exe, self.cfg.argv, self._env(self.number), fds, reset)
        except RebindError as exc:
            if not self.ever_ready and self.number == 1:
                raise
            self.log(f"generation {self.number} did not start: {exc}")
            self._failed(waiters or [], f"generation {self.number} did not start: {exc}")
            return
        now = time.monotonic()
        gen = Generation(self.number, pid, now, deadline=now + self.cfg.ready_timeout)
        gen.waiters = waiters or []
        self.gens[pid] = gen
        self.pending = gen
        self.next_scan = now
        self.log(f"{gen} started ({why})")
        if self.cfg.ready is ReadyMode.NONE:
            self._ready(gen, "exec succeeded (--ready none)")

    def _scan(self, gen: Generation, now: float) -> None:
        # Fast polling at first (most apps are ready within a second), then gentler.
        self.next_scan = now + (0.01 if now - gen.started < 2.0 else 0.1)
        found = procscan.serving(gen.pid, self.inodes)
        if len(found) == len(self.inodes):
            self._ready(gen, "; ".join(sorted({str(s) for s in found.values()})))

    def _on_notify(self) -> None:
        assert self.notify is not None
        for msg in self.notify.receive():
            if msg.get("READY") != "1":
                continue
            gen = self.pending
            # The kernel-attested sender pid must belong to the *new* generation's tree: a
            # READY=1 from the old generation (or anyone else in the netns) proves nothing.
            if gen is not None and msg.pid > 0 and procscan.in_tree(msg.pid, gen.pid):
                self._ready(gen, f"READY=1 from pid {msg.pid}")
            elif not (self.current and msg.pid and procscan.in_tree(msg.pid, self.current.pid)):
                self.log(f"ignoring READY=1 from pid {msg.pid}: not in a starting generation's tree")

    def _ready(self, gen: Generation, how: str) -> None:
        now = time.monotonic()
        gen.state, gen.ready_at, gen.deadline = GenState.READY, now, None
        self.pending, old, self.current = None, self.current, gen
        self.ever_ready = True
        took = f"{now - gen.started:.3f}s"
        self.log(f"{gen} ready after {took}: {how}")
        if old is not None:
            self._stop(old, f"replaced by generation {gen.number}")
        _reply(gen.waiters, f"ok: {gen} ready after {took} ({how})")
        gen.waiters = []
        if self.stopping_all:
            self._stop(gen, "shutting down")
        elif self.queued is not None:
            waiters, self.queued = self.queued, None
            self._start("queued reload", waiters)

    def _stop(self, gen: Generation, why: str, sig: int = signal.SIGTERM) -> None:
        if gen.state is GenState.STOPPING:
            return
        gen.state = GenState.STOPPING
        gen.deadline = time.monotonic() + self.cfg.grace
        if self.current is gen:
            self.current = None
        if self.pending is gen:
            self.pending = None
        self.log(f"{gen} stopping ({why}): {signal.Signals(sig).name}, SIGKILL after {self.cfg.grace:g}s")
        _reply(gen.waiters, f"failed: {gen} was stopped before it was ready ({why})")
        gen.waiters = []
        self._kill(gen.pid, sig)

    def _kill(self, pid: int, sig: int) -> None:
        # Safe by pid: a generation is our unreaped child, so its pid cannot be recycled yet.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _failed(self, waiters: list[Request], reason: str) -> None:
        if self.current is not None:
            reason += f"; still serving: {self.current}"
        _reply(waiters, f"failed: {reason}")
        if self.queued is not None and not self.stopping_all:
            waiters, self.queued = self.queued, None
            self._start("queued reload", waiters)
        elif self.current is None and not self.stopping_all and self.pending is None:
            self._schedule_restart(None)

    def _reload(self, req: Request | None) -> None:
        waiters = [req] if req else []
        if self.stopping_all:
            _reply(waiters, "failed: shutting down")
        elif self.pending is not None:
            # Code may have changed after the pending generation loaded it: run one more.
            self.queued = (self.queued or []) + waiters
            self.log(f"reload queued behind {self.pending}")
        else:
            self._start("reload", waiters)

    def _shutdown(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping_all:
            self.log(f"{name} again: SIGKILL to every generation")
            for gen in self.gens.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gen.pid, signal.SIGKILL)
            return
        self.log(f"{name}: stopping")
        target = self.current or self.pending
        self._finish(None if target else 128 + sig)
        self.final_from = target
        for gen in list(self.gens.values()):
            if gen.state is not GenState.STOPPING:
                self._stop(gen, f"{name} forwarded", sig)

    def _finish(self, status: int | None) -> None:
        self.stopping_all = True
        self.restart_at = None
        self.final = status
        _reply(self.queued or [], "failed: shutting down")
        self.queued = None

    def _timers(self, now: float) -> None:
        for gen in list(self.gens.values()):
            if gen.deadline is None or now < gen.deadline:
                continue
            if gen.state is GenState.STARTING:
                reason = f"{gen} did not become ready within {self.cfg.ready_timeout:g}s"
                self.log(reason)
                waiters, gen.waiters = gen.waiters, []
                self._stop(gen, "not ready in time")
                if not self.ever_ready:
                    self._finish(int(ExitCode.NO_MATCH))
                self._failed(waiters, reason)
            elif gen.state is GenState.STOPPING:
                self.log(f"{gen} still running after {self.cfg.grace:g}s: SIGKILL to its process group")
                gen.deadline = None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gen.pid, signal.SIGKILL)
        if self.restart_at is not None and now >= self.restart_at:
            self._start("restart after crash", self.queued or [])
            self.queued = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            gen = self.gens.pop(pid, None)
            if gen is not None:
                self._exited(gen, exit_code(status))

    def _exited(self, gen: Generation, code: int) -> None:
        self._relisten_if_shut()
        was = gen.state
        if self.stopping_all and self.final_from is gen:
            self.final = code
        if gen is self.pending:
            self.pending = None
            reason = f"{gen} exited with status {code} before it was ready"
            self.log(reason)
            if not self.ever_ready and not self.stopping_all:
                self._finish(code)
            waiters, gen.waiters = gen.waiters, []
            self._failed(waiters, reason)
        elif gen is self.current:
            self.current = None
            self.log(f"{gen} exited with status {code} while serving")
            if self.stopping_all:
                return
            if self.cfg.restart is Restart.NO or (self.cfg.restart is Restart.ON_FAILURE and code == 0):
                self._finish(code)
                if self.pending:
                    self._stop(self.pending, "supervisor exiting")
            elif self.pending is None:
                self._schedule_restart(gen)
        else:
            self.log(f"{gen} exited with status {code} ({was.value})")

    def _schedule_restart(self, crashed: Generation | None) -> None:
        now = time.monotonic()
        if crashed is not None and crashed.ready_at is not None and now - crashed.ready_at >= STABLE_AFTER:
            self.crashes = 0
        delay = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2**self.crashes)
        self.crashes += 1
        self.restart_at = now + delay
        self.log(f"restarting in {delay:.2f}s (failure {self.crashes} in a row)")

    def _relisten_if_shut(self) -> None:
        # shutdown(2) on a listening socket acts on the socket, not the fd: a generation that
        # calls it stops the port for everyone. It stays bound, so listen() again restores it.
        for s in self.sockets:
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self.log(f"listening socket {s.getsockname()} was shut down by a generation; listening again")
                s.listen(socket.SOMAXCONN if self.cfg.backlog is None else self.cfg.backlog)

    # -- control socket -------------------------------------------------------------------------

    def _on_control(self) -> None:
        assert self.control is not None
        req = self.control.accept()
        if req is None:
            return
        if req.uid not in (0, os.getuid()):
            req.reply("failed: permission denied")
            return
        self.requests.append(req)
        self.sel.register(req.conn, selectors.EVENT_READ, lambda: self._on_request(req))

    def _on_request(self, req: Request) -> None:
        if not read_request(req):
            return
        self.sel.unregister(req.conn)
        self.requests.remove(req)
        if req.command == "reload":
            self.log("reload requested on the control socket")
            self._reload(req)
        elif req.command == "status":
            req.reply(f"ok: {self._status()}")
        else:
            req.reply(f"failed: unknown command {req.command!r} (reload, status)")

    def _status(self) -> str:
        parts = [f"serving: {self.current or 'none'}"]
        if self.pending:
            parts.append(f"starting: {self.pending}")
        stopping = [str(g) for g in self.gens.values() if g.state is GenState.STOPPING]
        if stopping:
            parts.append("stopping: " + ", ".join(stopping))
        return "; ".join(parts)


def _reply(waiters: list[Request], line: str) -> None:
    for req in waiters:
        req.reply(line)


def _write_pid_file(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # atomic: `rebind reload --pid-file` never reads half a pid


def _stderr_log(message: str) -> None:
    print(f"rebind run: {message}", file=sys.stderr, flush=True)


def seal_inherited_fds(keep: Sequence[int] = ()) -> None:
    """Mark every fd >= 3 we inherited close-on-exec: generations get the sockets and nothing else."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= 3 and fd not in keep:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def supervise(config: RunConfig, log: Callable[[str], None] | None = None) -> int:
    """Bind, run generations until told to stop; returns the exit status to use."""
    seal_inherited_fds()
    resolve_command(config.argv, os.environ)  # fail on a missing CMD before binding anything
    sockets = bind_all(config.listen, config.reuse_port, config.backlog)
    try:
        become_subreaper()
        for spec, s in zip(config.listen, sockets, strict=True):
            (log or _stderr_log)(f"listening on {spec} (fd {s.fileno()})")
        return Supervisor(config, sockets, log).run()
    finally:
        for s in sockets:
            s.close()
