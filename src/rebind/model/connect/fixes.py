"""The fixes `why --connect` ranks: each built from this host's values and runnable as printed
(Python for ``python3 -c``, C statements, sysctl commands; tests/kernel/test_connect_fix_lines.py),
and the widened ephemeral range that stays clear of the host's server ports (C26)."""

from __future__ import annotations

from collections.abc import Sequence

from rebind.model.connect.facts import ConnectSettings
from rebind.model.connect.outcome import Accounting, ConnectOutcome, Fix, TimeWaitInfo, Verdict
from rebind.model.connect.request import ConnectRequest, connect_source
from rebind.model.connect.rules import PortMap
from rebind.model.ephemeral import format_reserved, reserve_command
from rebind.model.records import IPAddress, Proto

#: IP_LOCAL_PORT_RANGE (include/uapi/linux/in.h, Linux 6.3+): a u32, low port in the low 16 bits,
#: high port in the high 16 (do_ip_setsockopt); IP_BIND_ADDRESS_NO_PORT (4.2+). Printed as numbers:
#: Python's socket module and older C headers lack the names.
IP_BIND_ADDRESS_NO_PORT = 24
IP_LOCAL_PORT_RANGE = 51
#: Where a widened range aims (an even number of ports: C1); the kernel's own limits bound it.
WIDE_RANGE = (15000, 64999)


def widened_range(
    current: tuple[int, int], reserved: frozenset[int], servers: frozenset[int], unprivileged_port_start: int
) -> tuple[int, int] | None:
    """A wider ip_local_port_range that takes in no server port: it stops just short of the
    nearest unreserved server port on each side, never goes below ip_unprivileged_port_start
    (the write would be EINVAL), keeps an even port count (C1: an odd one leaves an end out of
    reach; the kernel warns "prefer different parity"). None when it cannot grow."""
    lo, hi = current
    nlo = max(min(lo, WIDE_RANGE[0]), unprivileged_port_start, 1)
    nhi = min(max(hi, WIDE_RANGE[1]), 65535)
    exposed = servers - reserved
    below = [p for p in exposed if nlo <= p < lo]
    above = [p for p in exposed if hi < p <= nhi]
    if below:
        nlo = max(below) + 1
    if above:
        nhi = min(above) - 1
    if nlo < lo and (nhi - nlo + 1) % 2:
        nlo += 1
    if nhi > hi and (nhi - nlo + 1) % 2:
        nhi -= 1
    nlo, nhi = min(nlo, lo), max(nhi, hi)
    if (nlo, nhi) == (lo, hi):
        return None
    return nlo, nhi


def _no_widening(settings: ConnectSettings, servers: frozenset[int]) -> Fix:
    """Why no wider range is proposed: the server ports that border it (no command: widening
    over them would hand them to connect())."""
    lo, hi = settings.port_range
    floor = max(min(lo, WIDE_RANGE[0]), settings.unprivileged_port_start)
    exposed = servers - settings.reserved
    below = [p for p in exposed if floor <= p < lo]
    above = [p for p in exposed if hi < p <= max(hi, WIDE_RANGE[1])]
    near = sorted(({max(below)} if below else set()) | ({min(above)} if above else set()))
    ports = ", ".join(map(str, near)) or "none"
    return Fix(
        f"No wider ephemeral range is proposed: server ports border {lo}-{hi}",
        f"unreserved server ports next to the range ({ports}) would fall into a wider one, and any "
        "connect() could take them first (C26); move those servers, or reserve their ports "
        "(ip_local_reserved_ports, keeping the ports reserved now), then widen",
    )


def _py_family(a: IPAddress) -> str:
    return "socket.AF_INET" if a.version == 4 else "socket.AF_INET6"


def _c_sockaddr(name: str, a: IPAddress, port: int) -> str:
    """A C declaration of a sockaddr for ``a`` (an ip_address: nothing to escape)."""
    if a.version == 4:
        return (
            f"struct sockaddr_in {name} = {{ .sin_family = AF_INET, .sin_port = htons({port}) }};\n"
            f'inet_pton(AF_INET, "{a}", &{name}.sin_addr);'
        )
    return (
        f"struct sockaddr_in6 {name} = {{ .sin6_family = AF_INET6, .sin6_port = htons({port}) }};\n"
        f'inet_pton(AF_INET6, "{a}", &{name}.sin6_addr);'
    )


def _slice(uses: PortMap) -> tuple[int, int] | None:
    """The half of the range with more ports usable by connect()'s own choice (``uses`` must be
    that map: the printed line is a plain connect()), for a per-socket IP_LOCAL_PORT_RANGE; None
    when neither half has one."""
    if uses.total < 4:
        return None
    mid = uses.lo + uses.total // 2
    halves = [(uses.lo, mid - 1), (mid, uses.hi)]

    def usable(h: tuple[int, int]) -> int:
        return h[1] - h[0] + 1 - uses.unusable_in(*h)

    best = max(halves, key=usable)
    return best if usable(best) else None


def _fix_catalogue(
    req: ConnectRequest,
    settings: ConnectSettings,
    src: IPAddress,
    uses: PortMap | None,
    servers: frozenset[int] | None,
) -> dict[str, Fix]:
    """Every line here is built from this host's values and runs as printed (tests/kernel/
    test_connect_fix_lines.py): Python lines are one program for ``python3 -c``; C lines are
    statements for a function where ``int fd`` is an open socket of the destination's family and
    the request's type (<sys/socket.h>, <netinet/in.h>, <arpa/inet.h>, <stdint.h>)."""
    dst = f"({str(req.dst)!r}, {req.dport})"
    udp = req.proto is Proto.UDP
    fam = _py_family(req.dst) + (", socket.SOCK_DGRAM" if udp else "")
    psrc = repr(str(src))
    c_dst = _c_sockaddr("dst", req.dst, req.dport)
    c_connect = "connect(fd, (struct sockaddr *)&dst, sizeof dst);"
    c_no_port = (
        f"int one = 1;\nsetsockopt(fd, IPPROTO_IP, {IP_BIND_ADDRESS_NO_PORT} /* IP_BIND_ADDRESS_NO_PORT */, "
        "&one, sizeof one);"
    )
    lo, hi = settings.port_range
    out = {
        "pool": Fix(
            "Reuse sockets: one connected UDP socket per destination, kept open",
            "each UDP socket that sends holds a port of the range until it is closed, whatever its "
            "destination (C20); one long-lived socket holds one",
            python=f"import socket\ns = socket.socket({fam})\n"
            f"s.connect({dst})  # once; then s.send() every datagram to it",
            c="/* keep fd open and send every datagram on it */",
        )
        if udp
        else Fix(
            "Reuse connections: a pool with keep-alive instead of one connection per request",
            "each new connection to the same destination takes a port for its lifetime plus 60 s of "
            "TIME_WAIT when the client closes first; a pooled connection takes one port for good",
            python="import socket\n"
            f"conn = socket.create_connection({dst})  # open once, keep it open\n"
            "# ...and send every request on conn (HTTP keep-alive: requests.Session(), httpx.Client())",
            c="/* keep fd open and send the next request on it (HTTP: Connection: keep-alive) */",
        ),
        "no_port": Fix(
            "Set IP_BIND_ADDRESS_NO_PORT before bind(ip, 0)",
            "bind() then records only the address and connect() picks the port per 4-tuple, sharing ports "
            "across destinations; without it bind() needs a wholly unused port (C13, C15; Linux 4.2+)",
            python=f"import socket\ns = socket.socket({fam})\n"
            f"s.setsockopt(socket.IPPROTO_IP, {IP_BIND_ADDRESS_NO_PORT}, 1)  # IP_BIND_ADDRESS_NO_PORT\n"
            f"s.bind(({psrc}, 0))\ns.connect({dst})",
            c=f"{c_no_port}\n"
            f"{_c_sockaddr('src', src, 0)}\n"
            "bind(fd, (struct sockaddr *)&src, sizeof src);  /* port 0: connect() picks it */\n"
            f"{c_dst}\n{c_connect}",
        ),
        "no_fixed": Fix(
            "Never bind a fixed client port, with or without SO_REUSEADDR",
            "two clients on one port to the same server share a 4-tuple (EADDRNOTAVAIL), and the port is "
            "removed from every connect() in the namespace while it or its TIME_WAIT exists (C19); "
            "no kernel setting fixes it: bind port 0 with IP_BIND_ADDRESS_NO_PORT, or do not bind()",
            python=f"import socket\ns = socket.socket({fam})  # no bind(): connect() picks the port\n"
            f"s.connect({dst})",
            c=f"{c_dst}\n{c_connect}  /* no bind(): connect() picks the port */",
        ),
        "sources": Fix(
            "Spread connections over more source addresses",
            "every (source, destination, port) has its own range of 4-tuples; with "
            "IP_BIND_ADDRESS_NO_PORT, each extra source address adds a whole range for this destination",
            python="import itertools, socket\n"
            f"sources = itertools.cycle([{psrc}])  # list every local address you may use\n"
            f"s = socket.socket({fam})\n"
            f"s.setsockopt(socket.IPPROTO_IP, {IP_BIND_ADDRESS_NO_PORT}, 1)  # IP_BIND_ADDRESS_NO_PORT\n"
            f"s.bind((next(sources), 0))\ns.connect({dst})",
            c=f'static const char *sources[] = {{ "{src}" }};  /* every local address you may use */\n'
            "static unsigned next_source;\n"
            f"{c_no_port}\n"
            f"{_c_sockaddr('src', src, 0).splitlines()[0]}\n"
            f"inet_pton({'AF_INET' if src.version == 4 else 'AF_INET6'}, "
            f"sources[next_source++ % (sizeof sources / sizeof *sources)], "
            f"&src.{'sin_addr' if src.version == 4 else 'sin6_addr'});\n"
            f"bind(fd, (struct sockaddr *)&src, sizeof src);\n{c_dst}\n{c_connect}",
        ),
        "tw_reuse": Fix(
            "Let connect() take over old TIME_WAIT entries: net.ipv4.tcp_tw_reuse=1",
            "only outgoing connections, only when the old connection used TCP timestamps (PAWS protects "
            "the new one), only after tcp_tw_reuse_delay; the default 2 does it for loopback only. "
            "Caveat: it changes nothing for servers, and NAT/middleboxes that strip timestamps defeat it",
            command="sysctl -w net.ipv4.tcp_tw_reuse=1",
        ),
    }
    if (
        servers is not None
        and (
            wide := widened_range(
                settings.port_range, settings.reserved, servers, settings.unprivileged_port_start
            )
        )
        is not None
    ):
        wlo, whi = wide
        inside = sorted(p for p in servers if lo <= p <= hi and p not in settings.reserved)
        reserve = reserve_command(settings.reserved, inside)
        kept = format_reserved(settings.reserved)
        why = (
            f"the range is {lo}-{hi} ({hi - lo + 1} ports); {wlo}-{whi} ({whi - wlo + 1}) gives every "
            "destination more 4-tuples. It stops short of every server port outside the range "
            "(a connection could take one first, C26)"
        )
        if reserve:
            why += (
                f"; the first command reserves the server ports inside it ({format_reserved(inside)}), "
                f"keeping those reserved now ({kept or 'none'})"
            )
        command = f"sysctl -w net.ipv4.ip_local_port_range='{wlo} {whi}'"
        out["widen"] = Fix(
            f"Widen the ephemeral range to {wlo}-{whi}, clear of this host's server ports",
            why,
            command=f"{reserve} && {command}" if reserve else command,
        )
    elif servers is not None:
        out["widen"] = _no_widening(settings, servers)
    part = _slice(uses) if uses is not None else None
    if part is not None:
        plo, phi = part
        out["per_socket_range"] = Fix(
            f"Give busy clients their own slice of the range: IP_LOCAL_PORT_RANGE {plo}-{phi} (Linux 6.3+)",
            "a per-socket range inside the netns range keeps one client from using up everyone's ports, "
            "and since 6.8 connect() walks it without the parity split (no slow half, C3/C10)",
            python=f"import socket, struct\ns = socket.socket({fam})\n"
            f"# IP_LOCAL_PORT_RANGE ({IP_LOCAL_PORT_RANGE}): a u32, low port in bits 0-15, high in 16-31\n"
            f"s.setsockopt(socket.IPPROTO_IP, {IP_LOCAL_PORT_RANGE}, "
            f"struct.pack('=I', ({phi} << 16) | {plo}))\n"
            f"s.connect({dst})",
            c=f"uint32_t range = ({phi}u << 16) | {plo}u;  /* high << 16 | low */\n"
            f"setsockopt(fd, IPPROTO_IP, {IP_LOCAL_PORT_RANGE} /* IP_LOCAL_PORT_RANGE */, "
            "&range, sizeof range);\n"
            f"{c_dst}\n{c_connect}",
        )
    return out


