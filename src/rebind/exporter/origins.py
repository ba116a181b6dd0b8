"""Port origin: whose bind bucket holds each port of the ephemeral range (connect() or bind()?).

connect() skips a port of the range whose bind bucket bind() made, for every destination, and
may share one __inet_hash_connect made (``tb->fastreuse >= 0 || tb->fastreuseport >= 0``:
next_port; connect-rules.md C6). No socket flag shows which for a client that let bind(ip, 0)
pick its port: only the bucket does. Two readers:

* :func:`read_range_buckets` (the scrape's way): every port's bucket straight from the kernel's
  bind hash (kernel/bpf/bindhash.py: read_port_bucket_groups), one chain walk per port, no
  socket visited, each distinct bucket decoded and judged once (docs/benchmarks.md). It also sees the
  ports no client socket leads to (bound-inactive sockets, a server's TIME_WAITs);
* :func:`read_connect_only` (the fallback where the bind hash cannot be read, e.g. a kernel
  whose BTF lacks a member): one client socket per port from a second walk of the connection
  table, its bucket read through it (bpf_skc_lookup_tcp).

:func:`bucket_origins` sorts the answers (pure). Unknown ports are never counted free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from rebind.exporter.facts import EphemeralRange, PortOrigins, PortTuple
from rebind.model.records import Proto
from rebind.model.sockstate import PortBucket, SockStates, Unavailable

#: Each distinct bind bucket of the TCP ports asked, with its ports, in this thread's namespace
#: (bindhash.read_port_bucket_groups).
BucketGroups = Sequence[tuple[PortBucket, Sequence[int]]]
BucketReader = Callable[[list[int]], "BucketGroups | Unavailable"]


def read_range_buckets(ports: list[int]) -> BucketGroups | Unavailable:
    """The bind buckets of ``ports`` from the bind hash, grouped; Unavailable where BPF cannot
    run here (then the gatherer falls back to :func:`read_connect_only`)."""
    from rebind.kernel.bpf.bindhash import read_port_bucket_groups

    return read_port_bucket_groups(ports)


def range_ports(rng: EphemeralRange, known: Iterable[int]) -> list[int]:
    """The ports of the range connect() may choose (reserved ones left out) whose origin is not
    known already (``known``: the listeners seen in the dump), ascending."""
    skip = rng.reserved.union(known)
    if not skip:
        return list(range(rng.lo, rng.hi + 1))
    return [p for p in range(rng.lo, rng.hi + 1) if p not in skip]


def bucket_origins(asked: Sequence[int], groups: BucketGroups) -> PortOrigins:
    """Sort the ports ``asked`` by their bind bucket (``groups``: each distinct bucket with its
    ports, read from the bind hash):

    - no bucket (``buckets == 0``, the chain walked to its end): nobody holds the port;
    - one bucket, connect()-made (fastreuse and fastreuseport both -1): shared by connect(),
      so only the 4-tuples in use take it (the dest usage counts those);
    - one bucket made by bind() (any other cache): ``bind_made``, skipped by connect();
    - unknown: a fault or a bucket freed mid-walk (``faulted``), the chain cut short
      (``chain_truncated``), more than one bucket (l3mdev/VRF binds: which one a connect()
      would match, the first's fields do not say), or no answer for the port at all.

    Only the bind-made and unknown groups' ports are visited (a loaded range: a few hundred)."""
    made: set[int] = set()
    unknown: set[int] = set()
    answered = 0
    for b, ports in groups:
        answered += len(ports)
        v = _judge(b)
        if v == _BIND:
            made.update(ports)
        elif v == _UNKNOWN:
            unknown.update(ports)
    if answered != len(asked):  # a reader that left ports out: those are unknown, never free
        unknown.update(set(asked).difference(*(ports for _b, ports in groups)))
    return PortOrigins(frozenset(made), frozenset(unknown))


_FREE, _SHARED, _BIND, _UNKNOWN = range(4)


def _judge(b: PortBucket) -> int:
    if not b.known:
        return _UNKNOWN
    if b.buckets == 0:
        return _FREE
    if b.buckets > 1:
        return _UNKNOWN
    return _SHARED if b.connect_made else _BIND


def read_connect_only(reps: Mapping[int, PortTuple]) -> dict[int, bool]:
    """The fallback: whether each port's bind bucket is connect()-made (model/sockstate.connect_made),
    read from the kernel through one client socket of the port (``reps``): one
    bpf_skc_lookup_tcp per port (kernel/bpf/socklookup.py: lookup_port_buckets), then, for a port
    whose socket went away since the dump, the socket iterator's walk of those ports (any socket
    of the port carries its bucket). Ports absent from the answer are unknown: BPF cannot run
    here (unprivileged, no BTF, REBIND_NO_BPF), or the port emptied meanwhile."""
    from rebind.kernel.bpf.sockiter import load_sock_layout, prepare, read_socket_states
    from rebind.kernel.bpf.socklookup import lookup_port_buckets
    from rebind.model.sockstate import connect_made

    if not reps or isinstance(prepare(), Unavailable):
        return {}
    ports = list(reps)
    found = lookup_port_buckets(load_sock_layout(), [(p, *reps[p][:3]) for p in ports])
    out: dict[int, bool] = {}
    if not isinstance(found, Unavailable):
        for p, got in zip(ports, found, strict=True):
            if got is not None:
                out[p] = connect_made(*got)
    left = sorted(reps.keys() - out.keys())
    if left:
        walked = read_socket_states(left, [Proto.TCP])
        if isinstance(walked, SockStates):
            for st in walked.sockets:
                if st.bucket is not None:
                    out[st.local.port] = st.bucket.connect_made
    return out
