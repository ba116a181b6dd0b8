"""`rebind run`'s binds: a failed bind is explained for the protocol that failed (issue 18 item 14)."""

from __future__ import annotations

import socket

import pytest

from rebind.supervisor import listen as L


@pytest.mark.parametrize(("kind", "proto"), [(socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp")])
def test_failed_bind_is_explained_for_its_own_protocol(
    monkeypatch: pytest.MonkeyPatch, kind: int, proto: str
) -> None:
    asked: list[tuple[str, int, str]] = []

    def explain(host: str, port: int, p: str = "tcp", reuseaddr: bool = True, reuseport: bool = False) -> str:
        asked.append((host, port, p))
        return f"{port}/{p} is busy"

    monkeypatch.setattr("rebind.diagnosis.explain_bind_failure", explain)
    with socket.socket(socket.AF_INET, kind) as holder:  # no SO_REUSEADDR: the next bind fails
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        bind = L.bind_datagram if proto == "udp" else L.bind_listener
        with pytest.raises(OSError) as info:
            bind("127.0.0.1", port)
    assert asked == [("127.0.0.1", port, proto)]
    assert info.value.__notes__ == [f"{port}/{proto} is busy"]


def test_udp_explanation_wording_names_udp() -> None:
    """The real explanation (no root needed for the headline): UDP's rules, not TCP's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as info:
            L.bind_datagram("127.0.0.1", port)
    note = "\n".join(info.value.__notes__)
    assert note.startswith(f"{port}/udp "), note
    assert f"{port}/tcp" not in note and "listen()" not in note, note
