"""rebind top's pure view model: rows, countdowns, bars, filtering, bindable-now, cadence."""

from __future__ import annotations

from ipaddress import ip_address

from rebind.model.conflict import KernelSettings
from rebind.model.records import Endpoint, Family, Owner, Proto, SocketEntry, SocketRecord, State, Timer
from rebind.top.cadence import Cadence, Job
from rebind.top.model import (
    Bindable,
    OwnerView,
    PortKey,
    assess_bindable,
    bar,
    build_ports,
    build_rows,
    filter_ports,
    fmt_left,
    left_now,
    owners_text,
    reduce_holders,
)

SETTINGS = KernelSettings()


def rec(
    state: State,
    port: int = 8080,
    *,
    addr: str = "127.0.0.1",
    remote: tuple[str, int] = ("0.0.0.0", 0),
    proto: Proto = Proto.TCP,
    expires: int | None = None,
    rq: int = 0,
    wq: int = 0,
    inode: int | None = 1,
    uid: int | None = 0,
) -> SocketRecord:
    mini = state in (State.TIME_WAIT, State.FIN_WAIT2) and expires is not None
    return SocketRecord(
        proto=proto,
        family=Family.INET6 if ":" in addr else Family.INET,
        state=state,
        local=Endpoint.parse(addr, port),
        remote=Endpoint.parse(*remote),
        uid=None if mini else uid,
        inode=None if mini else inode,
        timer=Timer.TIME_WAIT if mini else Timer.NONE,
        expires_ms=expires,
        rqueue=rq,
        wqueue=wq,
    )


def owner(pid: int, name: str = "srv", user: str = "root") -> Owner:
    return Owner(pid=pid, fd=3, name=name, user=user, start_ticks=pid * 10)


def test_rows_group_leftovers_and_keep_holders_apart() -> None:
    entries = [
        SocketEntry(rec(State.LISTEN, rq=3, wq=128), (owner(10),)),
        SocketEntry(rec(State.TIME_WAIT, remote=("127.0.0.1", 40000), expires=30_000)),
        SocketEntry(rec(State.TIME_WAIT, remote=("127.0.0.1", 40001), expires=50_000)),
        SocketEntry(rec(State.ESTABLISHED, remote=("127.0.0.1", 40002), inode=7), (owner(10),)),
    ]
    rows = build_rows(entries)
    assert [r.state for r in rows] == [State.LISTEN, State.ESTABLISHED, State.TIME_WAIT]
    listen, estab, tw = rows
    assert (listen.queue, listen.backlog, listen.group) == (3, 128, 1)
    assert tw.count == 2 and tw.left_ms == 50_000  # the port frees when the longest one expires
    assert estab.count == 1 and estab.owners[0].pid == 10


def test_reuseport_group_size() -> None:
    entries = [SocketEntry(rec(State.LISTEN, inode=i), (owner(i),)) for i in (1, 2, 3)]
    entries.append(SocketEntry(rec(State.LISTEN, addr="127.0.0.2", inode=4), (owner(4),)))
    rows = build_rows(entries)
    assert sorted(r.group for r in rows) == [1, 3, 3, 3]


def test_watched_port_without_sockets_is_shown_and_bindable() -> None:
    (view,) = build_ports([], settings=SETTINGS, uid=0, watched=[PortKey(8080, Proto.TCP)])
    assert view.rows == () and view.watched and view.bindable is Bindable.YES and not view.held


