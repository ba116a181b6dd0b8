"""The codec on real kernel replies recorded by tests/data/capture.py (Linux 6.18, see manifest.json)."""

from __future__ import annotations

import errno
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rebind.errors import CodecError, KernelError
from rebind.kernel import diag_codec as c
from rebind.model.records import Proto, SocketRecord, State, Timer

DATA = Path(__file__).resolve().parents[1] / "data" / "netlink"
MANIFEST: dict[str, Any] = json.loads((DATA / "manifest.json").read_text())
NAMES = sorted(MANIFEST["datagrams"])


@cache
def datagrams(name: str) -> tuple[bytes, ...]:
    return tuple((DATA / f"{name}.{i}.bin").read_bytes() for i in range(MANIFEST["datagrams"][name]))


def decode(name: str, proto: Proto = Proto.TCP) -> tuple[list[SocketRecord], list[c.Done]]:
    recs: list[SocketRecord] = []
    dones: list[c.Done] = []
    grams = datagrams(name)
    for i, data in enumerate(grams):
        for msg in c.iter_messages(data, proto):
            if isinstance(msg, SocketRecord):
                assert not dones, "a socket after NLMSG_DONE"
                recs.append(msg)
            elif isinstance(msg, c.Done):
                assert i == len(grams) - 1, "NLMSG_DONE before the last datagram"
                dones.append(msg)
    return recs, dones


def facts(**match: object) -> list[dict[str, Any]]:
    return [f for f in MANIFEST["sockets"] if all(f[k] == v for k, v in match.items())]


def key(proto: str, family: str, state: str, local: Any, remote: Any) -> tuple[object, ...]:
    return (proto, family, state, str(local[0]), int(local[1]), str(remote[0]), int(remote[1]))


def rec_key(r: SocketRecord) -> tuple[object, ...]:
    return key(
        r.proto.value,
        r.family.label,
        r.state.name,
        (r.local.addr, r.local.port),
        (r.remote.addr, r.remote.port),
    )


def fact_key(f: dict[str, Any]) -> tuple[object, ...]:
    # The manifest uses the labels users see; UDP's bound state is UNCONN (State.CLOSE).
    state = "CLOSE" if f["state"] == "UNCONN" else f["state"]
    return key(f["proto"], f["family"], state, f["local"], f["remote"])


def test_manifest_matches_files():
    for name, n in MANIFEST["datagrams"].items():
        assert n >= 1 and all((DATA / f"{name}.{i}.bin").exists() for i in range(n))


def test_any_family_tcp_dump_has_every_state_with_identity():
    recs, dones = decode("tcp_any_family")
    assert len(dones) == 1 and not dones[0].interrupted
    # The request's bytecode keeps local ports 18500-18508: the client end of 18505 is left out.
    expected = {fact_key(f): f for f in facts(proto="tcp") if 18500 <= f["local"][1] <= 18508}
    assert len(expected) == 7
    got = {rec_key(r): r for r in recs}
    assert set(got) == set(expected)
    for k, f in expected.items():
        r = got[k]
        if f["inode"] is None:  # the TIME_WAIT mini-socket: no owner, no file, a timer
            assert r.is_mini and r.uid is None and r.inode is None
            assert r.timer is Timer.TIME_WAIT and 0 < (r.expires_ms or 0) <= 60_000
        else:
            assert (r.inode, r.cookie, r.uid) == (f["inode"], f["cookie"], 0)
            assert r.timer is Timer.NONE and r.expires_ms is None
        if "v6only" in f:
            assert r.v6only is f["v6only"]
        elif r.family.label == "ipv4":
            assert r.v6only is None
        # Full sockets carry INET_DIAG_CGROUP_ID on 6.18; mini-sockets have no attributes.
        assert (r.cgroup_id is None) is r.is_mini
    # The bound-but-not-listening socket is there, renamed from the kernel's CLOSE.
    assert [r.local.port for r in recs if r.state is State.BOUND_INACTIVE] == [18503]


def test_v2_dump_of_one_family():
    recs, _ = decode("tcp_v6")
    assert {rec_key(r) for r in recs} == {fact_key(f) for f in facts(proto="tcp", family="ipv6")}
    assert {r.local.port for r in recs} == {18501, 18502}


@pytest.mark.parametrize("name,family", [("udp_v4", "ipv4"), ("udp_v6", "ipv6")])
def test_udp_bound_and_connected(name, family):
    recs, dones = decode(name, Proto.UDP)
    assert len(dones) == 1
    assert {rec_key(r) for r in recs} == {fact_key(f) for f in facts(proto="udp", family=family)}
    by_port = {r.local.port: r for r in recs}
    for f in facts(proto="udp", family=family):
        assert by_port[f["local"][1]].inode == f["inode"]
        assert by_port[f["local"][1]].cookie == f["cookie"]


def test_time_wait_only_request():
    recs, _ = decode("tcp_time_wait")
    [tw] = recs
    assert tw.state is State.TIME_WAIT and tw.local.port == 18504 and tw.remote.port != 0
    assert tw.is_mini and tw.uid is None and tw.inode is None and 0 < (tw.expires_ms or 0) <= 60_000


def test_dump_spanning_several_datagrams():
    recs, dones = decode("tcp_many")
    assert len(datagrams("tcp_many")) >= 3 and len(dones) == 1
    assert {r.state for r in recs} == {State.LISTEN}
    many = {r.local.port for r in recs if 20000 <= r.local.port < 20000 + MANIFEST["many_listeners"]}
    assert len(many) == MANIFEST["many_listeners"]
    assert len({r.cookie for r in recs}) == len(recs)


def test_kernel_rejected_bytecode_is_kernel_error_with_errno():
    [data] = datagrams("bad_bytecode")
    with pytest.raises(KernelError) as exc:
        list(c.iter_messages(data, Proto.TCP))
    assert exc.value.errno == errno.EINVAL and not isinstance(exc.value, CodecError)
    assert "errno 22" in str(exc.value)


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_of_a_real_datagram(name):
    """Cut anywhere: either the cut falls on a message boundary (fine) or CodecError."""
    data = datagrams(name)[0]
    boundaries, off = {0}, 0
    while off < len(data):
        off += (int.from_bytes(data[off : off + 4], "little") + 3) & ~3
        boundaries.add(off)
    for cut in range(len(data)):
        try:
            list(c.iter_messages(data[:cut], Proto.TCP))
        except CodecError:
            assert cut not in boundaries
            continue
        except KernelError:
            assert name == "bad_bytecode"
            continue
        assert cut in boundaries, f"{name}: a cut at {cut} bytes was accepted"


ALL_GRAMS = [g for name in NAMES for g in datagrams(name)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.sampled_from(ALL_GRAMS),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 1 << 16),
    st.sampled_from(list(Proto)),
)
def test_mutated_real_datagrams_raise_only_codec_errors(data, flips, cut, proto):
    buf = bytearray(data)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    try:
        list(c.iter_messages(bytes(buf[: max(cut, 1)] if cut < len(buf) else buf), proto))
    except (CodecError, KernelError):
        pass
