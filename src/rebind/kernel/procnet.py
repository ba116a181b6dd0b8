"""Fallback socket table from /proc/net/{tcp,tcp6,udp,udp6} when netlink sock_diag is unavailable.

What this cannot see (say so to the user): bound-but-not-listening TCP sockets (they are only in
bhash2, never in /proc/net/tcp -- bind-rules.md D11/X1), socket cookies (so no SOCK_DESTROY), the
v6only flag, cgroup ids and bound devices. Port filtering happens here, in Python, over the whole
file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv6Address

from rebind.kernel.diag import current_netns
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State, Timer

FILES = {
    (Proto.TCP, Family.INET): "tcp",
    (Proto.TCP, Family.INET6): "tcp6",
    (Proto.UDP, Family.INET): "udp",
    (Proto.UDP, Family.INET6): "udp6",
}

LIMITATIONS = (
    "netlink sock_diag is unavailable; read /proc/net instead, which cannot show bound-but-not-"
    "listening TCP sockets, socket cookies, v6only or bound devices"
)

_TICK_MS = 1000 / (os.sysconf("SC_CLK_TCK") or 100)


def _addr(hexaddr: str, family: Family) -> IPv4Address | IPv6Address:
    # Each 32-bit word of the network-order address is printed with %08X of its host-order value.
    packed = b"".join(struct.pack("=I", int(hexaddr[i : i + 8], 16)) for i in range(0, len(hexaddr), 8))
    return IPv4Address(packed) if family is Family.INET else IPv6Address(packed)


def _endpoint(text: str, family: Family) -> Endpoint:
    host, port = text.split(":")
    return Endpoint(_addr(host, family), int(port, 16))


def parse_line(line: str, proto: Proto, family: Family, netns: int | None) -> SocketRecord:
    f = line.split()
    state = State(int(f[3], 16))
    timer_code, when = f[5].split(":")
    tmr = Timer(int(timer_code, 16)) if int(timer_code, 16) in Timer._value2member_map_ else Timer.UNKNOWN
    mini = tmr is Timer.TIME_WAIT and state in (State.TIME_WAIT, State.FIN_WAIT2)
    tx, rx = f[4].split(":")
    inode = int(f[9])
    return SocketRecord(
        proto=proto,
        family=family,
        state=state,
        local=_endpoint(f[1], family),
        remote=_endpoint(f[2], family),
        uid=None if mini else int(f[7]),
        inode=inode or None,
        timer=tmr,
        # tm->when is printed in clock ticks (jiffies_delta_to_clock_t).
        expires_ms=int(int(when, 16) * _TICK_MS) if tmr is not Timer.NONE else None,
        rqueue=int(rx, 16),
        wqueue=int(tx, 16),
        netns=netns,
    )


def iter_sockets(
    *,
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[Family] = (Family.INET, Family.INET6),
    states: Iterable[State] = frozenset(State),
    ports: Iterable[int] | None = None,
    root: str = "/proc",
) -> Iterator[SocketRecord]:
    wanted_ports = set(ports) if ports is not None else None
    wanted_states = set(states)
    if State.BOUND_INACTIVE in wanted_states or State.LISTEN in wanted_states:
        wanted_states.add(State.CLOSE)  # UDP bound sockets
    netns = current_netns()
    fams = list(families)
    for proto in protos:
        for family in fams:
            path = f"{root}/net/{FILES[(proto, family)]}"
            try:
                with open(path) as fh:
                    lines = fh.readlines()[1:]
            except FileNotFoundError:
                continue  # e.g. IPv6 disabled
            for line in lines:
                rec = parse_line(line, proto, family, netns)
                if wanted_ports is not None and rec.local.port not in wanted_ports:
                    continue
                if rec.state in wanted_states:
                    yield rec
