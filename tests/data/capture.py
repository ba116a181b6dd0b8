"""Record real NETLINK_SOCK_DIAG replies for the codec unit tests (run once, as root; commit the output).

    .venv/bin/python tests/data/capture.py

In a private network namespace it builds a known set of sockets, sends dump requests, and writes
every datagram ``recv`` returned to ``tests/data/netlink/NAME.N.bin`` (N = datagram number), plus
``manifest.json`` describing the sockets that were built (port, state, inode, cookie, v6only...)
so the tests can check the decoded records against what really existed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "netlink"
sys.path.insert(0, str(HERE.parents[1] / "src"))

from rebind.kernel import diag_codec as codec  # noqa: E402
from rebind.kernel.netns import private_netns  # noqa: E402
from rebind.model.records import Family, Proto, State  # noqa: E402

SO_COOKIE = 57
ALL_STATES = 0xFFFFFFFF  # every bit, bound-inactive (13) included
MANY = 400  # listeners for a dump that spans several datagrams


def cookie(s: socket.socket) -> int:
    return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def describe(s: socket.socket, proto: str, state: str, **extra: object) -> dict[str, object]:
    local = s.getsockname()
    try:
        remote = s.getpeername()
    except OSError:
        remote = ("::" if s.family == socket.AF_INET6 else "0.0.0.0", 0)
    return {
        "proto": proto,
        "family": "ipv6" if s.family == socket.AF_INET6 else "ipv4",
        "state": state,
        "local": [local[0], local[1]],
        "remote": [remote[0], remote[1]],
        "inode": os.fstat(s.fileno()).st_ino,
        "cookie": cookie(s),
        **extra,
    }


def build() -> tuple[list[socket.socket], list[dict[str, object]]]:
    keep: list[socket.socket] = []
    facts: list[dict[str, object]] = []

    lst = socket.create_server(("127.0.0.1", 18500))
    keep.append(lst)
    facts.append(describe(lst, "tcp", "LISTEN"))

    dual = socket.socket(socket.AF_INET6)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 18501))
    dual.listen()
    keep.append(dual)
    facts.append(describe(dual, "tcp", "LISTEN", v6only=False))

    only = socket.socket(socket.AF_INET6)
    only.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    only.bind(("::1", 18502))
    only.listen()
    keep.append(only)
    facts.append(describe(only, "tcp", "LISTEN", v6only=True))

    bound = socket.socket()
    bound.bind(("127.0.0.1", 18503))
    keep.append(bound)
    facts.append(describe(bound, "tcp", "BOUND_INACTIVE"))

    # Server-side TIME_WAIT on 18504: the accepted socket closes first.
    tw_srv = socket.create_server(("127.0.0.1", 18504))
    cli = socket.create_connection(("127.0.0.1", 18504))
    acc, _ = tw_srv.accept()
    tw_local, tw_remote = acc.getsockname(), acc.getpeername()
    acc.close()
    time.sleep(0.05)
    cli.close()
    tw_srv.close()
    time.sleep(0.05)
    facts.append(
        {
            "proto": "tcp",
            "family": "ipv4",
            "state": "TIME_WAIT",
            "local": list(tw_local),
            "remote": list(tw_remote),
            "inode": None,
            "cookie": None,
        }
    )

    # An established pair on 18505 (both ends are in the table).
    est_srv = socket.create_server(("127.0.0.1", 18505))
    c2 = socket.create_connection(("127.0.0.1", 18505))
    a2, _ = est_srv.accept()
    keep += [est_srv, c2, a2]
    facts.append(describe(est_srv, "tcp", "LISTEN"))
    facts.append(describe(c2, "tcp", "ESTABLISHED"))
    facts.append(describe(a2, "tcp", "ESTABLISHED"))

    u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u1.bind(("127.0.0.1", 18506))
    u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u2.bind(("127.0.0.1", 18507))
    u2.connect(("127.0.0.1", 18506))
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u6.bind(("::1", 18508))
    keep += [u1, u2, u6]
    facts.append(describe(u1, "udp", "UNCONN"))
    facts.append(describe(u2, "udp", "ESTABLISHED"))
    facts.append(describe(u6, "udp", "UNCONN", v6only=False))

    for i in range(MANY):
        keep.append(socket.create_server(("127.0.0.1", 20000 + i)))
    return keep, facts


def capture(name: str, request: bytes) -> int:
    """Send one request and save each reply datagram until NLMSG_DONE or NLMSG_ERROR."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, codec.NETLINK_SOCK_DIAG) as nl:
        nl.send(request)
        n = 0
        while True:
            data = nl.recv(1 << 16)
            (OUT / f"{name}.{n}.bin").write_bytes(data)
            n += 1
            kinds = _kinds(data)
            if codec.NLMSG_DONE in kinds or codec.NLMSG_ERROR in kinds:
                return n


def _kinds(data: bytes) -> set[int]:
    kinds, off = set(), 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        kinds.add(kind)
        off += max((length + 3) & ~3, 16)
    return kinds


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.bin"):
        old.unlink()
    with private_netns():
        keep, facts = build()
        few = codec.port_filter(range(18500, 18509))
        counts = {
            # Both families, every TCP state, in one walk; only our fixed ports.
            "tcp_any_family": capture(
                "tcp_any_family", codec.dump_request_tcp_any_family(ALL_STATES, bytecode=few)
            ),
            # v2 requests, one family each.
            "tcp_v6": capture(
                "tcp_v6", codec.dump_request(Family.INET6, Proto.TCP, ALL_STATES, bytecode=few)
            ),
            "udp_v4": capture("udp_v4", codec.dump_request(Family.INET, Proto.UDP, ALL_STATES)),
            "udp_v6": capture("udp_v6", codec.dump_request(Family.INET6, Proto.UDP, ALL_STATES)),
            # Sport 18504 only: the TIME_WAIT mini-socket.
            "tcp_time_wait": capture(
                "tcp_time_wait",
                codec.dump_request(
                    Family.INET, Proto.TCP, State.TIME_WAIT.bit, bytecode=codec.port_filter([18504])
                ),
            ),
            # Many listeners: a dump of several datagrams, NLMSG_DONE in the last.
            "tcp_many": capture("tcp_many", codec.dump_request(Family.INET, Proto.TCP, State.LISTEN.bit)),
            # A bytecode the kernel's audit rejects (yes-jump of 3): NLMSG_ERROR with -EINVAL.
            "bad_bytecode": capture(
                "bad_bytecode",
                codec.dump_request(
                    Family.INET,
                    Proto.TCP,
                    ALL_STATES,
                    bytecode=struct.pack("=BBH", codec.BcOp.S_EQ, 3, 12) + bytes(4),
                ),
            ),
        }
        for s in keep:
            s.close()
    manifest = {
        "kernel": os.uname().release,
        "captured": time.strftime("%Y-%m-%d"),
        "datagrams": counts,
        "many_listeners": MANY,
        "sockets": facts,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
