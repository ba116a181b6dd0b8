"""`rebind demo`: the origin story, replayed for real in a private network namespace."""

from __future__ import annotations

import click


@click.command(
    epilog="""\b
Examples:
  rebind demo
  rebind demo --client        the client half: fixed ports, bind-before-connect, exhaustion
  rebind demo --trace         the failed restart, caught by `rebind trace` with its reason
  NO_COLOR=1 rebind demo > demo.txt
""",
)
@click.option("--client", is_flag=True, help="Replay the client side: EADDRNOTAVAIL and port exhaustion.")
@click.option("--trace", "trace", is_flag=True, help="Replay the failed restart under `rebind trace` (root).")
def demo(client: bool, trace: bool) -> int:
    """Replay the blog post that started rebind, with real processes, in a private netns.

    A server binds 12345, a client connects, the server exits, TIME_WAIT appears, the restart
    fails with Errno 98 -- and rebind explains each step: why SO_REUSEADDR alone does not help,
    when it does, the post's C server (corrected so it compiles), and SO_REUSEPORT on Linux.
    Takes a few seconds; never waits out the 60 s TIME_WAIT.
    """
    from rebind.cli.render import console
    from rebind.demo import run_client_demo, run_demo, run_trace_demo
    from rebind.errors import UsageError

    if client and trace:
        raise UsageError("--client and --trace are two demos: give one")
    con = console()
    ok = (run_client_demo if client else run_trace_demo if trace else run_demo)(con.print)
    if not ok:
        con.print("[bold red]Something in the demo did not behave as the story says (see above).[/]")
    return 0 if ok else 1
