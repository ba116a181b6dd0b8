"""The ephemeral range of `why --connect` from the kernel's bind hash (issues 17, 19): every TCP
port's bind bucket (kernel/bpf/bindhash.py: read_port_buckets, one chain walk per port, no
socket read) instead of every client socket of the range, and the inet_diag filter for the
sockets the answer still names one by one.

What connect()'s own choice decides by, per port (__inet_hash_connect): is there a bucket
(inet_bind_bucket_match on net and port), and was it made by connect() (``fastreuse < 0 &&
fastreuseport < 0``, C6). Both are exact here, for every port, held by a live socket or only by a
TIME_WAIT -- where the socket table could only say "a client socket, origin unknown". What
still needs the sockets is the 4-tuple (connections and time-wait entries to the destination:
__inet_check_established), a fixed local port's owners (the bind rules, C17/C19) and the
consumers' ``by_bind`` (the sockets of bind-made ports): :func:`summary_bytecode` asks for
those and nothing else, so the dump no longer grows with the range's connections elsewhere.
"""

from __future__ import annotations

from rebind.kernel import diag_codec as codec
from rebind.model.connect import ConnectRequest, RangeBuckets
from rebind.model.records import IPAddress
from rebind.model.sockstate import PortBucket

#: Above this many runs of bind-made ports the dump asks for the whole range instead: each run
#: is a chain of inet_diag_bc_run's program that every socket of the namespace fails through.
MAX_RUNS = 32


def range_buckets(rng: tuple[int, int]) -> RangeBuckets | str:
    """Every port of ``rng`` from the bind hash, or why not (the caller then reads the sockets:
    the worst case never comes from a port this read could not vouch for). A port whose chain
    walk faulted or was cut short, or that has more than one bucket (l3mdev/VRF binds: which one
    a connect() meets depends on its device) makes the whole read unusable."""
    from rebind.kernel.bpf.bindhash import read_port_bucket_groups
    from rebind.model.sockstate import Unavailable

    lo, hi = rng
    # each distinct bucket once with its ports (one pass over the entries, no dict per port): a
    # busy range holds a handful of distinct ones, so each is judged once
    got = read_port_bucket_groups(range(lo, hi + 1))
    if isinstance(got, Unavailable):
        return got.reason
    held: list[int] = []
    bind_made: list[int] = []
    for b, ports in got:
        v = _judge(b)
        if v == 0:
            continue
        if v < 0:
            why = "its chain walk faulted or was cut short" if not b.known else "it has several buckets"
            return f"port {ports[0]}: {why}"
        held += ports
        if v == 2:
            bind_made += ports
    return RangeBuckets(frozenset(held), frozenset(bind_made))


def _judge(b: PortBucket) -> int:
    """0 free, 1 connect()-made, 2 bind-made, -1 unusable."""
    if not b.known or b.buckets > 1:
        return -1
    return 0 if not b.exists else 1 if b.connect_made else 2


def _runs(ports: frozenset[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(ports):
        if out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def summary_bytecode(
    req: ConnectRequest, src: IPAddress, rng: tuple[int, int], buckets: RangeBuckets, *, servers: bool = False
) -> tuple[bytes, bool]:
    """The dump's kernel filter beside a bind-hash summary, and whether it fell back to the
    whole range (too many runs of bind-made ports): every socket connected to the destination
    (one D_COND), every peerless socket of the range (listeners, bound-inactive), every socket
    on a bind-made port of the range, every socket on a fixed local port; ``servers``: every
    peerless socket anywhere too (connect_facts.PEERLESS, split_servers)."""
    lo, hi = rng
    in_range = [codec.port_cond(codec.BcOp.S_GE, lo), codec.port_cond(codec.BcOp.S_LE, hi)]
    peerless = [codec.port_cond(codec.BcOp.D_EQ, 0)]
    chains: list[list[codec.Cond]] = [[codec.host_cond(codec.BcOp.D_COND, req.dst, port=req.dport)]]
    runs = _runs(frozenset(p for p in buckets.bind_made if lo <= p <= hi))
    whole = len(runs) > MAX_RUNS
    if whole:
        chains.append(in_range)
    else:
        # a listener or bound-inactive socket names its port's kind (C6): all of them, whatever
        # their bucket says at the moment of the dump (the peerless test first: a connection
        # fails the chain at once); with ``servers`` every peerless socket is asked anyway
        if not servers:
            chains.append([*peerless, *in_range])
        for a, b in runs:
            chains.append(
                [codec.port_cond(codec.BcOp.S_EQ, a)]
                if a == b
                else [codec.port_cond(codec.BcOp.S_GE, a), codec.port_cond(codec.BcOp.S_LE, b)]
            )
    if req.local_port is not None:
        chains.append([codec.port_cond(codec.BcOp.S_EQ, req.local_port)])
    if servers:
        chains.append(peerless)
    return codec.compile_any(chains), whole


def bind_made_bytecode(rng: tuple[int, int], buckets: RangeBuckets) -> bytes | None:
    """The second dump's filter beside :mod:`rebind.kernel.connect_dump`'s first: every socket on
    a bind-made port of the range (the consumers' ``by_bind``), or on any port of it past
    :data:`MAX_RUNS` runs; None when the range holds no bind-made port (no second dump)."""
    lo, hi = rng
    runs = _runs(frozenset(p for p in buckets.bind_made if lo <= p <= hi))
    if not runs:
        return None
    if len(runs) > MAX_RUNS:
        return codec.compile_any(
            [[codec.port_cond(codec.BcOp.S_GE, lo), codec.port_cond(codec.BcOp.S_LE, hi)]]
        )
    return codec.compile_any(
        [
            [codec.port_cond(codec.BcOp.S_EQ, a)]
            if a == b
            else [codec.port_cond(codec.BcOp.S_GE, a), codec.port_cond(codec.BcOp.S_LE, b)]
            for a, b in runs
        ]
    )
