"""The exporter's lean dump loops (exporter/fastdiag.py) read the netlink framing as the codec
does: a dump's end, an error, an overrun and a no-op message, whichever loop meets them."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from rebind.errors import CodecError, KernelError
from rebind.exporter import fastdiag
from rebind.exporter.tally import Tally
from rebind.kernel import diag_codec as codec
from rebind.kernel.netlink import message


class _Sock:
    """A netlink socket that answers one request with the datagrams given."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = list(datagrams)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        data = self.datagrams.pop(0)
        buf[: len(data)] = data
        return len(data)


class _Diag:
    def __init__(self, datagrams: list[bytes]) -> None:
        self._sock = _Sock(datagrams)


def _socket_msg(sport: int) -> bytes:
    """An inet_diag_msg of an IPv4 ESTABLISHED socket 127.0.0.1:sport -> 127.0.0.2:80."""
    src, dst = bytes([127, 0, 0, 1]) + bytes(12), bytes([127, 0, 0, 2]) + bytes(12)
    body = fastdiag.MSG.pack(2, 1, 0, 0, 0, 0, src, dst, 0, 1, 2, 0, 0, 0, 0, 0)
    body = body[:4] + struct.pack(">HH", sport, 80) + body[8:]
    return message(codec.SOCK_DIAG_BY_FAMILY, 0, 1, body)


def _done(err: int = 0) -> bytes:
    return message(codec.NLMSG_DONE, 0, 1, struct.pack("=i", err))


def _error(err: int) -> bytes:
    return message(codec.NLMSG_ERROR, 0, 1, struct.pack("=i", err) + bytes(16))


def _dump(d: _Diag) -> list[Any]:
    return [r[3] for r in fastdiag.dump(d, b"req")]  # type: ignore[arg-type]


def _first(d: _Diag) -> list[Any]:
    return sorted(fastdiag.first_per_port(d, b"req", set()))  # type: ignore[arg-type]


def _scan(d: _Diag) -> list[Any]:
    return fastdiag.scan_conns(d, b"req", Tally((), ()))  # type: ignore[arg-type]


LOOPS: list[Callable[[_Diag], list[Any]]] = [_dump, _first, _scan]


@pytest.mark.parametrize("loop", LOOPS)
def test_the_dump_ends_at_done_across_datagrams_and_skips_a_noop(loop: Callable[[_Diag], list[Any]]) -> None:
    noop = message(codec.NLMSG_NOOP, 0, 1, b"")
    d = _Diag([_socket_msg(40000) + noop, _socket_msg(40001) + _done()])
    got = loop(d)
    assert d._sock.sent == [b"req"]
    if loop is _scan:
        assert got == []  # nothing the model needs: no watched port
    else:
        assert got == [40000, 40001]


@pytest.mark.parametrize("loop", LOOPS)
def test_an_error_message_raises_with_its_errno(loop: Callable[[_Diag], list[Any]]) -> None:
    with pytest.raises(KernelError) as exc:
        loop(_Diag([_socket_msg(40000) + _error(-13)]))
    assert exc.value.errno == 13


@pytest.mark.parametrize("loop", LOOPS)
def test_an_ack_is_not_an_error(loop: Callable[[_Diag], list[Any]]) -> None:
    loop(_Diag([_error(0) + _done()]))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failed_dump_and_an_overrun_raise(loop: Callable[[_Diag], list[Any]]) -> None:
    with pytest.raises(KernelError):
        loop(_Diag([_done(-16)]))
    with pytest.raises(KernelError, match="overrun"):
        loop(_Diag([message(codec.NLMSG_OVERRUN, 0, 1, b"")]))


@pytest.mark.parametrize("loop", LOOPS)
def test_bad_lengths_are_codec_errors(loop: Callable[[_Diag], list[Any]]) -> None:
    short = message(codec.SOCK_DIAG_BY_FAMILY, 0, 1, bytes(8))
    with pytest.raises(CodecError):
        loop(_Diag([short]))
    beyond = bytearray(_socket_msg(40000))
    beyond[0:4] = struct.pack("=I", len(beyond) + 64)
    with pytest.raises(CodecError):
        loop(_Diag([bytes(beyond)]))
