"""The inet_diag codec on hand-built and random bytes (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebind.errors import CodecError, KernelError
from rebind.kernel import diag_codec as c
from rebind.model.records import Family, Proto, State, Timer


def _msg(kind: int, payload: bytes, flags: int = c.NLM_F_MULTI, seq: int = 1) -> bytes:
    n = c.NLMSGHDR.size + len(payload)
    return c.NLMSGHDR.pack(n, kind, flags, seq, 0) + payload + bytes((-n) % 4)


def _diag(
    state: int, sport: int, *, family: int = 2, timer: int = 0, expires: int = 0, inode: int = 7
) -> bytes:
    sid = c.SockId(sport, 0, bytes([127, 0, 0, 1]) + bytes(12), bytes(16), 0, 42)
    body = c.MSG_HEAD.pack(family, state, timer, 0) + sid.pack() + c.MSG_TAIL.pack(expires, 0, 0, 1000, inode)
    attr = struct.pack("=HHB3x", 5, c.Attr.SKV6ONLY, 1) if family == 10 else b""
    cg = struct.pack("=HHQ", 12, c.Attr.CGROUP_ID, 99)
    return body + attr + cg


def test_decodes_listener_and_done():
    data = _msg(c.SOCK_DIAG_BY_FAMILY, _diag(10, 8080)) + _msg(c.NLMSG_DONE, struct.pack("=i", 0))
    msgs = list(c.iter_messages(data, Proto.TCP))
    rec, done = msgs
    assert isinstance(done, c.Done)
    assert rec.state is State.LISTEN and rec.local.port == 8080 and str(rec.local.addr) == "127.0.0.1"
    assert rec.uid == 1000 and rec.inode == 7 and rec.cookie == 42 and rec.cgroup_id == 99


def test_tcp_close_means_bound_inactive_and_udp_close_stays():
    data = _msg(c.SOCK_DIAG_BY_FAMILY, _diag(7, 1))
    assert next(c.iter_messages(data, Proto.TCP)).state is State.BOUND_INACTIVE  # type: ignore[union-attr]
    assert next(c.iter_messages(data, Proto.UDP)).state is State.CLOSE  # type: ignore[union-attr]


def test_time_wait_is_a_mini_socket_without_owner():
    data = _msg(c.SOCK_DIAG_BY_FAMILY, _diag(6, 1, timer=3, expires=41_000, inode=0))
    rec = next(c.iter_messages(data, Proto.TCP))
    assert rec.is_mini and rec.uid is None and rec.inode is None  # type: ignore[union-attr]
    assert rec.expires_ms == 41_000 and rec.timer is Timer.TIME_WAIT  # type: ignore[union-attr]


def test_ipv6_v6only_attribute():
    rec = next(c.iter_messages(_msg(c.SOCK_DIAG_BY_FAMILY, _diag(10, 1, family=10)), Proto.TCP))
    assert rec.family is Family.INET6 and rec.v6only is True  # type: ignore[union-attr]


def test_error_message_raises_kernel_error_with_errno():
    data = _msg(c.NLMSG_ERROR, struct.pack("=i", -22) + bytes(16))
    with pytest.raises(KernelError) as exc:
        list(c.iter_messages(data, Proto.TCP))
    assert exc.value.errno == 22


def test_ack_and_done_with_error():
    assert isinstance(next(c.iter_messages(_msg(c.NLMSG_ERROR, bytes(20)), Proto.TCP)), c.Ack)
    with pytest.raises(KernelError):
        list(c.iter_messages(_msg(c.NLMSG_DONE, struct.pack("=i", -1)), Proto.TCP))


def test_type_is_dispatched_before_family():
    # An NLMSG_DONE whose payload happens to look like an AF_INET socket is still the end.
    data = _msg(c.NLMSG_DONE, _diag(10, 80))
    assert isinstance(next(c.iter_messages(data, Proto.TCP)), c.Done)


def test_truncated_inputs_raise_codec_error():
    whole = _msg(c.SOCK_DIAG_BY_FAMILY, _diag(10, 8080))
    for cut in range(1, len(whole)):
        try:
            list(c.iter_messages(whole[:cut], Proto.TCP))
        except CodecError:
            continue
        pytest.fail(f"truncation at {cut} was accepted")


def test_port_filter_layout():
    one = c.port_filter([8080])
    assert one == struct.pack("=BBH", c.BcOp.S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, 8080)
    two = c.port_filter([81, 80])
    assert len(two) == 20  # S_EQ 80, port, JMP over the rest, S_EQ 81, port
    assert struct.unpack_from("=BBH", two, 8) == (c.BcOp.JMP, 4, 12)
    with pytest.raises(ValueError):
        c.port_filter([])


def _run_bc(bc: bytes, sport: int) -> bool:
    """A Python copy of inet_diag_bc_run for the ops we emit."""
    off, length = 0, len(bc)
    while length > 0:
        code, yes, no = struct.unpack_from("=BBH", bc, off)
        if code == c.BcOp.JMP:
            ok = False
        elif code == c.BcOp.S_EQ:
            ok = sport == struct.unpack_from("=BBH", bc, off + 4)[2]
        elif code == c.BcOp.S_GE:
            ok = sport >= struct.unpack_from("=BBH", bc, off + 4)[2]
        elif code == c.BcOp.S_LE:
            ok = sport <= struct.unpack_from("=BBH", bc, off + 4)[2]
        else:
            raise AssertionError(code)
        step = yes if ok else no
        off += step
        length -= step
    return length == 0


@given(st.sets(st.integers(1, 65535), min_size=1, max_size=40), st.integers(1, 65535))
def test_port_filter_semantics(ports, probe):
    bc = c.port_filter(ports)
    assert _run_bc(bc, probe) == (probe in ports)
    for p in ports:
        assert _run_bc(bc, p)


@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 65535))
def test_port_range_filter_semantics(lo, hi, probe):
    assert _run_bc(c.port_range_filter(lo, hi), probe) == (lo <= probe <= hi)


@settings(max_examples=500)
@given(st.binary(max_size=400), st.sampled_from(list(Proto)))
def test_random_bytes_raise_only_codec_errors(data, proto):
    try:
        list(c.iter_messages(data, proto))
    except (CodecError, KernelError):
        pass


@settings(max_examples=300)
@given(st.integers(0, 400), st.binary(min_size=0, max_size=8))
def test_corrupted_valid_stream_raises_only_codec_errors(cut, junk):
    whole = _msg(c.SOCK_DIAG_BY_FAMILY, _diag(10, 8080)) + _msg(c.NLMSG_DONE, struct.pack("=i", 0))
    data = whole[:cut] + junk + whole[cut + len(junk) :]
    try:
        list(c.iter_messages(data, Proto.TCP))
    except (CodecError, KernelError):
        pass


def test_done_with_negative_error_carries_errno():
    with pytest.raises(KernelError) as exc:
        list(c.iter_messages(_msg(c.NLMSG_DONE, struct.pack("=i", -16)), Proto.TCP))
    assert exc.value.errno == 16 and not isinstance(exc.value, CodecError)
    # A DONE without the int (old kernels) or with 0 is a clean end.
    assert isinstance(next(c.iter_messages(_msg(c.NLMSG_DONE, b""), Proto.TCP)), c.Done)
    done = next(
        c.iter_messages(_msg(c.NLMSG_DONE, bytes(4), flags=c.NLM_F_MULTI | c.NLM_F_DUMP_INTR), Proto.TCP)
    )
    assert done == c.Done(1, interrupted=True)


@pytest.mark.parametrize("kind", [c.NLMSG_ERROR, c.NLMSG_DONE])
@pytest.mark.parametrize("err", [-(2**31), -4096, 1, 2**31 - 1])
def test_impossible_error_codes_are_codec_errors(kind, err):
    # Found by the structured Hypothesis test below: INT_MIN used to escape as OverflowError
    # (os.strerror(2**31)), and a positive NLMSG_ERROR became a KernelError with a negative errno.
    if kind == c.NLMSG_DONE and err > 0:
        assert isinstance(next(c.iter_messages(_msg(kind, struct.pack("=i", err)), Proto.TCP)), c.Done)
        return
    with pytest.raises(CodecError):
        list(c.iter_messages(_msg(kind, struct.pack("=i", err) + bytes(16)), Proto.TCP))


def test_overrun_and_unknown_types():
    with pytest.raises(KernelError) as exc:
        list(c.iter_messages(_msg(c.NLMSG_OVERRUN, b""), Proto.TCP))
    assert exc.value.errno == 105  # ENOBUFS
    with pytest.raises(CodecError):
        list(c.iter_messages(_msg(99, bytes(8)), Proto.TCP))
    assert list(c.iter_messages(_msg(c.NLMSG_NOOP, b""), Proto.TCP)) == []


def test_unknown_family_and_state_are_codec_errors():
    with pytest.raises(CodecError, match="family"):
        list(c.iter_messages(_msg(c.SOCK_DIAG_BY_FAMILY, _diag(10, 1, family=7)), Proto.TCP))
    with pytest.raises(CodecError, match="state"):
        list(c.iter_messages(_msg(c.SOCK_DIAG_BY_FAMILY, _diag(0, 1)), Proto.TCP))


def test_port_range_filter_layout_and_limits():
    bc = c.port_range_filter(8000, 8999)
    assert struct.unpack("=BBHBBHBBHBBH", bc) == (
        c.BcOp.S_GE,
        8,
        20,
        0,
        0,
        8000,
        c.BcOp.S_LE,
        8,
        12,
        0,
        0,
        8999,
    )
    assert len(c.port_filter(range(1, c.MAX_FILTER_PORTS + 1))) == 12 * c.MAX_FILTER_PORTS - 4
    with pytest.raises(ValueError):
        c.port_filter(range(1, c.MAX_FILTER_PORTS + 2))
    # The request attribute's u16 length must hold the largest filter.
    req = c.dump_request(
        Family.INET, Proto.TCP, 0xFFFF, bytecode=c.port_filter(range(1, c.MAX_FILTER_PORTS + 1))
    )
    (attr_len,) = struct.unpack_from("=H", req, c.NLMSGHDR.size + c.REQ_V2_HEAD.size + c.SOCKID_SIZE)
    assert attr_len == 4 + 12 * c.MAX_FILTER_PORTS - 4


def test_any_family_request_layout():
    req = c.dump_request_tcp_any_family(State.LISTEN.bit | State.BOUND_INACTIVE.bit, sport=8080, seq=7)
    length, kind, flags, seq, _ = c.NLMSGHDR.unpack_from(req)
    assert (length, kind, seq) == (len(req), c.TCPDIAG_GETSOCK, 7) and flags & c.NLM_F_DUMP
    sid = c.SockId.unpack_from(req, c.NLMSGHDR.size + c.REQ_V1_HEAD.size)
    assert sid.sport == 8080 and sid.dport == 0
    states, _dbs = c.REQ_V1_TAIL.unpack_from(req, c.NLMSGHDR.size + c.REQ_V1_HEAD.size + c.SOCKID_SIZE)
    assert states == (1 << 10) | (1 << 13)


# Structured input: well-framed netlink messages of every type with random payloads, so the
# decoder's inner paths (errors, attributes, states, families) are reached, not just framing.
def _frame(kind: int, flags: int, payload: bytes) -> bytes:
    n = c.NLMSGHDR.size + len(payload)
    return c.NLMSGHDR.pack(n, kind, flags, 1, 0) + payload + bytes((-n) % 4)


_attr = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12)).map(
    lambda t: struct.pack("=HH", 4 + len(t[1]), t[0]) + t[1] + bytes((-(4 + len(t[1]))) % 4)
)
_diag_payload = st.tuples(
    st.sampled_from([2, 10, 0, 1, 255]),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(min_size=c.MSG_SIZE - 4, max_size=c.MSG_SIZE - 4),
    st.lists(_attr, max_size=4).map(b"".join),
).map(lambda t: bytes([t[0], t[1], t[2], 0]) + t[3] + t[4])
_err_payload = st.integers(-(2**31), 2**31 - 1).map(lambda e: struct.pack("=i", e) + bytes(16))
_message = st.one_of(
    st.tuples(
        st.sampled_from([c.SOCK_DIAG_BY_FAMILY, c.TCPDIAG_GETSOCK]), st.integers(0, 0xFFFF), _diag_payload
    ),
    st.tuples(st.just(c.NLMSG_ERROR), st.integers(0, 0xFFFF), _err_payload),
    st.tuples(st.just(c.NLMSG_DONE), st.integers(0, 0xFFFF), st.one_of(_err_payload, st.binary(max_size=8))),
    st.tuples(st.integers(0, 40), st.integers(0, 0xFFFF), st.binary(max_size=80)),
).map(lambda t: _frame(*t))


@settings(max_examples=1500, deadline=None)
@given(st.lists(_message, max_size=4).map(b"".join), st.integers(0, 600), st.sampled_from(list(Proto)))
def test_structured_netlink_raises_only_codec_errors(data, cut, proto):
    try:
        for msg in c.iter_messages(data[:cut], proto):
            assert isinstance(msg, c.SocketRecord | c.Done | c.Ack)
    except (CodecError, KernelError) as exc:
        assert exc.errno is None or 0 < exc.errno <= c.MAX_ERRNO
