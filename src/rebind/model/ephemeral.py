"""Server ports inside the ephemeral range (pure, import-light: `rebind ls` uses it).

Any outgoing connection may take a port of ``ip_local_port_range`` that is not listed in
``ip_local_reserved_ports``; while it holds it, a server's bind() of that port on an overlapping
address fails with EADDRINUSE, even with SO_REUSEADDR (docs/connect-rules.md C26;
kubernetes#111682, amazon-eks-ami#1307).
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_RANGE = (32768, 60999)


def read_port_range(text: str | None) -> tuple[int, int] | None:
    """``ip_local_port_range`` as /proc shows it: "32768\t60999" (proc_dointvec_minmax writes a
    two-int vector separated by a *tab*, so split on any white space); None when unreadable."""
    parts = (text or "").split()
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def parse_port_range(text: str | None) -> tuple[int, int]:
    """:func:`read_port_range`, or the kernel's default range when the text is unreadable."""
    return read_port_range(text) or DEFAULT_RANGE


def parse_reserved(text: str | None) -> frozenset[int]:
    """``ip_local_reserved_ports`` syntax: "8080,9000-9010" (empty when none)."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return frozenset(out)


def format_reserved(ports: Iterable[int]) -> str:
    """Ports in the kernel's own ``ip_local_reserved_ports`` form: ascending, runs as ``A-B``,
    comma-separated (proc_do_large_bitmap's read side), e.g. ``8080,30000-30010,45000``."""
    out: list[str] = []
    run: list[int] = []
    for p in sorted(set(ports)):
        if run and p == run[-1] + 1:
            run[-1] = p
            continue
        if run:
            out.append(str(run[0]) if run[0] == run[1] else f"{run[0]}-{run[1]}")
        run = [p, p]
    if run:
        out.append(str(run[0]) if run[0] == run[1] else f"{run[0]}-{run[1]}")
    return ",".join(out)


def reserve_command(existing: Iterable[int], add: Iterable[int]) -> str | None:
    """The sysctl line that reserves ``add`` *and keeps* ``existing``: a write to
    ip_local_reserved_ports replaces the whole bitmap, so the line carries the union. None when
    nothing would change."""
    old = frozenset(existing)
    merged = old | frozenset(add)
    if merged == old:
        return None
    return f"sysctl -w net.ipv4.ip_local_reserved_ports={format_reserved(merged)}"


def ephemeral_overlap_warning(
    port: int, port_range: tuple[int, int], reserved: Iterable[int] = ()
) -> str | None:
    """A warning when a server port lies in ``ip_local_port_range`` and is not reserved."""
    lo, hi = port_range
    res = frozenset(reserved)
    if not lo <= port <= hi or port in res:
        return None
    return (
        f"port {port} lies inside the ephemeral range {lo}-{hi} and is not reserved: an outgoing "
        f"connection may take it first and the server's bind() then fails with EADDRINUSE; reserve it, "
        f"keeping the ports reserved now ({reserve_command(res, {port})}) or use a port below {lo}"
    )


def server_ports_warning(
    ports: Iterable[int], port_range: tuple[int, int], reserved: Iterable[int] = (), *, limit: int = 10
) -> str | None:
    """One warning for every exposed server port (at most ``limit`` named)."""
    res = set(reserved)
    exposed = sorted({p for p in ports if ephemeral_overlap_warning(p, port_range, res)})
    if not exposed:
        return None
    if len(exposed) == 1:
        return ephemeral_overlap_warning(exposed[0], port_range, res)
    more = f" and {len(exposed) - limit} more" if len(exposed) > limit else ""
    lo, hi = port_range
    return (
        f"server ports {', '.join(map(str, exposed[:limit]))}{more} lie inside the ephemeral range "
        f"{lo}-{hi} and are not reserved: outgoing connections may take them first (bind() then fails "
        f"with EADDRINUSE); reserve them, keeping the ports reserved now ({reserve_command(res, exposed)}) "
        f"or move them below {lo}"
    )
