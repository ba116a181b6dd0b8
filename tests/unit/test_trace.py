"""`rebind trace` without the kernel: record decoding, filters, lines, JSON, history, bad input."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from rebind.errors import UsageError
from rebind.kernel.bpf import asm
from rebind.kernel.bpf.trace_prog import EVENT, MEMBERS, Bits, Ev, TraceLayout, TraceMaps, build_program
from rebind.kernel.trace import decode
from rebind.model.records import Proto
from rebind.model.trace import BlockerView, Kind, Snapshot, TraceEvent, parse_errnos, wanted
from rebind.render.trace import describe, from_json, to_json, to_line
from rebind.trace_record import history

Run = Callable[..., subprocess.CompletedProcess[str]]
BITS = {"skc_reuse": Bits(0, 4), "skc_reuseport": Bits(4, 1), "skc_ipv6only": Bits(5, 1)}


def _record(**kw: object) -> bytes:
    f = {
        "ts": 5, "cgroup": 7, "ino": 1234, "tid": 41, "tgid": 40, "netns": 4026531840, "errno": 98,
        "uid": 1000, "dev": 0, "kind": 1, "family": 2, "type": 1, "proto": 6, "flags": 0, "num": 0,
        "pad": 0, "arg": 16, "saddr4": 0, "sockaddr": b"", "saddr6": b"", "comm": b"myapp", "fd": 3,
    }  # fmt: skip
    f.update(kw)
    return EVENT.pack(*f.values())


def _sin(addr: str, port: int) -> bytes:
    return struct.pack("<H", 2) + port.to_bytes(2, "big") + IPv4Address(addr).packed


def _sin6(addr: str, port: int, scope: int = 0) -> bytes:
    return (
        struct.pack("<H", 10)
        + port.to_bytes(2, "big")
        + b"\0" * 4
        + IPv6Address(addr).packed
        + struct.pack("<I", scope)
    )


def test_decode_a_failed_ipv4_bind_with_reuseaddr() -> None:
    ev = decode(_record(sockaddr=_sin("0.0.0.0", 8080), flags=0b1), BITS)
    assert ev is not None
    assert (ev.kind, ev.errno_name, ev.proto, ev.addr, ev.port) == (
        Kind.BIND,
        "EADDRINUSE",
        Proto.TCP,
        IPv4Address("0.0.0.0"),
        8080,
    )
    assert (ev.pid, ev.tid, ev.comm, ev.uid, ev.inode, ev.fd) == (40, 41, "myapp", 1000, 1234, 3)
    assert ev.flags == ("SO_REUSEADDR",)


def test_decode_ipv6_flags_and_scope() -> None:
    raw = _record(family=10, proto=17, sockaddr=_sin6("fe80::1", 53, 2), flags=0b110000)
    ev = decode(raw, BITS)
    assert ev is not None and ev.proto is Proto.UDP
    assert (ev.addr, ev.port, ev.scope_id) == (IPv6Address("fe80::1"), 53, 2)
    assert ev.flags == ("SO_REUSEPORT", "IPV6_V6ONLY")


def test_decode_listen_uses_the_bound_address() -> None:
    raw = _record(kind=2, num=9090, saddr4=struct.unpack("<I", IPv4Address("127.0.0.1").packed)[0])
    ev = decode(raw, BITS)
    assert ev is not None and (ev.kind, str(ev.addr), ev.port) == (Kind.LISTEN, "127.0.0.1", 9090)


@pytest.mark.parametrize("kw", [{"family": 1}, {"kind": 9}])
def test_decode_skips_what_is_not_inet(kw: dict[str, int]) -> None:
    assert decode(_record(**kw), BITS) is None
    assert decode(b"short", BITS) is None


def test_parse_errnos() -> None:
    assert parse_errnos(None) == {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}
    assert parse_errnos("eaddrinuse, 99") == {98, 99}
    assert len(parse_errnos("all")) == 4095
    for bad in ("ENOTANERRNO", "0", "5000", ",", "os.system"):
        with pytest.raises(UsageError):
            parse_errnos(bad)


def _event(**kw: object) -> TraceEvent:
    base: dict[str, object] = dict(
        kind=Kind.BIND, errno=98, pid=4121, tid=4121, comm="myapp", cgroup_id=1, netns=1, family=2,
        proto=Proto.TCP, fd=3, addr=IPv4Address("0.0.0.0"), port=8080, reuseaddr=True, ts=1_700_000_000.0,
    )  # fmt: skip
    base.update(kw)
    return TraceEvent(**base)  # type: ignore[arg-type]


def test_port_filter() -> None:
    assert wanted(_event(), frozenset()) and wanted(_event(), frozenset({8080}))
    assert not wanted(_event(), frozenset({80}))
    assert wanted(_event(kind=Kind.CONNECT, port=5432, local_port=80), frozenset({80}))


SNAP = Snapshot(
    verdict="busy",
    reason="TIME_WAIT 10.0.0.5:8080 → 10.0.0.9:51234 left by a server without SO_REUSEADDR, 41 s left",
    blockers=(
        BlockerView(kind="time-wait", text="…", state="TIME_WAIT", local="10.0.0.5:8080", left_ms=41000),
    ),
)


def test_line_reads_like_the_issue() -> None:
    line = describe(_event(), SNAP, unit="myapp.service")
    assert line.endswith(
        "myapp[4121] (myapp.service) bind 0.0.0.0:8080/tcp SO_REUSEADDR → EADDRINUSE: "
        "TIME_WAIT 10.0.0.5:8080 → 10.0.0.9:51234 left by a server without SO_REUSEADDR, 41 s left"
    )


def test_hostile_comm_is_escaped_in_lines_and_json() -> None:
    ev = _event(comm="x\x1b[31m\nevil")
    assert "\x1b" not in describe(ev, None) and "\n" not in describe(ev, None)
    line = to_line(ev, SNAP)
    assert line.count("\n") == 1 and "\x1b" not in line


def test_json_round_trip_and_mixed_history(tmp_path: Path) -> None:
    from rebind.top.events import Event, EventKind
    from rebind.top.events import to_line as top_line
    from rebind.top.model import PortKey

    doc = to_json(_event(), SNAP, unit="myapp.service")
    assert doc["schema"] == "rebind.trace/1" and doc["snapshot"]["verdict"] == "busy"
    rec = from_json(json.loads(to_line(_event(), SNAP, unit="myapp.service")))
    assert (rec.call, rec.errno, rec.port, rec.pid, rec.unit) == (
        "bind",
        "EADDRINUSE",
        8080,
        4121,
        "myapp.service",
    )
    top = top_line(Event(1_700_000_001.0, EventKind.GONE, PortKey(8080, Proto.TCP)))
    other = to_line(_event(port=9000), None)
    lines = list(history([to_line(_event(), SNAP), top, other], 8080))
    assert len(lines) == 2 and "bind 0.0.0.0:8080/tcp SO_REUSEADDR → EADDRINUSE: TIME_WAIT" in lines[0]
    assert "no longer held" in lines[1]


@pytest.mark.parametrize(
    "bad",
    [
        {"schema": "rebind.trace/1", "ts": 1.0, "call": "rm -rf", "process": {}, "options": {}, "port": 1},
        {"schema": "rebind.trace/1", "ts": True, "call": "bind", "process": {}, "options": {}, "port": 1},
        {"schema": "rebind.trace/1", "ts": 1.0, "call": "bind", "process": [], "options": {}, "port": 1},
    ],
)
def test_history_refuses_malformed_trace_lines(bad: dict[str, object]) -> None:
    from rebind.top.events import BadRecord

    with pytest.raises(BadRecord, match="line 1"):
        list(history([json.dumps(bad)]))


def test_program_assembles_within_limits() -> None:
    offsets = {f"{s}.{m}": 8 for s, m, _ in MEMBERS} | {
        f"pt_regs.{r}": 8 for r in ("orig_ax", "di", "si", "dx")
    }
    insns = build_program(TraceLayout("x86_64", offsets, 19, BITS), TraceMaps(3, 4, 5))
    assert len(insns) % 8 == 0 and len(insns) // 8 < 4096
    text = asm.disassemble(insns)
    assert any("call helper 130" in t for t in text)  # bpf_ringbuf_output
    assert sum("call helper 112" in t for t in text) == 1  # the one user read: the sockaddr
    assert Ev.SIZE == EVENT.size == 144


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trace", "70000"], "out of range"),
        (["trace", "--errno", "EBOGUS"], "not an errno"),
        (["trace", "--count", "0"], "not a positive integer"),
        (["trace", "--netns", "x"], "not a positive integer"),
        (["trace", "--record-max", "1K"], "out of range"),
    ],
)
def test_bad_input_is_one_line_exit_2(rebind_cli: Run, args: list[str], needle: str) -> None:
    res = rebind_cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr
