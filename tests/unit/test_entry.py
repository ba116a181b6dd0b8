"""The console entry point prefetches only for plain `ls PORT…` queries."""

from __future__ import annotations

import pytest

from rebind.cli.entry import _ls_ports


@pytest.mark.parametrize(
    ("argv", "ports"),
    [
        (["ls", "8080"], (8080,)),
        (["ls", "80", "443", "--json", "--no-owners"], (80, 443)),
        (["ls"], ()),
        (["ls", "8080", "--udp"], ()),  # another query than the prefetch asks
        (["ls", "127.0.0.1:8080"], ()),
        (["ls", "0"], ()),
        (["ls", "70000"], ()),
        (["ls", "1²"], ()),  # isdigit() is true, int() raises: the CLI reports it, no traceback
        (["ls", "²"], ()),
        (["ls", "٣"], ()),
        (["why", "8080"], ()),
        ([], ()),
    ],
)
def test_ls_ports(argv, ports):
    assert _ls_ports(argv) == ports


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["why", "8080"], (8080, False)),
        (["8080"], (8080, False)),
        (["8080", "--udp", "--json"], (8080, True)),
        (["why", "8080", "--reuseaddr"], (8080, False)),
        (["why", "8080", "--addr", "::1"], None),  # not a plain query: no prefetch
        (["why", "0"], None),
        (["²"], None),
        (["why", "1²"], None),
        (["٣"], None),
        (["ls", "8080"], None),
        (["why"], None),
    ],
)
def test_why_port(argv, expect):
    from rebind.cli.entry import _why_port

    assert _why_port(argv) == expect
