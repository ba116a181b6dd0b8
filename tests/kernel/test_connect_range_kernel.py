"""Issue 17's budget, client side: `why --connect` reads the range's ports from the kernel's bind
hash (kernel/connect_range.py) and dumps only the sockets the answer names. Its answer must be the
one the per-socket reading gives -- every field of the JSON but the consumers' ``other``, which
it does not count -- and the bind hash must stand in for the sockets of connect()-made ports.

A 10-port range (40000-40009) holds every kind of port: connect()-made clients elsewhere,
bind(ip, 0) clients elsewhere (bind-made buckets), a listener and a bound-inactive socket, live
connections and a client-side TIME_WAIT to the destination, one free port.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from rebind.kernel.connect_facts import gather
from rebind.model.connect import ConnectRequest
from rebind.render.connect import result_json
from tests.kernel.test_connect_kernel import bpf_works, write


def _evaluate(req: ConnectRequest, summary: bool) -> tuple[dict[str, object], int, bool]:
    facts = gather(req, owners=True, summary=summary)
    res = facts.evaluate(req)
    doc = result_json(res)
    for t in doc["time_wait_to_destination"]:
        t["left_ms"] = None  # a time: the two reads are apart
    return doc, len(facts.holders), facts.buckets is not None


@pytest.fixture
def busy_range(netns: int) -> Iterator[None]:
    write("ip_local_port_range", "40000 40009")
    write("tcp_tw_reuse", "2")
    keep = [socket.create_server(("127.0.0.1", p)) for p in (9000, 9001)]
    try:
        for _ in range(3):  # connect()-made buckets, connected elsewhere
            c = socket.create_connection(("127.0.0.1", 9001))
            keep.append(c)
        for _ in range(2):  # bind(ip, 0): bind-made buckets, connected elsewhere
            c = socket.socket()
            c.bind(("127.0.0.1", 0))
            c.connect(("127.0.0.1", 9001))
            keep.append(c)
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        inactive = socket.socket()
        inactive.bind(("127.0.0.1", 0))
        keep += [lst, inactive]
        keep.append(socket.create_connection(("127.0.0.1", 9000)))  # live, to the destination
        tw = socket.create_connection(("127.0.0.1", 9000))  # the client closes first: TIME_WAIT
        peer, _ = keep[0].accept()
        tw.close()
        time.sleep(0.05)
        peer.close()
        yield
    finally:
        for s in keep:
            s.close()


REQUESTS = {
    "plain": {},
    "from-address": {"src": "127.0.0.1"},
    "fixed-port-taken": {"src": "127.0.0.1", "local_port": 40000, "reuseaddr": True},
    "fixed-port-free": {"src": "127.0.0.1", "local_port": 40009},
}


@pytest.mark.parametrize("how", list(REQUESTS))
def test_bind_hash_summary_answers_as_every_socket_does(busy_range, how):
    if not bpf_works():
        pytest.skip("BPF cannot run here")
    req = ConnectRequest.create("127.0.0.1", 9000, **REQUESTS[how])  # type: ignore[arg-type]
    every, n_every, used = _evaluate(req, summary=False)
    assert not used
    summed, n_summed, used = _evaluate(req, summary=True)
    assert used, "the bind hash could not be read"
    assert n_summed < n_every  # the connect()-made clients elsewhere were not read
    cons_every, cons_summed = every.pop("consumers"), summed.pop("consumers")
    assert summed == every
    want = [dict(c, other=None) for c in cons_every if c["to_destination"] or c["by_bind"]]  # type: ignore[union-attr]
    assert cons_summed == want


def test_udp_and_bind_before_connect_read_every_socket(busy_range):
    for req in (
        ConnectRequest.create("127.0.0.1", 9000, proto="udp"),
        ConnectRequest.create("127.0.0.1", 9000, src="127.0.0.1", bind_before_connect=True),
    ):
        assert gather(req, summary=True).buckets is None


def test_without_bpf_the_range_is_read_socket_by_socket(busy_range, monkeypatch):
    monkeypatch.setenv("REBIND_NO_BPF", "1")
    req = ConnectRequest.create("127.0.0.1", 9000)
    assert gather(req, summary=True).buckets is None