def test_bindable_by_the_model() -> None:
    key = PortKey(8080, Proto.TCP)
    assert assess_bindable(key, [rec(State.LISTEN)], SETTINGS, 0) is Bindable.NO
    # A TIME_WAIT blocks a plain bind; with SO_REUSEADDR it depends on the TIME_WAIT's own flag.
    tw = rec(State.TIME_WAIT, remote=("127.0.0.1", 1), expires=1000)
    assert assess_bindable(key, [tw], SETTINGS, 0) is Bindable.NO
    # Another port's or protocol's sockets are ignored.
    assert assess_bindable(key, [rec(State.LISTEN, port=8081)], SETTINGS, 0) is Bindable.YES
    assert assess_bindable(key, [rec(State.CLOSE, proto=Proto.UDP)], SETTINGS, 0) is Bindable.YES
    # An accepted connection blocks a plain bind; with SO_REUSEADDR it depends on its own flag,
    # which inet_diag does not report: still a plain "no", never a guessed "yes".
    est = rec(State.ESTABLISHED, remote=("127.0.0.1", 5))
    assert assess_bindable(key, [est], SETTINGS, 0) is Bindable.NO


def test_reduce_holders_keeps_one_per_conflict_kind_with_the_longest_timer() -> None:
    tws = [rec(State.TIME_WAIT, remote=("127.0.0.1", 40000 + i), expires=1000 * i) for i in range(1, 500)]
    (one,) = reduce_holders(tws)
    assert one.expires_ms == 499_000
    key = PortKey(8080, Proto.TCP)
    assert assess_bindable(key, tws, SETTINGS, 0) is assess_bindable(key, [one], SETTINGS, 0)


def test_countdown_and_format() -> None:
    assert left_now(10_000, sampled_mono=100.0, now_mono=103.5) == 6_500
    assert left_now(1_000, 100.0, 200.0) == 0
    assert left_now(None, 0, 1) is None
    assert fmt_left(6_500) == "7s"  # rounded up: never "0s" while it still blocks
    assert fmt_left(59_001) == "60s"
    assert fmt_left(125_000) == "2m05s"
    assert fmt_left(None) == ""


def test_queue_bar() -> None:
    assert bar(0, 8, width=8) == "░░░░░░░░ 0/8"
    assert bar(4, 8, width=8) == "████░░░░ 4/8"
    assert bar(1, 4096, width=6) == "█░░░░░ 1/4096"  # a non-empty queue is never drawn empty
    assert bar(9, 8, width=4) == "████ 9/8"
    assert bar(None, None) == ""


def test_filter_terms_all_must_match() -> None:
    views = build_ports(
        [
            SocketEntry(rec(State.LISTEN, port=80), (owner(1, "nginx", "www"),)),
            SocketEntry(rec(State.LISTEN, port=5432), (owner(2, "postgres", "postgres"),)),
            SocketEntry(rec(State.CLOSE, port=53, proto=Proto.UDP), (owner(3, "dnsmasq"),)),
        ],
        settings=SETTINGS,
        uid=0,
    )
    assert [str(v.key) for v in filter_ports(views, "nginx")] == ["80/tcp"]
    assert [str(v.key) for v in filter_ports(views, "udp")] == ["53/udp"]
    assert [str(v.key) for v in filter_ports(views, "POSTGRES listen")] == ["5432/tcp"]
    assert [str(v.key) for v in filter_ports(views, "postgres udp")] == []
    assert len(filter_ports(views, "  ")) == 3
    assert [str(v.key) for v in filter_ports(views, "543")] == ["5432/tcp"]


def test_hostile_names_are_escaped() -> None:
    evil = OwnerView(pid=7, name="\x1b]0;pwned\x07[red]x[/]", user="\x1b[2Jroot")
    text = owners_text([evil])
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;pwned\\x07" in text and "[red]x[/]" in text  # shown, not interpreted
    assert "\x1b" not in evil.label and "\x1b" not in evil.detail


def test_owners_text_limit() -> None:
    views = [OwnerView(pid=i, name="w") for i in range(5)]
    assert owners_text(views, limit=2) == "w[0], w[1] +3"
    assert owners_text([]) == ""


