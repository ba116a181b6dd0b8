"""Bad input to the Python API is a UsageError with one clear message, never struct.error,
KeyError, TypeError or a hang (issue 8 items 6, 9); one address spelling everywhere (item 20).
No root needed: validation happens before any socket is opened."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import pytest

from rebind.actions.pick import check_range, parse_range, pick_port
from rebind.actions.wait import NotWaitable, wait_bindable, wait_listening
from rebind.cli import render
from rebind.errors import ExitCode, UsageError
from rebind.model.records import Endpoint, fmt_addr
from rebind.sockets import socket_table


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ports": [70000]},
        {"ports": [0]},
        {"ports": [-1]},
        {"ports": ["²"]},
        {"ports": [True]},
        {"ports": "8080"},  # a string is not a list of ports (it would be '8', '0', ...)
        {"ports": 8080},
        {"protos": ["sctp"]},
        {"protos": "tcp"},
        {"protos": []},
        {"families": ["ipx"]},
        {"families": [socket.AF_UNIX]},
        {"states": ["bogus"]},
        {"states": [99]},
    ],
    ids=repr,
)
def test_socket_table_rejects_bad_filters(kwargs):
    with pytest.raises(UsageError) as err:
        socket_table(owners=False, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port_range": ("a", "b")},
        {"port_range": (1, 70000)},
        {"port_range": (0, 10)},
        {"port_range": (30, 20)},
        {"port_range": "20000-21000"},
        {"port_range": (1, 2, 3)},
        {"port_range": None, "proto": "sctp"},
        {"lease": float("inf")},
        {"lease": float("nan")},
        {"lease": -1},
        {"lease": 1e300},
    ],
    ids=repr,
)
def test_pick_port_rejects_bad_arguments(kwargs):
    with pytest.raises(UsageError):
        pick_port(**kwargs)


@pytest.mark.parametrize("text", ["²-³", "1-²", "a-b", "20000-", "-5", "", "1-70000", "٣"])
def test_parse_range_rejects(text):
    with pytest.raises(UsageError):
        parse_range(text)


def test_ranges_accepted():
    assert parse_range("20000-21000") == (20000, 21000)
    assert parse_range("80") == (80, 80)
    assert check_range([1, 2]) == (1, 2)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), float("-inf"), 1e300, -1])
def test_wait_rejects_non_finite_timeouts(timeout):
    with pytest.raises(UsageError):
        wait_bindable(1, timeout=timeout)
    with pytest.raises(UsageError):
        wait_listening(1, timeout=timeout)


def test_wait_rejects_bad_interval():
    for interval in (0, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            wait_bindable(1, timeout=1, interval=interval)


def test_not_waitable_exit_code_follows_errno():
    import errno

    assert NotWaitable("x", errno.EACCES).exit_code == ExitCode.ENVIRONMENT
    assert NotWaitable("x", errno.EAFNOSUPPORT).exit_code == ExitCode.ENVIRONMENT
    assert NotWaitable("x", errno.EINVAL).exit_code == ExitCode.USAGE


def test_ipv4_mapped_addresses_print_dotted_everywhere():
    mapped = ip_address("::ffff:127.0.0.1")
    assert fmt_addr(mapped) == "::ffff:127.0.0.1"
    assert str(Endpoint(mapped, 80)) == "[::ffff:127.0.0.1]:80"
    assert render.endpoint_json(Endpoint(mapped, 80)) == {"addr": "::ffff:127.0.0.1", "port": 80}
    for plain in ("::1", "::", "127.0.0.1", "fe80::1", "::127.0.0.1"):
        assert fmt_addr(ip_address(plain)) == str(ip_address(plain))
