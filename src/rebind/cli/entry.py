"""Console entry point. For `rebind ls PORT…` and `rebind [why] PORT` it starts the kernel dump
before importing the CLI (see rebind.kernel.prefetch), for a plain `rebind why --connect
ADDR:PORT` its walk of the table (rebind.kernel.connect_prefetch), then hands over to click.

Everything here runs before the CLI's own error handling exists, so it must not fail: ^C while
importing exits 130 with one line, and closed standard fds are reopened on /dev/null first.
"""

from __future__ import annotations

import os
import signal
import sys

_PLAIN_LS_FLAGS = frozenset({"--no-owners", "--json"})
# `why` options that do not change which sockets are read (--addr only filters afterwards).
_PLAIN_WHY_FLAGS = frozenset({"--json", "--reuseaddr", "--reuseport", "--v6only"})


def _is_port(text: str) -> bool:
    # ASCII digits only: str.isdigit() accepts '²', which int() then rejects with a traceback.
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _ls_ports(argv: list[str]) -> tuple[int, ...]:
    """Ports of a plain `ls PORT… [--no-owners] [--json]`; () for anything else."""
    if len(argv) < 2 or argv[0] != "ls":
        return ()
    rest = argv[1:]
    if not all(_is_port(a) or a in _PLAIN_LS_FLAGS for a in rest):
        return ()
    return tuple(int(a) for a in rest if a not in _PLAIN_LS_FLAGS)


def _why_port(argv: list[str]) -> tuple[int, bool] | None:
    """(port, udp) of a plain `why PORT [flags]` or `PORT [flags]`; None for anything else."""
    if argv and argv[0] == "why":
        argv = argv[1:]
    if not argv or not _is_port(argv[0]):
        return None
    flags = argv[1:]
    if not all(f in _PLAIN_WHY_FLAGS or f == "--udp" for f in flags):
        return None
    return int(argv[0]), "--udp" in flags


def _reopen_closed_std_fds() -> bool:
    """Put /dev/null on fds 0-2 that are closed; True if stdout was.

    `rebind ls >&-` leaves fd 1 free, and the next open() (a netlink socket, a lease file) would
    get it: output meant for the terminal would then be written into that file or socket.
    """
    stdout_closed = False
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # lowest free fd: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            stdout_closed = stdout_closed or fd == 1
    return stdout_closed


def _interrupted() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second ^C must not interrupt the exit
    try:
        sys.stderr.write("rebind: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    os._exit(130)  # nothing to flush yet; skips atexit work a half-done import may have queued


def main() -> None:
    # ^C while importing: exit from the handler itself. A KeyboardInterrupt raised there can land
    # inside importlib's module-lock weakref callback, where Python prints it as "Exception
    # ignored in ... Traceback" instead of propagating it to the except clause below.
    signal.signal(signal.SIGINT, lambda _sig, _frame: _interrupted())
    try:
        stdout_closed = _reopen_closed_std_fds()
        argv = sys.argv[1:]
        ports = _ls_ports(argv)
        why = _why_port(argv)
        if ports or why:
            from rebind.kernel import prefetch

            if ports:
                prefetch.start(ports)
            elif why:
                prefetch.start((why[0],), "udp" if why[1] else "tcp")
        elif argv[:1] == ["why"] and any(a.partition("=")[0] == "--connect" for a in argv):
            import gc

            from rebind.kernel import connect_prefetch

            # A one-shot command that builds its tables without cycles: no cyclic collection
            # while ~150 modules import and the range's ~14k ports are accounted for (~5-10 ms
            # of CPU, docs/benchmarks.md 2026-12-06; the gatherer pauses it anyway, gc_paused).
            gc.disable()
            connect_prefetch.start(argv)
        from rebind.cli.main import main as cli_main
    except KeyboardInterrupt:  # ^C before the handler above was installed
        _interrupted()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the commands handle ^C themselves
    cli_main(stdout_closed=stdout_closed)
