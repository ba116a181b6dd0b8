"""What only the kernel has about a port's sockets, and the cheapest way to read it: the plan
(:func:`iterator_plan`: the listening hash, lookups by 4-tuple, or the whole walk) and carrying
it out with the BPF socket iterator and lookup (kernel/bpf/sockiter.py, socklookup.py), for one
port (`why`, kernel/facts.py) or many at once (the exporter, `top`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rebind.model.advice import Provenance
from rebind.model.conflict import SockOpts
from rebind.model.records import Proto, SocketEntry, SocketTable, State
from rebind.model.request import BindRequest
from rebind.model.sockstate import SockState, SockStates, Unavailable


@dataclass(frozen=True, slots=True)
class KernelRead:
    """How `why` reads what only the kernel has about the port's sockets (iterator_plan).

    Costs on a 211k-socket namespace (bench/whyperf.py): the whole walk ~130 ms CPU whatever the
    port; the listening hash alone ~2 ms; a lookup by 4-tuple ~1 us of kernel time a socket.
    """

    #: TCP: walk the listening hash (listeners' flags, and the bind bucket through them).
    listeners: bool = False
    #: TCP: entries (indexes) to find by their 4-tuple in the established hash: TIME_WAITs and
    #: connections whose flags nobody read, or one socket that leads to the bind bucket.
    lookup: tuple[int, ...] = ()
    #: Walk every socket of the protocol (UDP: the chain order; the iterator decides there).
    walk: bool = False
    #: Why (the first fact that needs the kernel), for docs and tests.
    why: str = ""

    @property
    def nothing(self) -> bool:
        return not (self.listeners or self.lookup or self.walk)


#: Sockets the TCP iterator and lookup cannot help with: request socks (no flags of their own,
#: not in the bind bucket) and bound-only sockets (in no table bpf_iter_tcp walks and not in the
#: established hash: only the bind hashes have them). Their flags come from their owner, or stay
#: unknown.
_NOT_ITERATED = frozenset({State.SYN_RECV, State.NEW_SYN_RECV, State.BOUND_INACTIVE, State.CLOSE})
#: ... and listeners: what is not looked up by 4-tuple in the established hash.
_NOT_CONNECTED = _NOT_ITERATED | {State.LISTEN}
#: sk_bound_dev_if values a lookup from a BPF test run finds: none, or loopback (ifindex 1 in
#: every network namespace: the test run's skb device).
_LOOKUP_DEVICES = frozenset({0, 1})


def iterator_plan(
    req: BindRequest, entries: Sequence[SocketEntry], read: Mapping[int, tuple[SockOpts, Provenance]]
) -> KernelRead:
    """What only the kernel can say exactly about the port, and the cheapest way to read it.

    ``read``: index in ``entries`` -> flags read by pidfd_getfd + getsockopt (Provenance.READ:
    SO_REUSEADDR is sk_reuse, SO_REUSEPORT sk_reuseport, IPV6_V6ONLY sk_ipv6only, the kernel's
    own fields; the device and uid come from inet_diag: idiag_if is sk_bound_dev_if, idiag_uid
    sk_uid). Pure: unit-tested without root (tests/unit/test_iterator_plan.py).

    * No socket of the protocol on the port: nothing to read (and no TCP bind bucket).
    * A socket whose flags were not read -- a TIME_WAIT (tw_reuse/tw_reuseport live only in the
      kernel), a connection not yet accept()ed or held from another PID namespace, a failed
      read: a listener is read by walking the listening hash, any other TCP socket by its
      4-tuple; UDP walks its table.
    * TCP, every flag read: the port's bind bucket still matters. Its SO_REUSEPORT cache
      (tb->fastreuseport, fastuid, fast_rcv_saddr) keeps the uid and address of the last
      SO_REUSEPORT bind on the port also after that socket cleared the flag or closed, and a
      SO_REUSEPORT bind that matches it skips the conflict check (sk_reuseport_match in
      inet_csk_get_port); `why` always weighs SO_REUSEPORT variants, so without the bucket they
      could only be "depends". Every socket in the bucket leads to it (icsk_bind_hash, tw_tb):
      a listener through the listening walk, else one connection looked up; a port of bound-only
      sockets has none the iterator sees (kernel/facts.py then reads the bucket from the bind
      hash, _bucket_from_bind_hash).
    * UDP, every flag read: no bucket cache (udp_lib_get_port checks every socket each time);
      the chain order matters only where udp_lib_lport_inuse may stop early, at a same-uid
      SO_REUSEPORT socket: walk when a socket on the port has SO_REUSEPORT, else nothing.
    """
    # One pass over the table (a port can have ten thousand TIME_WAITs): the port's sockets,
    # those whose flags were not read, and what only the lookups or the walk can reach. Indexes
    # only, and of the unread the first: a tuple per socket cost more than the rest of the pass.
    on_port: list[int] = []
    connected: list[int] = []
    lookup_list: list[int] = []
    first_unread: SocketEntry | None = None
    kernel_only: SocketEntry | None = None
    listening = False
    proto, port = req.proto, req.port
    for i, e in enumerate(entries):
        r = e.socket
        if r.proto is not proto or r.local.port != port:
            continue
        on_port.append(i)
        state = r.state
        listening = listening or state is State.LISTEN
        is_read = (got := read.get(i)) is not None and got[1] is Provenance.READ
        if state not in _NOT_CONNECTED:
            connected.append(i)
            if not is_read:
                lookup_list.append(i)
        if not is_read:
            if first_unread is None:
                first_unread = e
            if kernel_only is None and state not in _NOT_ITERATED:
                kernel_only = e
    if not on_port:
        return KernelRead(why="no socket on the port")
    if req.proto is Proto.UDP:
        if first_unread is not None:
            return KernelRead(walk=True, why=f"flags of {_what(first_unread)} are only in the kernel")
        if any(read[i][0].reuseport for i in on_port):
            return KernelRead(walk=True, why="SO_REUSEPORT on the port: the UDP chain order decides")
        return KernelRead(why="every flag read from its owner; no SO_REUSEPORT on the port")
    lookup = tuple(lookup_list)
    why = "the bind bucket's cache"
    if kernel_only is not None:
        why = f"flags of {_what(kernel_only)} are only in the kernel"
    if not listening and not lookup and connected:
        # any socket in the bucket leads to it; one the lookup can find, if there is one
        findable = [i for i in connected if entries[i].socket.ifindex in _LOOKUP_DEVICES]
        lookup = tuple(findable or [connected[0]])[:1]
    away = [entries[i] for i in lookup if entries[i].socket.ifindex not in _LOOKUP_DEVICES]
    if away:
        # bpf_skc_lookup_tcp compares the test run's device (loopback) with the socket's
        # sk_bound_dev_if (inet_sk_bound_dev_eq): a socket bound elsewhere is not found so.
        return KernelRead(
            walk=True, why=f"flags of {_what(away[0])} are only in the kernel (bound to a device)"
        )
    if not listening and not lookup:
        return KernelRead(why="bound-only sockets: in no table the iterator walks")
    return KernelRead(listeners=listening, lookup=lookup, why=why)


def _what(e: SocketEntry) -> str:
    owner = "" if e.owners else " (no owner in sight)"
    return f"{e.socket.state.label} {e.socket.local}{owner}"


def read_kernel(table: SocketTable, req: BindRequest, plan: KernelRead) -> SockStates | Unavailable:
    """Carry out an iterator_plan: the listening walk and the lookups (each found socket checked
    against its 4-tuple and given inet_diag's cookie), or the whole walk where the lookup is
    unavailable (it needs bpf_skc_lookup_tcp in a test run: Linux 5.2+)."""
    got = read_kernel_ports(table.entries, [(req, plan)])
    return got if got is not None else Unavailable("nothing to read")


def read_kernel_ports(
    entries: Sequence[SocketEntry], plans: Sequence[tuple[BindRequest, KernelRead]]
) -> SockStates | Unavailable | None:
    """Carry out several iterator_plans over one table at once (the exporter and `top` ask for
    many ports per refresh; a walk costs the same for one port as for all of them): one whole
    walk per protocol for the ports that need it, one listening-hash walk for the TCP ports
    whose listeners lead to the bucket, one lookup run for the sockets found by 4-tuple -- or,
    where the lookup is unavailable or misses one (gone since the dump, a VRF), the whole TCP
    walk for those ports. None when no plan reads anything."""
    from rebind.kernel.bpf.sockiter import load_sock_layout, prepare, read_socket_states
    from rebind.kernel.bpf.socklookup import lookup_socket_states

    todo = [(r, p) for r, p in plans if not p.nothing]
    if not todo:
        return None
    netns = next((e.socket.netns for e in entries if e.socket.netns is not None), None)
    walk: dict[Proto, set[int]] = {}
    for r, p in todo:
        if p.walk:
            walk.setdefault(r.proto, set()).add(r.port)
    walked_tcp = walk.get(Proto.TCP, set())
    listen = sorted({r.port for r, p in todo if p.listeners and r.port not in walked_tcp})
    lookup = sorted({i for r, p in todo if r.port not in walked_tcp for i in p.lookup})
    parts: list[SockStates] = []
    looked = False
    if lookup:
        here = prepare(netns)  # before any walk: the lookup alone needs no walk at all
        if isinstance(here, Unavailable):
            return here
        found = lookup_socket_states(load_sock_layout(), [entries[i].socket for i in lookup])
        # `is None`, not `None in`: that compares each SockState with None by its __eq__
        if isinstance(found, Unavailable) or any(st is None for st in found[0]):
            walk.setdefault(Proto.TCP, set()).update(entries[i].socket.local.port for i in lookup)
        else:
            states, faulted = found
            looked = True
            parts.append(SockStates(here, tuple(st for st in states if st is not None), faulted))
    listen = [p for p in listen if p not in walk.get(Proto.TCP, set())]
    for proto, ports in walk.items():
        got = read_socket_states(sorted(ports), [proto], netns=netns)
        if isinstance(got, Unavailable):
            return got
        parts.append(got)
    if listen:
        got = read_socket_states(listen, [Proto.TCP], netns=netns, listeners_only=True)
        if isinstance(got, Unavailable):
            return got
        parts.append(got)
    if not parts:
        here = prepare(netns)
        return here if isinstance(here, Unavailable) else SockStates(here, ())
    seen: dict[int, SockState] = {}
    for part in parts:
        for st in part.sockets:
            seen.setdefault(st.cookie, st)
    partial = bool(listen) or looked  # TCP sockets of other states not looked for
    return SockStates(
        parts[0].netns, tuple(seen.values()), sum(p.faulted for p in parts), listeners_only=partial
    )
