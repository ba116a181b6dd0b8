"""The client model fed the range from the kernel's bind hash (RangeBuckets) and only the
sockets the answer names: the same answer as every socket of the range gives, but the consumers'
``other`` (not counted); and the plain `why --connect` the entry point prefetches."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from rebind.kernel.connect_prefetch import plain_request
from rebind.model.connect import ConnectRequest, PortHolder, RangeBuckets, evaluate_connect
from rebind.model.records import Owner, SocketEntry, State
from rebind.render.connect import result_json
from tests.unit.test_connect_model import hold, rec, req, settings

ME = Owner(pid=10, name="client", user="root", cmdline=("client",), fd=3)
THEM = Owner(pid=20, name="other", user="root", cmdline=("other",), fd=3)


def _owned(h: PortHolder, o: Owner) -> PortHolder:
    return replace(h, entry=SocketEntry(h.socket, (o,)))


def _range() -> tuple[list[PortHolder], list[PortHolder], RangeBuckets]:
    """40000-40007: a live connection to the destination (40000), a connect()-made client
    elsewhere (40001), a bind()-made client elsewhere (40002), a listener (40003), a
    bound-inactive socket (40004), a time-wait entry to the destination (40005, reusable), a
    connect()-made port held by two clients elsewhere (40006); 40007 free. Every socket, and
    the ones the answer names."""
    elsewhere = ("127.0.0.9", 80)
    tw = rec(40005, state=State.TIME_WAIT, left_ms=10_000)
    every = [
        _owned(hold(rec(40000), bucket_connect_only=True), ME),
        _owned(hold(rec(40001, remote=elsewhere), None, bucket_connect_only=True), THEM),
        _owned(hold(rec(40002, remote=elsewhere), None, bucket_connect_only=False), THEM),
        _owned(hold(rec(40003, remote=("0.0.0.0", 0), state=State.LISTEN), True), ME),
        _owned(hold(rec(40004, remote=("0.0.0.0", 0), state=State.BOUND_INACTIVE), True), ME),
        hold(tw, None, timestamps=True, bucket_connect_only=True),
        _owned(hold(rec(40006, remote=elsewhere), None, bucket_connect_only=True), THEM),
        _owned(hold(rec(40006, remote=("127.0.0.9", 81)), None, bucket_connect_only=True), ME),
    ]
    named = [h for h in every if h.socket.local.port in (40000, 40002, 40003, 40004, 40005)]
    buckets = RangeBuckets(held=frozenset(range(40000, 40007)), bind_made=frozenset({40002, 40003, 40004}))
    return every, named, buckets


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"src": "127.0.0.1"},
        {"src": "127.0.0.1", "local_port": 40001},
        {"src": "127.0.0.1", "local_port": 40007},
    ],
    ids=["plain", "no-port", "fixed-held", "fixed-free"],
)
def test_summary_answers_as_every_socket(kw):
    every, named, buckets = _range()
    r = req(**kw)
    if r.local_port is not None:  # every socket of a fixed port is named
        named += [h for h in every if h.socket.local.port == r.local_port and h not in named]
    st = settings(40000, 40007, tw_reuse=1, tw_reuse_delay_ms=1)
    whole = result_json(evaluate_connect(r, every, st))
    summed = result_json(evaluate_connect(r, named, st, buckets=buckets))
    consumers = whole.pop("consumers"), summed.pop("consumers")
    assert summed == whole
    assert consumers[1] == [dict(c, other=None) for c in consumers[0] if c["to_destination"] or c["by_bind"]]
    assert {c["pid"] for c in consumers[0]} == {10, 20}
    assert [c["pid"] for c in consumers[1]] == [10, 20]  # 20 holds a bind()-made port


def test_summary_counts_held_ports_without_holders():
    _, named, buckets = _range()
    res = evaluate_connect(
        req(), named, settings(40000, 40007, tw_reuse=1, tw_reuse_delay_ms=1), buckets=buckets
    )
    assert res.accounting.counts == {
        "in-use-to-destination": 1,
        "shared": 2,
        "bind-before-connect": 1,
        "listener": 1,
        "bound-inactive": 1,
        "time-wait-reusable": 1,
        "free": 1,
    }
    assert res.accounting.ambiguous == 0


@pytest.mark.parametrize("kw", [{"proto": "udp"}, {"src": "127.0.0.1", "bind_before_connect": True}])
def test_summary_is_refused_where_every_socket_counts(kw):
    with pytest.raises(ValueError, match="needs every socket"):
        evaluate_connect(req(**kw), [], settings(), buckets=RangeBuckets(frozenset(), frozenset()))


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["why", "--connect", "127.0.0.1:80"], ("127.0.0.1:80", None, frozenset())),
        (["why", "--connect=[::1]:80", "--json"], ("[::1]:80", None, frozenset({"--json"}))),
        (
            ["why", "--from", "127.0.0.1:4000", "--connect", "1.2.3.4:5", "--reuseaddr", "--udp"],
            ("1.2.3.4:5", "127.0.0.1:4000", frozenset({"--reuseaddr", "--udp"})),
        ),
        (["why", "--connect", "127.0.0.1:80", "--probe"], None),
        (["why", "--connect"], None),
        (["why", "8080"], None),
        (["ls", "--connect", "127.0.0.1:80"], None),
    ],
)
def test_plain_request(argv, want):
    assert plain_request(argv) == want


def test_prefetched_dump_is_taken_only_for_the_same_request(monkeypatch):
    from rebind.kernel import connect_prefetch as cp

    job = cp._Job("127.0.0.1:80", None, frozenset())
    job.thread = threading.Thread(target=lambda: None)
    job.thread.start()
    job.request = ConnectRequest.create("127.0.0.1", 80)
    job.first = object()  # type: ignore[assignment]
    monkeypatch.setattr(cp, "_job", job)
    assert cp.take(ConnectRequest.create("127.0.0.1", 81)) is None
    assert cp._job is None  # used once, whatever the answer
    assert cp.take(ConnectRequest.create("127.0.0.1", 80)) is None
    monkeypatch.setattr(cp, "_job", job)
    assert cp.take(ConnectRequest.create("127.0.0.1", 80)) is job.first


def test_second_dump_only_for_bind_made_ports_of_the_range():
    from rebind.kernel import connect_range as cr
    from rebind.kernel.diag_filter import compile_any, port_cond

    rng = (100, 200)
    assert cr.bind_made_bytecode(rng, RangeBuckets(frozenset({150, 160}), frozenset())) is None
    assert cr.bind_made_bytecode(rng, RangeBuckets(frozenset({50}), frozenset({50}))) is None  # outside
    got = cr.bind_made_bytecode(rng, RangeBuckets(frozenset({150, 151, 160}), frozenset({150, 151, 160})))
    S_GE, S_LE, S_EQ = cr.codec.BcOp.S_GE, cr.codec.BcOp.S_LE, cr.codec.BcOp.S_EQ
    assert got == compile_any([[port_cond(S_GE, 150), port_cond(S_LE, 151)], [port_cond(S_EQ, 160)]])
    many = frozenset(range(100, 200, 2))  # more runs than MAX_RUNS: the whole range
    assert len(many) > cr.MAX_RUNS
    whole = cr.bind_made_bytecode(rng, RangeBuckets(many, many))
    assert whole == compile_any([[port_cond(S_GE, 100), port_cond(S_LE, 200)]])


def test_first_dump_is_not_started_where_the_bind_hash_path_cannot_run(monkeypatch):
    from rebind.kernel.connect_dump import worth_starting

    monkeypatch.setenv("REBIND_NO_BPF", "1")
    assert not worth_starting(ConnectRequest.create("127.0.0.1", 80))
    monkeypatch.delenv("REBIND_NO_BPF")
    assert not worth_starting(ConnectRequest.create("127.0.0.1", 80, proto="udp"))


def test_facts_evaluate_judges_with_the_buckets():
    """Every reader judges gathered facts through ConnectFacts.evaluate: with the summary's
    holders alone (no buckets) the range's shared ports would read as free."""
    from rebind.kernel.connect_facts import ConnectFacts
    from rebind.model.records import OwnerScanReport

    _, named, buckets = _range()
    st = settings(40000, 40007, tw_reuse=1, tw_reuse_delay_ms=1)
    src = named[0].socket.local.addr
    facts = ConnectFacts(st, src, tuple(named), OwnerScanReport(), buckets=buckets, servers=frozenset())
    got = facts.evaluate(req()).accounting.counts
    assert (
        got
        == evaluate_connect(
            req(), named, st, route_src=src, buckets=buckets, servers=frozenset()
        ).accounting.counts
    )
    assert got["shared"] == 2 and got["free"] == 1
    blind = evaluate_connect(req(), named, st, route_src=src).accounting.counts
    assert blind != got  # without the buckets: another answer
