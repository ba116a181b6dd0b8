"""rebind top marks localhost split-brain ports (issue 20): the view model's mark, the port
cell, and one event line when a port becomes split."""

from __future__ import annotations

from rebind.model.conflict import KernelSettings
from rebind.model.localhost import LocalhostResolution
from rebind.model.records import Endpoint, Family, Owner, Proto, SocketEntry, SocketRecord, State
from rebind.top.model import build_ports

RES = LocalhostResolution(order=(Family.INET6, Family.INET))


def listener(addr: str, pid: int, port: int = 5173) -> SocketEntry:
    fam = Family.INET6 if ":" in addr else Family.INET
    rec = SocketRecord(
        Proto.TCP,
        fam,
        State.LISTEN,
        Endpoint.parse(addr, port),
        Endpoint.parse("::" if fam is Family.INET6 else "0.0.0.0", 0),
        0,
        pid,
    )
    return SocketEntry(rec, (Owner(pid=pid, fd=3, name=f"srv{pid}", start_ticks=pid),))


def views(entries: list[SocketEntry], res: LocalhostResolution | None = RES) -> dict[int, str | None]:
    ports = build_ports(entries, settings=KernelSettings(), uid=0, localhost=res)
    return {v.key.port: v.localhost for v in ports}


def test_split_port_is_marked() -> None:
    got = views([listener("127.0.0.1", 10), listener("::1", 20), listener("0.0.0.0", 30, 8080)])
    assert got == {5173: "localhost-split", 8080: None}  # a wildcard v4-only server: no mark


def test_same_process_and_no_resolution_are_not_marked() -> None:
    assert views([listener("127.0.0.1", 10), listener("::1", 10)]) == {5173: None}
    assert views([listener("127.0.0.1", 10), listener("::1", 20)], res=None) == {5173: None}


def test_loopback_one_family_is_marked_when_a_client_is_refused() -> None:
    v4_only = LocalhostResolution(order=(Family.INET,))
    # localhost resolves to 127.0.0.1 only: a ::1-only server refuses curl and Node
    assert views([listener("::1", 20)], res=v4_only) == {5173: "lh:v6-only"}
    # ::1 first: every kind of client reaches it -- nothing to mark
    assert views([listener("::1", 20)]) == {5173: None}
    # 127.0.0.1 only, localhost is 127.0.0.1 only: everyone reaches it
    assert views([listener("127.0.0.1", 20)], res=v4_only) == {5173: None}
    # 127.0.0.1 only, ::1 first: Node 17-19 gets ECONNREFUSED ::1
    assert views([listener("127.0.0.1", 20)]) == {5173: "lh:v4-only"}


def test_port_cell_shows_the_mark() -> None:
    from rebind.top.cells import row_cells

    (view,) = build_ports(
        [listener("127.0.0.1", 10), listener("::1", 20)], settings=KernelSettings(), uid=0, localhost=RES
    )
    cells = row_cells(view, view.rows[0], True, 0.0, 0.0)
    assert cells[0].plain == "5173/tcp localhost-split"
    assert row_cells(view, view.rows[1], False, 0.0, 0.0)[0].plain == ""
