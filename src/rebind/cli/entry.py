"""Console entry point. For `rebind ls PORT…` it starts the kernel dump before importing the CLI
(see rebind.kernel.prefetch), then hands over to click."""

from __future__ import annotations

import sys

_PLAIN_LS_FLAGS = frozenset({"--no-owners", "--json"})


def _ls_ports(argv: list[str]) -> tuple[int, ...]:
    """Ports of a plain `ls PORT… [--no-owners] [--json]`; () for anything else."""
    if len(argv) < 2 or argv[0] != "ls":
        return ()
    rest = argv[1:]
    if not all(a.isdigit() or a in _PLAIN_LS_FLAGS for a in rest):
        return ()
    ports = tuple(int(a) for a in rest if a.isdigit())
    return ports if ports and all(1 <= p <= 65535 for p in ports) else ()


def main() -> None:
    ports = _ls_ports(sys.argv[1:])
    if ports:
        from rebind.kernel import prefetch

        prefetch.start(ports)
    from rebind.cli.main import main as cli_main

    cli_main()
