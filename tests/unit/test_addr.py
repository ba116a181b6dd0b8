"""model/addr.py: the one address parser every entry point uses (issue 21)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import click
import pytest

from rebind.errors import UsageError
from rebind.model.addr import parse_ip, parse_source, parse_target, split_host_port, split_scope


@pytest.mark.parametrize(
    ("text", "alone", "want"),
    [
        ("8080", "port", (None, "8080")),
        ("8080", "host", ("8080", None)),
        ("8080", "guess", (None, "8080")),
        ("web", "guess", ("web", None)),
        ("127.0.0.1:80", "port", ("127.0.0.1", "80")),
        (":80", "port", ("", "80")),
        ("[::1]:80", "port", ("::1", "80")),
        ("[::1]", "host", ("::1", None)),
        ("::1", "host", ("::1", None)),
        (" [fe80::1%lo]:80 ", "port", ("fe80::1%lo", "80")),
    ],
)
def test_split_host_port(text: str, alone: str, want: tuple[str | None, str | None]) -> None:
    assert split_host_port(text, what="x", alone=alone) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "needle"), [("::1:80", "in brackets"), ("[::1:80", "bracketed"), ("[::1]x", "bracketed")]
)
def test_split_host_port_rejects(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        split_host_port(text, what="--opt")


def test_parse_ip() -> None:
    assert parse_ip("[::1]") == IPv6Address("::1")
    assert parse_ip("*", wildcard=True) == IPv4Address("0.0.0.0")
    assert split_scope("fe80::1%lo") == (IPv6Address("fe80::1"), "lo")
    assert split_scope(IPv4Address("127.0.0.1")) == (IPv4Address("127.0.0.1"), None)
    for bad, needle in [
        ("*", "not an IP address"),
        ("localhost", "not an IP address"),
        ("fe80::1%lo", "scope id is not accepted"),
        (IPv6Address("fe80::1%lo"), "scope id is not accepted"),
    ]:
        with pytest.raises(UsageError, match=needle):
            parse_ip(bad)
    for bad in ("127.0.0.1%lo", "fe80::1%"):
        with pytest.raises(UsageError, match="needs an IPv6 address and an interface name"):
            parse_ip(bad, scope=True)


def test_connect_target_and_source() -> None:
    assert parse_target("[::1]:80") == ("::1", 80)
    assert parse_target("example.org:443") == ("example.org", 443)
    assert parse_source("10.0.0.1") == (IPv4Address("10.0.0.1"), None)
    assert parse_source("::1") == (IPv6Address("::1"), None)
    assert parse_source("[::1]:0") == (IPv6Address("::1"), 0)
    for bad in ("127.0.0.1", "::1:80", "[::1]", "h:99999"):
        with pytest.raises(UsageError):
            parse_target(bad)


def test_every_entry_point_wants_brackets_around_ipv6_with_a_port() -> None:
    """`::1:80` is itself an IPv6 address: no entry point guesses where the port starts (the
    [ADDR:]PORT argument and --dest used to split it at the last colon, the others refused)."""
    from rebind.cli.exporter import parse_dests, parse_watches
    from rebind.cli.params import PORT_SPEC
    from rebind.exporter.serve import parse_listen as exporter_listen
    from rebind.supervisor.spec import parse_listen as run_listen

    for parse in (
        lambda t: PORT_SPEC.convert(t, None, None),
        lambda t: parse_dests((t,)),
        lambda t: parse_watches((t,)),
        exporter_listen,
        run_listen,
        parse_target,
    ):
        with pytest.raises((UsageError, click.BadParameter), match="brackets"):
            parse("::1:80")
    assert PORT_SPEC.convert("[::1]:80", None, None) == (IPv6Address("::1"), 80)


def test_device_must_be_a_name_whoever_builds_the_request() -> None:
    """The check default_request() alone made now sits in BindRequest.create (validation once):
    BindRequest.create(80, device=3) was an AttributeError traceback."""
    from rebind.diagnosis import default_request
    from rebind.model.request import BindRequest

    for build in (BindRequest.create, default_request):
        with pytest.raises(UsageError, match="device must be an interface name"):
            build(80, device=3)  # type: ignore[operator, arg-type]