def rank_fixes(
    req: ConnectRequest,
    outcome: ConnectOutcome,
    acc: Accounting,
    tws: Sequence[TimeWaitInfo],
    settings: ConnectSettings,
    rng: tuple[int, int],
    *,
    uses: PortMap | None = None,
    src: IPAddress | None = None,
    servers: frozenset[int] | None = None,
) -> list[Fix]:
    """The fixes that apply, most effective first."""
    cat = _fix_catalogue(req, settings, src if src is not None else connect_source(req), uses, servers)
    order: list[str] = []
    if req.local_port is not None:
        order.append("no_fixed")
    if req.bind_before_connect and not req.bind_address_no_port:
        order.append("no_port")
    pressure = outcome.verdict is not Verdict.OK or acc.usable < acc.total // 2 or bool(tws)
    if not pressure and not order:
        return []
    order.append("pool")
    if tws and not all(t.reusable is True for t in tws) and settings.tw_reuse != 1:
        order.append("tw_reuse")
    order += ["sources", "widen", "per_socket_range"]
    if "tw_reuse" not in order and settings.tw_reuse != 1:
        order.append("tw_reuse")
    if req.proto is Proto.UDP:
        order = [k for k in order if k != "tw_reuse"]  # UDP has no TIME_WAIT
    return [cat[k] for k in dict.fromkeys(order) if k in cat]
