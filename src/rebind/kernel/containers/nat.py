"""Which NAT rules capture a port: ``iptables-save -t nat`` (iptables-nft included), parsed in
model/containers/nat.py.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv6Address

from rebind.model.containers import NatCapture, nat_captures

IPAddress = IPv4Address | IPv6Address


def iptables_nat() -> str | None:
    """``iptables-save -t nat`` (and ip6tables), or None when the tools are absent or refuse."""
    import shutil
    import subprocess

    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        exe = shutil.which(tool) or next(
            (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.path.exists(p)), None
        )
        if exe is None:
            continue
        try:
            res = subprocess.run(
                [exe, "-t", "nat"], capture_output=True, text=True, timeout=5, errors="replace", check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0:
            out.append(res.stdout)
    return "\n".join(out) if out else None


def captures_for(port: int, proto: str, addr: IPAddress | None) -> tuple[NatCapture, ...]:
    text = iptables_nat()
    return nat_captures(text, port, proto, addr) if text else ()
