"""`rebind run` (socket-holding supervisor) and `rebind reload` (ask it for a new generation)."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

import click

from rebind.cli.params import SecondsType

if TYPE_CHECKING:
    from rebind.supervisor.machine import ReloadDone
    from rebind.supervisor.run import RunConfig

CONTROL_ENV = "REBIND_CONTROL"


def _backlog(_ctx: click.Context, _param: click.Parameter, value: Any) -> int | None:
    if value is None:
        return None
    from rebind.errors import UsageError
    from rebind.supervisor.run import MAX_BACKLOG

    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_BACKLOG:
        raise UsageError(f"--backlog {value!r} is not a number 1-{MAX_BACKLOG}")
    return int(text)


@click.command(
    context_settings={"allow_interspersed_args": False},
    epilog="""\b
Examples:
  rebind run --listen 8080 -- python app.py           app calls rebind.listen("", 8080)
  rebind run --listen 127.0.0.1:8000 -- uvicorn app:app --fd 3
  rebind run --listen 8000 --control /run/app.sock -- gunicorn app:wsgi
  rebind reload --control /run/app.sock               new generation, old one kept if it fails
  kill -HUP $(cat app.pid)                            same, with --pid-file app.pid

\b
The sockets are passed as fds 3, 4, ... with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES
(systemd socket activation); NOTIFY_SOCKET receives READY=1 (sd_notify). Under systemd
(Type=notify-reload) rebind sends READY=1, RELOADING=1 and its sockets to the fd store.
Exit status: the app's; 1 when a port cannot be bound or the first generation never becomes
ready (the app's own status if it exited non-zero); 2 on bad input (checked before binding).
""",
)
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="[udp:][HOST:]PORT[/NAME]",
    help="Bind this TCP (or udp:) address once and pass it on (repeatable). No HOST: every address, "
    "dual-stack. Sockets passed to rebind itself (LISTEN_FDS: socket activation, systemd's fd store) "
    "are used instead when one matches by NAME or address.",
)
@click.option(
    "--ready",
    type=click.Choice(["auto", "notify", "accept", "none"]),
    default="auto",
    show_default=True,
    help="How a generation proves it serves: a process of it waits on (or answers a connection from) "
    "every socket, seen in /proc (auto: READY=1 only makes rebind look at once; accept: ignores "
    "READY=1), READY=1 on NOTIFY_SOCKET alone (notify), or nothing.",
)
@click.option("--ready-timeout", type=SecondsType(0.1), default="30", show_default=True, metavar="SECONDS")
@click.option(
    "--grace",
    type=SecondsType(0),
    default="10",
    show_default=True,
    metavar="SECONDS",
    help="SIGTERM to SIGKILL.",
)
@click.option(
    "--restart", type=click.Choice(["on-failure", "always", "no"]), default="on-failure", show_default=True
)
@click.option(
    "--stop-signal",
    default="TERM",
    show_default=True,
    metavar="SIG",
    help="Signal that tells a replaced generation to stop (e.g. QUIT for nginx, WINCH for httpd).",
)
@click.option(
    "--drain",
    type=SecondsType(0),
    default="0",
    show_default=True,
    metavar="SECONDS",
    help="A replaced generation gets the stop signal, then this long to finish before SIGTERM "
    "to all of it (then --grace, SIGKILL).",
)
@click.option("--backoff-max", type=SecondsType(0), default="10", show_default=True, metavar="SECONDS")
@click.option(
    "--control",
    envvar=CONTROL_ENV,
    metavar="PATH",
    help=f"Unix socket for `rebind reload` (env {CONTROL_ENV}).",
)
@click.option("--pid-file", metavar="PATH", help="Write the supervisor's pid here (for kill -HUP).")
@click.option(
    "--metrics",
    metavar="ADDR:PORT",
    help="Serve rebind_run_* Prometheus metrics here (reloads by result, reload seconds, the serving "
    "generation; needs the `exporter` extra). Default address 127.0.0.1.",
)
@click.option(
    "--reuseport", "--reuse-port", "reuseport", is_flag=True, help="Set SO_REUSEPORT on the sockets."
)
@click.option("--backlog", callback=_backlog, default=None, metavar="N", help="listen() backlog [SOMAXCONN].")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARG]...")
def run(
    listen: tuple[str, ...],
    ready: str,
    ready_timeout: float,
    grace: float,
    restart: str,
    stop_signal: str,
    drain: float,
    backoff_max: float,
    control: str | None,
    pid_file: str | None,
    metrics: str | None,
    reuseport: bool,
    backlog: int | None,
    cmd: tuple[str, ...],
) -> int:
    """Hold listening sockets and run CMD with them; reload on SIGHUP without refusing a connection.

    rebind binds every --listen address once and keeps it open for its whole life, so the port
    is never free for a restart to race for: "Address already in use" cannot happen. Each
    generation of CMD gets the sockets; a reload starts a new one, waits until it serves, then
    stops the old one (SIGTERM, --grace, SIGKILL). If the new one fails, the old one keeps serving.
    A crashed CMD is restarted with exponential backoff. SIGTERM/SIGINT are forwarded and rebind
    exits with CMD's status (0 if CMD dies of the forwarded signal).
    """
    from rebind.errors import UsageError
    from rebind.supervisor.run import ReadyMode, Restart, RunConfig, parse_signal, supervise
    from rebind.supervisor.spec import check_unique, parse_listen

    if not listen:
        raise UsageError("give at least one --listen [HOST:]PORT")
    specs = tuple(parse_listen(text, i) for i, text in enumerate(listen))
    check_unique(specs)
    config = RunConfig(
        argv=cmd,
        listen=specs,
        ready=ReadyMode(ready),
        ready_timeout=ready_timeout,
        grace=grace,
        restart=Restart(restart),
        backoff_max=backoff_max,
        control=os.path.abspath(control) if control else None,
        pid_file=pid_file,
        reuseport=reuseport,
        backlog=backlog,
        stop_signal=parse_signal(stop_signal),
        drain=drain,
    )
    if metrics is None:
        return supervise(config)
    return _supervise_with_metrics(config, metrics)


def _supervise_with_metrics(config: RunConfig, addr: str) -> int:
    """`--metrics`: the exporter's RunMetrics, fed by the supervisor's reload outcomes. The address
    is checked and bound before anything else starts (a busy port is one line, exit 3)."""
    from rebind.errors import EnvironmentProblem
    from rebind.supervisor.run import supervise

    try:
        from rebind.exporter.run_metrics import ReloadResult, RunMetrics
    except ImportError as exc:  # prometheus-client is the `exporter` extra
        raise EnvironmentProblem(
            f"--metrics needs prometheus-client (pip install 'rebind[exporter]'): {exc}"
        ) from None
    metrics = RunMetrics()
    try:
        metrics.serve(addr)
    except OSError as exc:
        raise EnvironmentProblem(f"--metrics {addr}: {exc.strerror or exc}") from exc

    def on_reload(done: ReloadDone) -> None:
        metrics.reload_finished(ReloadResult.OK if done.ok else _failure(done.detail), done.seconds)

    try:
        return supervise(config, on_reload=on_reload, on_serving=metrics.generation)
    finally:
        metrics.close()


def _failure(detail: str) -> str:
    """The reloads_total{result} label of a failed reload, from the machine's reason
    (supervisor/machine.py: "did not start", "exited ... before it was ready", "not ready")."""
    if "did not start" in detail:
        return "failed_to_start"
    if "before it was ready" in detail:
        return "exited_before_ready"
    return "not_ready_in_time"


@click.command(
    epilog="""\b
Examples:
  rebind reload --control /run/app.sock     waits for the outcome: exit 0 ready, 1 kept the old one
  rebind reload --pid-file app.pid          sends SIGHUP; the outcome is in rebind run's log
"""
)
@click.option("--control", envvar=CONTROL_ENV, metavar="PATH", help=f"Control socket (env {CONTROL_ENV}).")
@click.option("--pid-file", metavar="PATH", help="Send SIGHUP to the pid written by `rebind run --pid-file`.")
@click.option("--timeout", type=SecondsType(0.1), default="120", show_default=True, metavar="SECONDS")
@click.option("--status", "status", is_flag=True, help="Only print which generations run.")
def reload(control: str | None, pid_file: str | None, timeout: float, status: bool) -> int:
    """Ask a running `rebind run` to start a new generation and report whether it took over."""
    from rebind.errors import UsageError

    if control:
        from rebind.supervisor.client import ask

        # The server end is checked first (SO_PEERCRED: root or us; the file and its directory
        # not another user's): a planted socket is refused with exit 5, nothing sent to it.
        answer = ask(control, "status" if status else "reload", timeout)
        ok = answer.startswith("ok")
        click.echo(answer or "failed: no answer (supervisor exited?)", err=not ok)
        return 0 if ok else 1
    if pid_file:
        if status:
            raise UsageError("--status needs --control")
        from rebind.supervisor.client import supervisor_pid

        pid = supervisor_pid(pid_file)  # only a `rebind run` is signalled (a pid file can be stale)
        os.kill(pid, signal.SIGHUP)
        click.echo(f"sent SIGHUP to rebind run (pid {pid}); the outcome is in its log")
        return 0
    raise UsageError(f"give --control PATH (or set {CONTROL_ENV}) or --pid-file PATH")
