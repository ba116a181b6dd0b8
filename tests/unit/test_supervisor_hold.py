"""`rebind run`'s binding (supervisor/hold.py), without root or the network."""

from __future__ import annotations

import socket

import pytest

from rebind.errors import ExitCode, UsageError
from rebind.supervisor.hold import BindFailed, bind_all
from rebind.supervisor.spec import ListenSpec


def test_an_unresolvable_host_is_a_usage_error_and_closes_what_was_adopted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo's gaierror never reaches bind_all as an OSError (it used to have its own
    `except socket.gaierror`, dead code): listen.resolve() makes it a UsageError, exit 2, not
    BindFailed's exit 1. A socket systemd passed for another --listen is closed, not leaked."""

    def no_such_host(*_a: object, **_k: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    adopted, other = socket.socketpair()  # stands in for a passed socket (no network touched)
    specs = [ListenSpec("notahost.invalid", 8080, "web"), ListenSpec("", 8081, "api")]
    try:
        with pytest.raises(UsageError, match=r"cannot resolve host 'notahost\.invalid'") as info:
            bind_all(specs, reuseport=False, backlog=None, adopted={1: adopted})
        assert not isinstance(info.value, BindFailed)
        assert info.value.exit_code == int(ExitCode.USAGE)
        assert adopted.fileno() == -1  # closed
    finally:
        adopted.close()
        other.close()
