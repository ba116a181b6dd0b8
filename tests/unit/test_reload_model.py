"""`rebind why --reload`: the advice, without root or sockets."""

from __future__ import annotations

from rebind.model.reload import (
    MIGRATE_REQ_FIX,
    SAME_GENERATION_SECONDS,
    Level,
    Listener,
    advise,
    exit_status,
    generations,
)
from rebind.render.reload import text_lines, to_json


def _l(inode: int, start: float | None, queued: int = 0, local: str = "0.0.0.0:8080") -> Listener:
    return Listener(local, inode, queued, f"srv[{inode}]", start)


def test_two_generations_with_migrate_req_0_warn_with_the_queue() -> None:
    group = [_l(1, 100.0, queued=200), _l(2, 160.0)]
    (a,) = advise(group, 0, 8080)
    assert a.level is Level.WARN
    assert "200 connection(s) wait in the old listener's queue" in a.text and "RESETS" in a.text
    assert any("tcp_migrate_req=1" in c for c in a.commands) and any("rebind run" in f for f in a.fixes)


def test_two_generations_with_migrate_req_1_are_fine() -> None:
    (a,) = advise([_l(1, 100.0, queued=5), _l(2, 160.0)], 1, 8080)
    assert a.level is Level.OK and "moves them" in a.text


def test_unknown_sysctl_counts_as_0() -> None:
    (a,) = advise([_l(1, 100.0), _l(2, 160.0)], None, 8080)
    assert a.level is Level.WARN and "tcp_migrate_req=unknown" in a.text


def test_one_generations_workers_are_one_group() -> None:
    # nginx/granian-style per-worker sockets, created together: not a hand-off in progress.
    group = [_l(i, 100.0 + i * SAME_GENERATION_SECONDS / 10) for i in range(4)]
    assert len(generations(group)) == 1
    (a,) = advise(group, 0, 8080)
    assert a.level is Level.OK and "spans two" in a.text


def test_different_addresses_are_different_groups() -> None:
    group = [_l(1, 100.0, local="127.0.0.1:8080"), _l(2, 160.0, local="[::1]:8080")]
    (a,) = advise(group, 0, 8080)
    assert a.level is Level.OK and "single listener" in a.text


def test_a_listener_of_unknown_start_is_never_a_generation_of_its_own() -> None:
    assert generations([_l(1, None), _l(2, 100.0)]) == [[_l(2, 100.0)]]


def test_nothing_listening() -> None:
    (a,) = advise([], 0, 8080)
    assert a.level is Level.OK and "nothing listens" in a.text


def test_the_printed_command_is_one_pasteable_shell_line() -> None:
    """The fix once printed `sysctl -w net.ipv4.tcp_migrate_req=1   (Linux 5.14+; ...)`: pasted, the
    shell stops at the parenthesis. The remark is a shell comment now; the kernel test runs the
    line exactly as printed (tests/kernel/test_recipes_reload_check.py)."""
    import shlex

    (a,) = advise([_l(1, 100.0, queued=3), _l(2, 160.0)], 0, 8080)
    assert a.commands == (MIGRATE_REQ_FIX,)
    assert shlex.split(MIGRATE_REQ_FIX, comments=True) == ["sysctl", "-w", "net.ipv4.tcp_migrate_req=1"]
    lines = [text for _, text in text_lines([a])]
    assert f"  $ {MIGRATE_REQ_FIX}" in lines
    assert all(line.startswith(("warn: ", "  $ ", "  fix: ")) for line in lines)
    assert not any("CMD" in line for line in lines if line.startswith("  $ "))  # no placeholder to paste


def test_json_keeps_every_fix_and_lists_the_commands() -> None:
    (a,) = advise([_l(1, 100.0, queued=3), _l(2, 160.0)], 0, 8080)
    doc = to_json(8080, 0, [a])
    assert doc["schema"] == "rebind.why-reload/1" and doc["tcp_migrate_req"] == 0
    (item,) = doc["advice"]
    assert item["level"] == "warn" and item["commands"] == [MIGRATE_REQ_FIX]
    assert item["fixes"][0] == MIGRATE_REQ_FIX and len(item["fixes"]) == 3
    assert exit_status([a]) == 1 and exit_status(advise([], 0, 8080)) == 0
