"""`rebind why` says so loudly when the model and the kernel's trial bind disagree."""

from __future__ import annotations

from rebind.diagnosis import _cross_check
from rebind.kernel.trial import TrialResult
from rebind.model.conflict import Outcome, Stage, Verdict


def test_agreement_is_silent():
    assert _cross_check(Outcome(Verdict.OK), TrialResult(True)) == ""
    assert _cross_check(Outcome(Verdict.FAIL, 98, Stage.BIND), TrialResult(False, 98)) == ""
    # A listen()-stage failure is not something a bind-only trial can contradict.
    assert _cross_check(Outcome(Verdict.FAIL, 98, Stage.LISTEN), TrialResult(True)) == ""
    # An unknown flag: the trial decides, nothing to contradict.
    assert _cross_check(Outcome(Verdict.DEPENDS, 98, Stage.BIND), TrialResult(False, 98)) == ""


def test_disagreements_are_reported():
    assert "trial bind succeeded" in _cross_check(Outcome(Verdict.FAIL, 98, Stage.BIND), TrialResult(True))
    assert "trial bind failed" in _cross_check(Outcome(Verdict.OK), TrialResult(False, 98))
    assert "kernel said 13" in _cross_check(Outcome(Verdict.FAIL, 98, Stage.BIND), TrialResult(False, 13))
