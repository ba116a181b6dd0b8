"""Which container or systemd unit a process belongs to, which port-holding proxy it is, and which
NAT rule captures a port: pure parsing of what the kernel and the engines leave in plain text.

Everything parsed here is written by another process (``/proc/PID/cgroup`` is the kernel's, but
command lines and rule comments are not): identifiers are accepted only in their exact shape (a
64-hex container id, an IP address, a port number); anything else is dropped, never echoed raw.

Rooms: ``names.py`` (engines, ``ContainerRef``, the accepted shapes of names and ids, the stop
command), ``cgroup.py`` (cgroup layouts), ``proxy.py`` (proxy command lines), ``api.py`` (an
engine's HTTP/JSON answer), ``nat.py`` (NAT rules).
"""

from __future__ import annotations

from rebind.model.containers.api import content_end, json_depth_within, json_nesting_problem, parse_api_answer
from rebind.model.containers.cgroup import container_from_cgroup, container_from_path, unit_from_cgroup
from rebind.model.containers.names import ContainerRef, Engine, stop_command, valid_id, valid_name, valid_user
from rebind.model.containers.nat import NatCapture, NatChain, nat_captures, proxies_by_ip
from rebind.model.containers.proxy import ProxyInfo, ProxyKind, classify_proxy

__all__ = [
    "ContainerRef",
    "Engine",
    "NatCapture",
    "NatChain",
    "ProxyInfo",
    "ProxyKind",
    "classify_proxy",
    "container_from_cgroup",
    "container_from_path",
    "content_end",
    "json_depth_within",
    "json_nesting_problem",
    "nat_captures",
    "parse_api_answer",
    "proxies_by_ip",
    "stop_command",
    "unit_from_cgroup",
    "valid_id",
    "valid_name",
    "valid_user",
]
