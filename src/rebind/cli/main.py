"""`rebind` entry point: a click group whose subcommands are imported only when used.

Start-up cost matters (`rebind --version` < 80 ms), so this module imports click and nothing
heavy; each command lives in its own module under rebind.cli and pulls in what it needs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

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

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `rebind 8080` is shorthand for `rebind why 8080`.
        if args and args[0].isdigit():
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


def _fail(message: str, code: int) -> None:
    click.echo(f"rebind: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    from rebind.errors import ExitCode, RebindError

    try:
        rv: Any = cli.main(args=argv, prog_name="rebind", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see 'rebind {exc.ctx.info_name if exc.ctx and exc.ctx.parent else ''} --help')"
        hint = hint.replace("rebind  --help", "rebind --help")
        _fail(f"error: {exc.format_message()}{hint}", ExitCode.USAGE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(f"error: {exc.format_message()}", exc.exit_code)
    except RebindError as exc:
        _fail(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)
