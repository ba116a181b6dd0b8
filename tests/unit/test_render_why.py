"""`rebind why`'s text (rebind.render.why), line by line: what each part of a diagnosis prints,
exactly, so that a line losing its words or its markup fails here (issue 21 item 6: most of
these lines survived string mutations; other tests only looked for substrings). The model's own
words (headline, reasons, fixes) have their tests in test_advice and test_conflict_words."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rebind.model.advice import Disagreement, OwnerView, advise
from rebind.model.conflict import Stage
from rebind.model.diagnosis import Fix
from rebind.model.records import State
from rebind.model.request import TrialResult
from rebind.render.why import diagnosis_lines, print_diagnosis
from tests.unit.test_advice import INUSE, OK, facts, held, owner, rec, request, tw

REQ = request()
ATTEMPTS_HEAD = "\n[bold]What works right now[/] [dim](kernel trial where harmless; model otherwise)[/]"
FIXES = (
    Fix("Stop it", "Only closing every fd frees it.", "rebind free 8080", "s.close()", "close(s);"),
    Fix("Use another port", "One that is free now."),
)
FIX_LINES = [
    "\n[bold]Fixes[/]",
    "  1. Stop it",
    "     [dim]Only closing every fd frees it.[/]",
    "     $ rebind free 8080",
    "     Python: s.close()",
    "     C:      close(s);",
    "  2. Use another port",
    "     [dim]One that is free now.[/]",
]
PLAIN_REASON = (
    "    LISTEN 0.0.0.0:8080 (without SO_REUSEADDR); its address overlaps yours and neither "
    "SO_REUSEADDR (both sides, not listening) nor SO_REUSEPORT (both sides, same user) applies"
)


def test_a_busy_listener_whole() -> None:
    d = advise(facts(REQ, held(rec("0.0.0.0"), owner(), ra=False, rp=False), trials={REQ: INUSE}))
    assert diagnosis_lines(replace(d, fixes=FIXES)) == [
        "[bold red]8080/tcp is busy: a live listener (redis-server (pid 42; user redis))[/]",
        "\n[bold]Blocking[/]",
        "  • tcp LISTEN 0.0.0.0:8080  held by redis-server[42]  [dim]SO_REUSEADDR off, SO_REUSEPORT off[/]",
        PLAIN_REASON,
        ATTEMPTS_HEAD,
        "  [red]✗[/] as asked                             bind() fails: EADDRINUSE",
        "  [red]✗[/] with SO_REUSEADDR                    bind() would fail (predicted)",
        "  [red]✗[/] with SO_REUSEPORT                    depends on a flag nobody can read",
        "  [red]✗[/] with SO_REUSEADDR and SO_REUSEPORT   depends on a flag nobody can read",
        "  [green]✓[/] on [::1]                             works (predicted)",
        *FIX_LINES,
    ]


def test_a_free_port_is_green_and_lists_no_attempts() -> None:
    d = advise(facts(REQ, trials={REQ: OK}))
    assert diagnosis_lines(replace(d, fixes=())) == [f"[bold green]{d.headline}[/]"]


def test_grouped_time_waits_one_line_with_count_time_left_and_flag_source() -> None:
    hs = [held(tw(remote_port=30000 + i, expires_ms=41_000)) for i in range(3)]
    d = advise(facts(REQ, *hs, trials={REQ: INUSE, replace(REQ, reuseaddr=True): OK}))
    lines = diagnosis_lines(d)
    blocking = lines[lines.index("\n[bold]Blocking[/]") + 1 :][:2]
    assert blocking == [
        "  • tcp TIME_WAIT 127.0.0.1:8080 → 3 peers, 41s left  [dim]SO_REUSEADDR on (inferred-trial)[/]",
        "    TIME_WAIT 127.0.0.1:8080 -> 127.0.0.1:30000 left by a socket with SO_REUSEADDR; it has "
        "SO_REUSEADDR but your socket does not; set SO_REUSEADDR before bind()",
    ]
    assert "  [green]✓[/] with SO_REUSEADDR                    works" in lines


def test_an_unknown_flag_and_the_notes() -> None:
    d = advise(facts(request(reuseaddr=True), held(tw())))
    lines = diagnosis_lines(d)
    assert lines[2] == "  • tcp TIME_WAIT 127.0.0.1:8080 → 127.0.0.1:50000, 41s left  [dim]flags unknown[/]"
    assert lines[3].endswith(" [yellow](depends on a flag nobody can read)[/]")
    note = (
        "  [dim]note: depends on the SO_REUSEADDR of TIME_WAIT 127.0.0.1:8080 -> 127.0.0.1:50000: "
        "EADDRINUSE if it blocks, ok if not[/]"
    )
    assert lines[4] == note


def test_bound_sockets_without_owner_say_why_and_group_without_a_peer() -> None:
    bound = [held(rec("0.0.0.0", State.BOUND_INACTIVE), ra=False, rp=False) for _ in range(2)]
    d = advise(facts(REQ, *bound, trials={REQ: INUSE}))
    assert d.blockers[0].owners is OwnerView.UNKNOWN
    assert diagnosis_lines(d)[2] == (
        "  • tcp BOUND_INACTIVE 0.0.0.0:8080 (2 sockets)  owner not visible (run as root)  "
        "[dim]SO_REUSEADDR off, SO_REUSEPORT off[/]"
    )
    d = advise(facts(REQ, *bound[:1], trials={REQ: INUSE}, owners_complete=True))
    assert diagnosis_lines(d)[2] == (
        "  • tcp BOUND_INACTIVE 0.0.0.0:8080  held by a process outside this PID namespace  "
        "[dim]SO_REUSEADDR off, SO_REUSEPORT off[/]"
    )


def test_a_listen_stage_blocker_says_so() -> None:
    d = advise(facts(REQ, held(rec("0.0.0.0"), owner(), ra=False, rp=False), trials={REQ: INUSE}))
    (b,) = d.blockers
    at_listen = replace(d, blockers=(replace(b, blocker=replace(b.blocker, stage=Stage.LISTEN)),))
    assert diagnosis_lines(at_listen)[3] == PLAIN_REASON + " (at listen())"


def test_the_diagnosis_notes_and_a_predicted_listen_failure() -> None:
    from rebind.model.advice import Attempt
    from rebind.model.conflict import Outcome, Verdict
    from rebind.render.why import attempt_detail

    d = advise(facts(REQ, trials={REQ: OK}))
    assert diagnosis_lines(replace(d, notes=("port 8080 is in the ephemeral range",), fixes=()))[1:] == [
        "  [dim]note: port 8080 is in the ephemeral range[/]"
    ]
    at_listen = Attempt("x", REQ, Outcome(Verdict.FAIL, 98, Stage.LISTEN), None)
    assert attempt_detail(at_listen) == "bind() works, listen() would fail (predicted)"


def test_a_socket_less_blocker_is_one_bullet() -> None:
    req = replace(REQ, port=80)
    d = advise(
        facts(
            req,
            trials={req: TrialResult(False, 13)},
            settings=replace(facts(req).settings, cap_net_bind_service=False),
        )
    )
    assert diagnosis_lines(d)[1:3] == [
        "\n[bold]Blocking[/]",
        "  • ports below 1024 (net.ipv4.ip_unprivileged_port_start) need CAP_NET_BIND_SERVICE",
    ]


@pytest.mark.parametrize(
    ("dis", "lines"),
    [
        (
            Disagreement("the model said A, the kernel B"),
            [
                "[bold red on yellow]MODEL/KERNEL DISAGREEMENT:[/] the model said A, the kernel B — please report"
            ],
        ),
        (
            Disagreement("the model said A, the kernel B", "a cache"),
            [
                "[yellow]The kernel's answer wins:[/] the model said A, the kernel B.",
                "  [dim]What explains it: a cache.[/]",
            ],
        ),
    ],
)
def test_disagreements(dis: Disagreement, lines: list[str]) -> None:
    d = advise(facts(REQ, trials={REQ: OK}))
    assert diagnosis_lines(replace(d, disagreement=dis, fixes=()))[1:] == lines


def test_print_diagnosis_plain_text_and_warnings_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rebind.model.wellknown import Findings

    monkeypatch.setenv("NO_COLOR", "1")
    d = advise(facts(REQ, held(rec("0.0.0.0"), owner(), ra=False, rp=False), trials={REQ: INUSE}))
    d = replace(d, fixes=FIXES[1:], table=replace(d.table, warnings=("owners of 2 processes unreadable",)))
    print_diagnosis(d, Findings())
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "8080/tcp is busy: a live listener (redis-server (pid 42; user redis))"
    assert "  1. Use another port" in out.splitlines()
    assert err == "note: owners of 2 processes unreadable\n"


def test_findings_lines_whole() -> None:
    """The known situations after the diagnosis: each part's prefix and markup around the
    finding's own words (those are test_wellknown's and test_localhost's)."""
    from rebind.model.localhost import find_split
    from rebind.model.records import Proto
    from rebind.model.wellknown import Findings, Lookalike, Recognised
    from rebind.render.why import findings_lines
    from tests.unit.test_localhost import V6_FIRST, listener
    from tests.unit.test_wellknown import ROOT_EXE, UIDS, ProcFacts, catalogue, recognise
    from tests.unit.test_wellknown import facts as proc

    avahi = ProcFacts(
        42, "/usr/sbin/avahi-daemon", 0, ROOT_EXE, 0, "avahi-daemon", (), "avahi-daemon.service"
    )
    got = recognise(catalogue(), avahi, 5353, Proto.UDP, UIDS)
    fake = recognise(
        catalogue(), proc("/usr/bin/python3", 65534, cmd=("avahi-daemon: running",)), 5353, Proto.UDP, UIDS
    )
    split = find_split(5173, [listener("127.0.0.1", 10), listener("::1", 20)], V6_FIRST)
    assert isinstance(got, Recognised) and isinstance(fake, Lookalike) and split is not None
    on_tcp = replace(got, proto=Proto.TCP, port=80)
    withheld = replace(got, withheld="withheld: a live container")
    found = Findings(localhost=split, holders=(got, on_tcp, withheld), lookalikes=(fake,))
    what, explain = got.lines()
    head, *rest = split.lines()

    def holder(verify: str) -> list[str]:
        return [
            f"\n[bold]Well-known holder:[/] {what}",
            f"  [dim]{explain}[/]",
            f"  [bold]Its owner's fix[/] ({got.entry.fix_title}):",
            *(f"    $ {c}" for c in got.fix),
            "  To undo it:",
            *(f"    $ {c}" for c in got.revert),
            f"  Then verify: $ rebind why {verify} --check-fix",
        ]

    assert findings_lines(found) == [
        f"\n[bold yellow]localhost:[/] {head}",
        *(f"  [dim]{x}[/]" for x in rest),
        f"  fix: {split.fix()}",
        *(f"    $ {c}" for c in split.commands()),
        f"\n[yellow]note:[/] {fake.line()}",
        *holder("5353 --udp"),
        *[line.replace("5353/udp", "80/tcp") for line in holder("80")[:1]],
        *holder("80")[1:],
        f"\n[bold]Well-known holder:[/] {what}",
        f"  [dim]{explain}[/]",
        "  withheld: a live container",
    ]
