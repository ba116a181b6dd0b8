"""`rebind` entry point: a click group whose subcommands are imported only when used.

Start-up cost matters (`rebind --version` < 80 ms), so this module imports click and nothing
heavy; each command lives in its own module under rebind.cli and pulls in what it needs.
"""

from __future__ import annotations

import importlib
import io
import os
import signal
import sys
from typing import Any, NoReturn

import click

from rebind._version import __version__

# name -> (module, attribute, one-line help shown by `rebind --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "ls": ("rebind.cli.ls", "ls", "List sockets holding ports, with the processes that own them."),
    "why": ("rebind.cli.why", "why", "Explain why binding PORT fails, what would work, and when it frees."),
    "demo": ("rebind.cli.demo", "demo", "Replay the origin story: TIME_WAIT, Errno 98, and the real fixes."),
    "wait": ("rebind.cli.wait", "wait", "Wait until PORT is bindable (or, with --until-listening, served)."),
    "free": ("rebind.cli.free", "free", "Make PORT bindable again, touching only what blocks it."),
    "pick": ("rebind.cli.pick", "pick", "Print a port that is bindable now and safe from ephemeral use."),
    "run": (
        "rebind.cli.run",
        "run",
        "Hold listening sockets and run CMD with them (LISTEN_FDS); reload without refusals.",
    ),
    "reload": (
        "rebind.cli.run",
        "reload",
        "Ask a running `rebind run` supervisor to start a new generation.",
    ),
    "top": ("rebind.cli.top", "top", "Watch ports live: states, countdowns, queues, owners; one key acts."),
    "trace": (
        "rebind.cli.trace",
        "trace",
        "Record failing bind/listen/connect calls with the blocker seen then.",
    ),
    "history": (
        "rebind.cli.history",
        "history",
        "Who held which port when, from a `rebind top --record` file.",
    ),
    "exporter": ("rebind.cli.exporter", "exporter", "Serve port health as Prometheus metrics."),
    "completion": (
        "rebind.cli.main",
        "completion",
        "Print the shell completion script for bash, zsh or fish.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        mod, attr, _ = spec
        cmd = getattr(importlib.import_module(mod), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, spec[2]) for name, spec in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        # click turns ^C into Abort after printing a blank line; ours is one line, exit 130.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `rebind 8080` is shorthand for `rebind why 8080`. Anything starting with a digit goes
        # there too, so `rebind 80x` or `rebind ²` is a port error, not "no such command".
        if args and args[0][:1].isdigit():
            args = ["why", *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  rebind 8080                 why can't my server bind 8080?
  rebind ls                   every listening or bound port, with owners
  rebind ls 8080 --json       who holds 8080, for scripts
  rebind demo                 the whole story in a private network namespace
""",
)
@click.version_option(__version__, "-V", "--version", prog_name="rebind", message="%(prog)s %(version)s")
def cli() -> None:
    """rebind: who holds a port, why bind() fails with EADDRINUSE, when it frees, and how to fix it."""


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    Examples:
      eval "$(rebind completion bash)"
      rebind completion fish > ~/.config/fish/completions/rebind.fish
    """
    from click.shell_completion import get_completion_class

    comp_cls = get_completion_class(shell)
    assert comp_cls is not None
    comp = comp_cls(cli, {}, "rebind", "_REBIND_COMPLETE")
    click.echo(comp.source())


# ---------------------------------------------------------------------------------------------
# The one wrapper around click: every way a command can end becomes an exit code and at most
# one line on stderr (README: 0 ok, 1 "no", 2 usage, 3 permission/feature, 4 kernel, 130 ^C).


class Interrupted(Exception):
    """^C (SIGINT) while a command ran; not a KeyboardInterrupt, so click lets it through."""


class OutputGone(Exception):
    """Writing to stdout failed for a reason other than a departed reader (ENOSPC, EIO...)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write output: {exc.strerror or exc}")


class _GuardedFd(io.BufferedIOBase):
    """fd 1 or 2 as a buffered binary stream on which output never stops the command.

    A reader that goes away (``| head``, EPIPE) is not an error: output is discarded from then on
    and the command ends with the exit code it would have had. For stdout, other write errors
    (``> /dev/full``) raise :class:`OutputGone` once, then output is discarded too, so nothing
    is left buffered for the interpreter to fail on at exit ("Exception ignored ..."). Errors on
    stderr are dropped: there is nowhere left to report them.

    Its own buffer, not io.BufferedWriter: that one keeps data whose write() raised, and ^C
    lands right after a successful os.write() (the eval breaker runs when the call returns), so
    the same line came out twice. Here the buffer is emptied before the write.
    """

    _LIMIT = 1 << 16

    def __init__(self, fd: int, *, closed_note: str | None = None) -> None:
        super().__init__()
        self._fd = fd
        self._buf = bytearray()
        self.discarding = False
        #: Said once on stderr at the first write when fd was closed at start (now /dev/null).
        self._closed_note = closed_note

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return not self.discarding and os.isatty(self._fd)

    def write(self, b: Any) -> int:
        n = len(memoryview(b))
        if self._closed_note is not None and n:
            note, self._closed_note = self._closed_note, None
            _say(note)
        if not self.discarding:
            self._buf += b
            if len(self._buf) >= self._LIMIT:
                self.flush()
        return n

    def flush(self) -> None:
        data, self._buf = bytes(self._buf), bytearray()
        view = memoryview(data)
        while view and not self.discarding:
            try:
                view = view[os.write(self._fd, view) :]
            except BrokenPipeError:
                self._discard()
            except OSError as exc:
                self._discard()
                if self._fd == 1:
                    raise OutputGone(exc) from None

    def close(self) -> None:  # flush, but never close the process's fd 1/2
        if not self.closed:
            try:
                self.flush()
            finally:
                super().close()

    def _discard(self) -> None:
        self.discarding = True
        self._buf.clear()
        # Later writes by children (pick --hold) or other fd users must not fail either.
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, self._fd)
            os.close(null)
        except OSError:
            pass


def _guarded(fd: int, old: Any, closed_note: str | None = None) -> io.TextIOWrapper:
    buffer = _GuardedFd(fd, closed_note=closed_note)
    return io.TextIOWrapper(
        buffer,  # type: ignore[arg-type]  # a BufferedIOBase, as TextIOWrapper wants
        encoding=getattr(old, "encoding", None) or "utf-8",
        # Process-supplied text is escaped before printing; this is the last line of defence
        # against a locale that cannot encode something (never a UnicodeEncodeError).
        errors="backslashreplace",
        line_buffering=buffer.isatty() or fd == 2,
        write_through=fd == 2,
    )


def guard_streams(*, stdout_closed: bool = False) -> None:
    """Replace sys.stdout / sys.stderr with guarded streams on the same fds (see _GuardedFd)."""
    note = "rebind: note: standard output is closed; output discarded" if stdout_closed else None
    sys.stderr.flush() if sys.stderr is not None else None
    sys.stderr = _guarded(2, sys.stderr)
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
    sys.stdout = _guarded(1, sys.stdout, note)


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # stderr is gone: the exit code still tells


def _usage_hint(exc: click.UsageError) -> str:
    path = exc.ctx.command_path if exc.ctx is not None else "rebind"
    return f" (see '{path or 'rebind'} --help')"


def _is_no_args_help(exc: click.UsageError) -> bool:
    # click >= 8.2 raises NoArgsIsHelpError (a UsageError whose message is the whole help).
    kind = getattr(click.exceptions, "NoArgsIsHelpError", None)
    return kind is not None and isinstance(exc, kind)


def _invoke(argv: list[str] | None) -> int:
    """Run the command; map every way it can end to (one line on stderr, exit code)."""
    from rebind.errors import ExitCode, RebindError
    from rebind.textsafe import visible

    try:
        rv: Any = cli.main(args=argv, prog_name="rebind", standalone_mode=False)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except click.UsageError as exc:
        if _is_no_args_help(exc) and exc.ctx is not None:
            click.echo(exc.ctx.get_help())  # bare `rebind`: the help, as `rebind --help`
            return 0
        _say(f"rebind: error: {visible(exc.format_message())}{_usage_hint(exc)}")
        return int(ExitCode.USAGE)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        _say("rebind: aborted")
        return 130
    except click.ClickException as exc:
        _say(f"rebind: error: {visible(exc.format_message())}")
        return int(exc.exit_code)
    except OutputGone as exc:
        _say(f"rebind: error: {exc}")
        return int(ExitCode.ENVIRONMENT)
    except RebindError as exc:
        _say(f"rebind: error: {visible(str(exc))}")
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second ^C must not interrupt the exit
        _say("rebind: interrupted")
        return 130
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        _say(f"rebind: {visible(str(exc.code))}")
        return 1
    except PermissionError as exc:
        _say(f"rebind: error: {visible(str(exc))} (run as root?)")
        return int(ExitCode.ENVIRONMENT)
    except OSError as exc:
        _say(f"rebind: error: {visible(str(exc))}")
        return int(ExitCode.ENVIRONMENT)
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("REBIND_DEBUG"):
            raise
        _say(
            f"rebind: internal error: {type(exc).__name__}: {visible(str(exc))} "
            "(please report; REBIND_DEBUG=1 shows the traceback)"
        )
        return int(ExitCode.BUG)


def _flush_stdout() -> int | None:
    """Flush what is still buffered; an exit code if that fails (ENOSPC at the very end)."""
    from rebind.errors import ExitCode

    try:
        sys.stdout.flush()
    except OutputGone as exc:
        _say(f"rebind: error: {exc}")
        return int(ExitCode.ENVIRONMENT)
    except (OSError, ValueError):
        pass
    return None


def main(argv: list[str] | None = None, *, stdout_closed: bool = False) -> NoReturn:
    """The console entry: run one command and exit with its code (see _invoke)."""
    guard_streams(stdout_closed=stdout_closed)
    try:
        code = _invoke(argv)
        failed = _flush_stdout()
    except KeyboardInterrupt:  # ^C while reporting: the answer is still "interrupted"
        code, failed = 130, None
    # Output that could not be written outranks "ok" and "no": the caller did not get the answer.
    sys.exit(failed if failed is not None and code in (0, 1) else code)
