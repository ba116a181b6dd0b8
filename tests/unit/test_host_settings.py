"""kernel/sysctl.host_settings: the one sysctl reader, and the bind/connect/exporter settings
projected from it; kernel/route.py: the one RTM_GETROUTE codec on kernel/netlink.py framing."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from rebind.kernel import netlink, route
from rebind.kernel.sysctl import host_settings


def _sysctls(root: Path, values: dict[str, str]) -> str:
    for name, text in values.items():
        path = root / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return str(root)


def test_host_settings_and_their_projections(tmp_path: Path) -> None:
    from rebind.exporter.gather import read_ephemeral, read_settings
    from rebind.kernel.connect_facts import connect_settings

    root = _sysctls(
        tmp_path,
        {
            "net/ipv4/ip_local_port_range": "40000\t40100",
            "net/ipv4/ip_local_reserved_ports": "40001,40010-40011",
            "net/ipv4/ip_unprivileged_port_start": "80",
            "net/ipv6/bindv6only": "1",
            "net/ipv4/tcp_tw_reuse": "1",
            "net/ipv4/ip_autobind_reuse": "1",
        },
    )
    h = host_settings(root)
    assert h.port_range == (40000, 40100) and h.reserved_ports == {40001, 40010, 40011}
    assert (h.unprivileged_port_start, h.bindv6only, h.tcp_tw_reuse, h.ip_autobind_reuse) == (
        80,
        True,
        1,
        True,
    )
    assert h.tcp_timestamps == 1 and h.tcp_tw_reuse_delay_ms == 1000  # absent: the kernel's defaults
    c = connect_settings(root)
    assert (c.port_range, c.reserved, c.tw_reuse, c.autobind_reuse) == (
        (40000, 40100),
        h.reserved_ports,
        1,
        True,
    )
    rng = read_ephemeral(h)
    assert rng is not None and (rng.lo, rng.hi, rng.reserved) == (40000, 40100, h.reserved_ports)
    k = read_settings(rng, h)
    assert (k.unprivileged_port_start, k.bindv6only, k.ip_local_port_range) == (80, True, (40000, 40100))


def test_unreadable_range_is_none_for_the_exporter_and_the_default_for_the_models(tmp_path: Path) -> None:
    from rebind.exporter.gather import read_ephemeral

    h = host_settings(_sysctls(tmp_path, {"net/ipv4/ip_local_port_range": "garbage"}))
    assert h.port_range is None and h.reserved_ports is None
    assert read_ephemeral(h) is None
    assert h.range_or_default == (32768, 60999) and h.reserved_or_none == frozenset()


def _reply(seq: int, kind: int, body: bytes) -> bytes:
    return netlink.message(kind, 0, seq, body)


@pytest.mark.parametrize("src", [IPv4Address("10.0.0.9"), IPv6Address("2001:db8::9")])
def test_route_reply_gives_the_preferred_source(src: IPv4Address | IPv6Address) -> None:
    fam = socket.AF_INET if src.version == 4 else socket.AF_INET6
    rtmsg = struct.pack("=BBBBBBBBI", fam, 0, 0, 0, 254, 0, 0, 1, 0)
    body = rtmsg + netlink.attr(1, src.packed) + netlink.attr(route.RTA_PREFSRC, src.packed)
    req = route.request(src, 7)
    assert struct.unpack_from("=IHHII", req)[1:4] == (route.RTM_GETROUTE, netlink.NLM_F_REQUEST, 7)
    other = _reply(6, route.RTM_NEWROUTE, rtmsg + netlink.attr(route.RTA_PREFSRC, bytes(len(src.packed))))
    assert route.parse_reply(other + _reply(7, route.RTM_NEWROUTE, body), 7, src) == src  # by seq
    assert route.parse_reply(_reply(7, route.RTM_NEWROUTE, rtmsg), 7, src) is None
    assert route.parse_reply(b"\x01\x02", 7, src) is None  # malformed: no answer, no traceback


def test_route_error_is_no_route() -> None:
    with pytest.raises(route.NoRoute) as info:
        route.parse_reply(
            _reply(3, netlink.NLMSG_ERROR, struct.pack("=i", -101) + bytes(16)), 3, IPv4Address("192.0.2.1")
        )
    assert info.value.errno == 101
