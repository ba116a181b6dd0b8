"""A note that both bind() and listen() make is said once (why printed the SO_REUSEPORT fast-path
note and an unknown flag's "depends" twice)."""

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from rebind.model.conflict import (
    BucketState,
    Holder,
    KernelSettings,
    PortState,
    ReuseportCache,
    SockOpts,
    evaluate,
)
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State
from rebind.model.request import BindRequest


def _holder(state: State, reuseaddr: bool | None, reuseport: bool | None) -> Holder:
    rec = SocketRecord(
        proto=Proto.TCP,
        family=Family.INET,
        state=state,
        local=Endpoint(IPv4Address("127.0.0.1"), 8080),
        remote=Endpoint(IPv4Address("127.0.0.1"), 40000)
        if state is State.TIME_WAIT
        else Endpoint(IPv4Address("0.0.0.0"), 0),
        uid=None if state is State.TIME_WAIT else 0,
        inode=None if state is State.TIME_WAIT else 1,
    )
    return Holder(rec, SockOpts(reuseaddr, reuseport, None))


FLAGS = st.sampled_from([None, False, True])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([State.LISTEN, State.TIME_WAIT]), FLAGS, FLAGS, st.booleans(), st.booleans())
def test_no_note_twice(state: State, ra: bool | None, rp: bool | None, req_ra: bool, req_rp: bool) -> None:
    req = BindRequest.create(8080, addr="0.0.0.0", reuseaddr=req_ra, reuseport=req_rp, listen=True)
    out = evaluate(req, [_holder(state, ra, rp)], KernelSettings())
    assert len(out.notes) == len(set(out.notes)), out.notes


def test_the_reuseport_fast_path_note_is_said_once() -> None:
    """The case `why` printed twice: a SO_REUSEPORT bind+listen that the bucket's cache lets
    through, once for bind() and once for listen()."""
    cache = ReuseportCache(0, IPv4Address("0.0.0.0"), False, True)
    req = BindRequest.create(8080, addr="0.0.0.0", reuseport=True, listen=True)
    out = evaluate(
        req,
        [_holder(State.LISTEN, None, None)],
        KernelSettings(),
        port=PortState(BucketState.of_cache(cache)),
    )
    fast = [n for n in out.notes if "fast path" in n]
    assert len(fast) == 1, out.notes