def test_cadence_budget() -> None:
    job = Job(share=0.01)
    assert job.due(0.0, 1.0)  # never run
    job.ran(0.0, cost=0.005)  # cheap: every refresh
    assert job.due(1.0, 1.0)
    job.ran(1.0, cost=0.2)  # 200 ms of CPU at 1% share: every 20 s
    assert not job.due(5.0, 1.0)
    assert job.due(21.0, 1.0)
    job.forced = True
    assert job.due(1.5, 1.0)
    job.ran(2.0, cost=10.0)  # never staler than MAX_PERIOD
    assert job.due(32.0, 1.0)
    cad = Cadence(1.0)
    cad.job("a").ran(0, 0.001)
    cad.job("b").ran(0, 0.1)
    assert set(cad.slowed()) == {"b"}
    assert ip_address("127.0.0.1")  # keep the import honest


# --- fitting the owners column (interop 2026-12-05 §5: cut at 80 columns without a sign) -----


def test_fit_owners_prefers_whole_owners_then_labels_then_an_ellipsis() -> None:
    from rebind.top.model import OwnerView, fit_owners

    a = OwnerView(pid=4205, name="rebind", user="root")
    b = OwnerView(pid=4252, name="python", user="root")
    assert fit_owners((a, b), 80) == "rebind[4205] root, python[4252] root"
    assert fit_owners((a, b), 30) == "rebind[4205], python[4252]"  # both owners still seen
    short = fit_owners((a, b), 20)
    assert short.endswith("…") and len(short) == 20 and short.startswith("rebind[4205], ")
    assert fit_owners((a,), 8) == "rebind[…"
    wide = OwnerView(pid=1, name="日本語サーバー", user="root")
    from rich.cells import cell_len

    assert cell_len(fit_owners((wide,), 9)) <= 9 and fit_owners((wide,), 9).endswith("…")


def test_owners_width_leaves_the_rest_of_the_screen_to_owners() -> None:
    from rich.text import Text

    from rebind.top.cells import COLUMNS, MIN_OWNERS_WIDTH, owners_width

    row = [
        Text("8080/tcp"),
        Text("✗"),
        Text("LISTEN"),
        Text("127.0.0.1"),
        Text(""),
        Text("░░░░░░ 0/8"),
        Text("x"),
    ]
    assert len(row) == len(COLUMNS)
    # port 8, bind 4, state 6, addr 9, left 4, queue 10: each +2 padding; owners' own padding
    # and a scrollbar cell.
    assert owners_width([row], 80) == 80 - (8 + 4 + 6 + 9 + 4 + 10 + 6 * 2) - 2 - 1
    assert owners_width([row], 40) == MIN_OWNERS_WIDTH


def test_wait_status_names_the_blocker_and_the_countdown() -> None:
    from dataclasses import dataclass

    from rebind.actions.wait import WaitResult
    from rebind.top.keys import wait_status

    @dataclass
    class D:
        headline: str

    res = WaitResult(ok=False, elapsed=1.0, diagnosis=D("9000/tcp is busy: a TIME_WAIT — free in 41 s"))  # type: ignore[arg-type]
    assert wait_status(res, 3.2) == "still busy: 9000/tcp is busy: a TIME_WAIT — free in 41 s · waiting 3s"
    hostile = WaitResult(ok=False, elapsed=1.0, diagnosis=D("x\x1b[2J\u200f"))  # type: ignore[arg-type]
    assert "\x1b" not in wait_status(hostile, 0) and "\u200f" not in wait_status(hostile, 0)


def test_bindable_with_so_reuseaddr_when_the_kernel_read_the_leftovers_flag() -> None:
    """✓ra: a plain bind fails, one with SO_REUSEADDR works -- reachable only once the TIME_WAIT's
    own tw_reuse is read (top's kernel-state job); without SO_REUSEADDR on it, still ✗."""
    from dataclasses import replace

    from tests.unit.test_exporter import _kernel_state

    key = PortKey(8080, Proto.TCP)
    tw = replace(rec(State.TIME_WAIT, remote=("127.0.0.1", 50001), expires=1000), cookie=77)
    for reuse, want in ((1, Bindable.REUSEADDR), (0, Bindable.NO)):
        kernel = {77: _kernel_state(tw, reuse)}
        assert assess_bindable(key, [tw], SETTINGS, 0, kernel) is want, reuse
