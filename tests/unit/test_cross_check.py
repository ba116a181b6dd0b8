"""`rebind why` cross-checks the model against the kernel's trial bind: silent when they agree,
the kernel's answer wins when they do not, and a known cause is named instead of "please report"."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from rebind.model.advice import WhyVerdict, cross_check, decide
from rebind.model.conflict import Outcome, Stage, Verdict
from rebind.model.records import Proto, SocketTable
from rebind.model.request import BindRequest, TrialResult

REQ = BindRequest(Proto.TCP, ip_address("0.0.0.0"), 8080)
NETLINK = SocketTable(())
PROCFS = SocketTable((), source="procfs")
OK, INUSE, ACCES = TrialResult(True), TrialResult(False, 98), TrialResult(False, 13)
FAIL_BIND = Outcome(Verdict.FAIL, 98, Stage.BIND)


@pytest.mark.parametrize(
    ("outcome", "trial"),
    [
        (Outcome(Verdict.OK), OK),
        (FAIL_BIND, INUSE),
        # A listen()-stage failure is not something a bind-only trial can contradict.
        (Outcome(Verdict.FAIL, 98, Stage.LISTEN), OK),
        # An unknown flag: the trial decides, nothing to contradict.
        (Outcome(Verdict.DEPENDS, 98, Stage.BIND), INUSE),
        # No trial ran (it could have changed the answer): nothing to compare.
        (FAIL_BIND, None),
    ],
)
def test_agreement_is_silent(outcome: Outcome, trial: TrialResult | None) -> None:
    assert cross_check(REQ, outcome, trial, NETLINK) is None


def test_model_says_busy_kernel_binds_names_the_fast_reuse_cache() -> None:
    """Only a SO_REUSEPORT bind can take the cache's fast path (the SO_REUSEADDR one is dead
    since 6.8), and the cache comes from an earlier SO_REUSEPORT bind, not necessarily from an
    option changed after bind() (issue 17)."""
    rp = BindRequest(Proto.TCP, ip_address("0.0.0.0"), 8080, reuseport=True)
    d = cross_check(rp, FAIL_BIND, OK, NETLINK)
    assert d is not None and "trial bind succeeded" in d.text and not d.is_bug
    assert "tb->fastreuseport" in d.explanation and "earlier SO_REUSEPORT bind" in d.explanation
    assert "changed after bind()" not in d.explanation
    plain = cross_check(REQ, FAIL_BIND, OK, NETLINK)
    assert plain is not None and plain.is_bug
    # ...and the kernel's answer is the verdict, never "busy" for a bind that works.
    assert decide(REQ, FAIL_BIND, OK) is WhyVerdict.FREE


def test_procfs_cannot_see_bound_inactive_sockets_is_a_limitation_not_a_bug() -> None:
    d = cross_check(REQ, Outcome(Verdict.OK), INUSE, PROCFS)
    assert d is not None and not d.is_bug and "/proc/net/tcp" in d.explanation
    assert decide(REQ, Outcome(Verdict.OK), INUSE) is WhyVerdict.BUSY


def test_unexplained_disagreements_are_bugs() -> None:
    d = cross_check(REQ, FAIL_BIND, ACCES, NETLINK)
    assert d is not None and d.is_bug and "kernel said EACCES" in d.text
    d = cross_check(REQ, Outcome(Verdict.FAIL, 13, Stage.BIND), OK, NETLINK)
    assert d is not None and d.is_bug


@pytest.mark.parametrize(
    ("outcome", "trial", "verdict"),
    [
        (Outcome(Verdict.OK), OK, WhyVerdict.FREE),
        (Outcome(Verdict.OK), None, WhyVerdict.FREE),
        (FAIL_BIND, INUSE, WhyVerdict.BUSY),
        (FAIL_BIND, None, WhyVerdict.BUSY),
        (FAIL_BIND, OK, WhyVerdict.FREE),
        (Outcome(Verdict.FAIL, 13, Stage.BIND), ACCES, WhyVerdict.CANNOT_BIND),
        (Outcome(Verdict.FAIL, 13, Stage.BIND), None, WhyVerdict.CANNOT_BIND),
        (Outcome(Verdict.FAIL, 98, Stage.LISTEN), OK, WhyVerdict.LISTEN_FAILS),
        (Outcome(Verdict.FAIL, 98, Stage.LISTEN), None, WhyVerdict.LISTEN_FAILS),
        (Outcome(Verdict.DEPENDS, 98, Stage.BIND), None, WhyVerdict.UNCERTAIN),
        (Outcome(Verdict.DEPENDS, 98, Stage.BIND), OK, WhyVerdict.FREE),
        (Outcome(Verdict.DEPENDS, 98, Stage.BIND), INUSE, WhyVerdict.BUSY),
        (Outcome(Verdict.DEPENDS, 98, Stage.LISTEN), OK, WhyVerdict.UNCERTAIN),
    ],
)
def test_decide(outcome: Outcome, trial: TrialResult | None, verdict: WhyVerdict) -> None:
    assert decide(REQ, outcome, trial) is verdict
