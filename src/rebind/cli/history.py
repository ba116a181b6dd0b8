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
Exit status: 0 events printed, 1 no event for PORT, 2 unreadable or malformed FILE (events
before a malformed line are printed first), a FIFO, device or directory, or a symlink.
Schema of the file: docs/top.md (rebind.top.event/1).
""",
)
@click.argument("file", metavar="FILE")
@click.argument("port", required=False, metavar="[PORT]")
def history(file: str, port: str | None) -> int:
    """Print who held which port when, one line per event, from a `rebind top --record` FILE."""
    import os

    from rebind.errors import UsageError
    from rebind.model.validate import parse_port
    from rebind.textsafe import visible
    from rebind.top.events import BadRecord, history, parse_lines
    from rebind.top.record import open_record, read_lines

    wanted = parse_port(port, what="PORT") if port is not None else None
    try:
        fd = open_record(file)
    except UsageError as exc:
        raise UsageError(visible(str(exc))) from None
    n = 0
    try:
        # Streamed: one line in memory at a time, whatever the file's size. Events before a
        # malformed line are printed, then the error (exit 2) names that line.
        for line in history(parse_lines(read_lines(fd)), wanted):
            click.echo(line)
            n += 1
    except OSError as exc:
        raise UsageError(f"{visible(file)}: {exc.strerror}") from None
    except BadRecord as exc:
        raise UsageError(f"{visible(file)}: {exc} (not a rebind top record)") from None
    finally:
        os.close(fd)
    return 0 if n else 1
