"""``name[pid]`` has one home (model/records.process_label), and every record that names a
process goes through it: the name is the process's own choice, so it is escaped everywhere."""

from __future__ import annotations

from rebind.model.free import Refusal, Refused, Target
from rebind.model.records import Owner, owner_label, process_label

HOSTILE = "evil\x1b[2J\u202e"
SHOWN = "evil\\x1b[2J\\u202e[42]"


def test_process_label_escapes_the_name() -> None:
    assert process_label(HOSTILE, 42) == SHOWN
    assert process_label("nginx", 7) == "nginx[7]"


def test_owner_label_starts_with_it() -> None:
    assert owner_label(Owner(pid=42, name=HOSTILE, fd=3)) == SHOWN


def test_free_targets_and_refusals_escape_the_name() -> None:
    # Their labels reach the escalation's on_event lines (model/free_escalation.py) raw before.
    assert Target(42, 1, HOSTILE, 0, (), ()).label == SHOWN
    assert Refused(42, HOSTILE, Refusal.SELF, ()).label == SHOWN
