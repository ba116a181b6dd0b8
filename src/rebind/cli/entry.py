"""Console entry point. For `rebind ls PORT…` and `rebind [why] PORT` it starts the kernel dump
before importing the CLI (see rebind.kernel.prefetch), then hands over to click."""

from __future__ import annotations

import sys

_PLAIN_LS_FLAGS = frozenset({"--no-owners", "--json"})
# `why` options that do not change which sockets are read (--addr only filters afterwards).
_PLAIN_WHY_FLAGS = frozenset({"--json", "--reuseaddr", "--reuseport", "--v6only"})


def _ls_ports(argv: list[str]) -> tuple[int, ...]:
    """Ports of a plain `ls PORT… [--no-owners] [--json]`; () for anything else."""
    if len(argv) < 2 or argv[0] != "ls":
        return ()
    rest = argv[1:]
    if not all(a.isdigit() or a in _PLAIN_LS_FLAGS for a in rest):
        return ()
    ports = tuple(int(a) for a in rest if a.isdigit())
    return ports if ports and all(1 <= p <= 65535 for p in ports) else ()


def _why_port(argv: list[str]) -> tuple[int, bool] | None:
    """(port, udp) of a plain `why PORT [flags]` or `PORT [flags]`; None for anything else."""
    if argv and argv[0] == "why":
        argv = argv[1:]
    if not argv or not argv[0].isdigit() or not 1 <= int(argv[0]) <= 65535:
        return None
    flags = argv[1:]
    if not all(f in _PLAIN_WHY_FLAGS or f == "--udp" for f in flags):
        return None
    return int(argv[0]), "--udp" in flags


def main() -> None:
    argv = sys.argv[1:]
    ports = _ls_ports(argv)
    why = _why_port(argv)
    if ports or why:
        from rebind.kernel import prefetch

        if ports:
            prefetch.start(ports)
        elif why:
            prefetch.start((why[0],), "udp" if why[1] else "tcp")
    from rebind.cli.main import main as cli_main

    cli_main()
