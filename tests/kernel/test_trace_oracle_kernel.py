"""Issue 19's first "done when": `rebind trace` catches every failing call of the bind oracle's
random scenarios (bench/oracle_lib.py), each with the model's reason `rebind why` gives for the
same request at that instant.

The oracle builds each scenario's sockets and makes its probes' real bind() and listen() calls in
this test's namespace while `rebind trace --json --netns` runs. Every call that fails with an
errno the tracer watches stops the oracle until its event line is read: the state is then the
one the failure met, and the snapshot (taken by the tracer, in its own process) is compared with
the oracle's errno and with `why` for the event's own request (rebind.diagnosis.diagnose, in this
process, on the same state): the verdict, and the kinds of the blockers it names. A failed
listen() is compared for its verdict alone: its own bound socket is no blocker to the tracer
(left out by its inode), while `why` for that request cannot leave it out.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from rebind.kernel.trace_snapshot import bind_request
from rebind.model.records import Proto
from rebind.model.trace import AF_INET, AF_INET6, Kind, TraceEvent
from tests.conftest import Procs
from tests.kernel.test_trace_kernel import Trace

WATCHED = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}
#: The tracer's window for sharing one snapshot between equal questions (cli/trace.SHARE_MS),
#: and a margin: each failure here gets a snapshot of its own.
PAST_SHARING = 0.12


def _event_of(doc: dict[str, Any]) -> TraceEvent:
    """The request part of a `rebind.trace/1` event, as bind_request reads it."""
    from ipaddress import ip_address

    opts = doc["options"]
    return TraceEvent(
        kind=Kind[doc["call"].upper()],
        errno=doc["errno_value"],
        pid=doc["process"]["pid"],
        tid=doc["process"]["tid"],
        comm=doc["process"]["comm"],
        cgroup_id=doc["process"]["cgroup_id"],
        netns=doc["netns"],
        family=AF_INET if doc["family"] == "ipv4" else AF_INET6,
        proto=Proto(doc["proto"]),
        fd=doc["fd"],
        addr=ip_address(doc["addr"]),
        port=doc["port"],
        scope_id=doc["scope_id"],
        reuseaddr=opts["reuseaddr"],
        reuseport=opts["reuseport"],
        v6only=bool(opts["v6only"]),
        bound_dev_if=opts["bound_dev_if"],
        uid=doc["process"]["uid"],
        inode=doc["socket_inode"],
    )


def test_every_failing_call_of_the_oracle_is_caught_with_why_s_reason(
    netns: int, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import oracle_lib

    from rebind.diagnosis import diagnose
    from rebind.render.why import why_json

    t = Trace(procs, netns)
    real_call = oracle_lib._call
    caught: list[tuple[str, int, str, str]] = []
    mismatched: list[str] = []

    def traced(fn: Callable[[Any], None], arg: object) -> int | None:
        err = real_call(fn, arg)
        if err is None or err not in WATCHED or fn.__name__ not in ("bind", "listen"):
            return err
        ino = os.fstat(fn.__self__.fileno()).st_ino  # type: ignore[attr-defined]
        # events of other failing calls come too (a scenario's socket that could not be
        # built, `why`'s own trial binds): each failing call is its socket's event
        doc = t.event(timeout=30)
        while doc["socket_inode"] != ino:
            doc = t.event(timeout=30)
        snap = doc["snapshot"]
        assert doc["errno"] == errno.errorcode[err] and doc["call"] == fn.__name__, doc
        assert doc["process"]["pid"] == os.getpid(), doc  # the oracle's calls are all made here
        caught.append((doc["call"], doc["port"], doc["errno"], snap["verdict"]))
        assert snap["verdict"] != "bindable" and snap.get("error") is None, doc
        if fn.__name__ == "bind":
            req = bind_request(_event_of(doc))
            assert req is not None
            why = why_json(diagnose(req))
            kinds = sorted({b["kind"] for b in snap["blockers"]})
            why_kinds = sorted({b["kind"] for b in why["blockers"]})
            if (snap["verdict"], kinds) != (why["status"], why_kinds):
                mismatched.append(
                    f"{doc['call']} {doc['addr']}:{doc['port']} {doc['errno']}: trace "
                    f"{snap['verdict']} {kinds}, why {why['status']} {why_kinds}"
                    + f"\n  req {req}\n  why {why.get('reason')!r} {why.get('headline')!r} {why.get('trials')!r} {why.get('attempts')!r}"
                )
        time.sleep(PAST_SHARING)
        return err

    monkeypatch.setattr(oracle_lib, "_call", traced)
    count = int(os.environ.get("REBIND_TRACE_ORACLE_SCENARIOS", "60"))
    checks = list(oracle_lib.run_scenarios(count, 20261206, port_base=11000, batch=20))
    failing = [c for c in checks if c.actual in WATCHED]
    assert len(failing) >= 10, "too few failing calls to say anything"
    assert all(c.agree for c in checks), "\n".join(str(c) for c in checks if not c.agree)
    # every failing call was caught (the wrapper read one event for each) and nothing else
    assert len(caught) == len(failing)
    binds = sum(1 for c in caught if c[0] == "bind")
    print(f"{len(checks)} checks, {len(failing)} failing calls caught, {binds} binds compared with why")
    bad_ports = {int(m.split(":")[1].split()[0]) for m in mismatched}
    scen = {str(c.scenario) for c in checks if c.scenario.port in bad_ports}
    assert not mismatched, "\n".join(mismatched) + "\n" + "\n".join(scen)
