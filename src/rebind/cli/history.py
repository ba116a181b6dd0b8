"""`rebind history FILE [PORT]`: who held which port when, from a `rebind top --record` file."""

from __future__ import annotations

import click


@click.command(
    epilog="""\b
Examples:
  rebind top 8080 --record ports.jsonl     (in another terminal, or earlier)
  rebind history ports.jsonl               every event, one line each
  rebind history ports.jsonl 8080          only port 8080

\b
Exit status: 0 events printed, 1 no event for PORT, 2 unreadable or malformed FILE.
Schema of the file: docs/top.md (rebind.top.event/1).
""",
)
@click.argument("file", metavar="FILE")
@click.argument("port", required=False, metavar="[PORT]")
def history(file: str, port: str | None) -> int:
    """Print who held which port when, one line per event, from a `rebind top --record` FILE."""
    from rebind.errors import UsageError
    from rebind.model.validate import parse_port
    from rebind.textsafe import visible
    from rebind.top.events import BadRecord, history, parse_lines

    wanted = parse_port(port, what="PORT") if port is not None else None
    try:
        with open(file, encoding="utf-8", errors="strict") as f:
            events = list(parse_lines(f))
    except OSError as exc:
        raise UsageError(f"{visible(file)}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{visible(file)}: not UTF-8 text (not a rebind top record)") from None
    except BadRecord as exc:
        raise UsageError(f"{visible(file)}: {exc} (not a rebind top record)") from None
    n = 0
    for line in history(events, wanted):
        click.echo(line)
        n += 1
    return 0 if n else 1
