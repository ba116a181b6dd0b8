"""The first inet_diag dump of `why --connect`'s bind-hash path, started before anything else
(kernel/connect_facts.py: gather(summary=True); docs/benchmarks.md, 2026-12-06).

Beside the range's bind buckets (kernel/connect_range.py) the answer needs only some sockets one
by one: the ones connected to the destination (4-tuples, time-wait entries), every peerless one
(listeners, bound-inactive sockets: their port's kind, and the servers' ports a widened range
must spare), every one on a fixed local port -- none of which depends on the bind hash -- and
the sockets of the range's bind-made ports (the consumers' ``by_bind``), which does. The walk of
the whole TCP table costs the same whatever the filter (~75 ms on 211k sockets, kernel time with
the GIL released), so the first part is asked at once, in a thread of its own, while the caller
imports, reads the settings and the bind hash; the bind-made ports' sockets, when there are any,
follow in a second dump filtered to them (:func:`bind_made_bytecode`).

This module imports only the dump's reader.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rebind.model.connect.request import ConnectRequest
    from rebind.model.records import SocketRecord


def worth_starting(req: ConnectRequest) -> bool:
    """Will the bind-hash path run, as far as can be told at once (summary_suffices, BPF's cheap
    checks: REBIND_NO_BPF, the capabilities)? Where it cannot the first dump would be a walk of
    the table thrown away: gather then reads every socket of the range in one dump."""
    from rebind.kernel.bpf.syscall import BPFUnavailable, check_bpf_environment
    from rebind.model.connect.facts import summary_suffices

    if not summary_suffices(req.proto, own_choice=req.own_choice, fixed_port=req.local_port is not None):
        return False
    try:
        check_bpf_environment(honour_no_bpf=True)
    except BPFUnavailable:
        return False
    return True


def first_bytecode(req: ConnectRequest) -> bytes:
    """Every socket connected to the destination, every peerless one, every one on the fixed
    local port: what the answer names whatever the bind hash says."""
    from rebind.kernel import diag_codec as codec

    chains: list[list[codec.Cond]] = [
        [codec.host_cond(codec.BcOp.D_COND, req.dst, port=req.dport)],
        [codec.port_cond(codec.BcOp.D_EQ, 0)],
    ]
    if req.local_port is not None:
        chains.append([codec.port_cond(codec.BcOp.S_EQ, req.local_port)])
    return codec.compile_any(chains)


#: Up to this many bind-made ports of the range, their sockets come from the bind hash, one
#: chain each (:func:`bind_made_sockets`), past it from a second dump.
PER_PORT_MAX = 64
#: The most sockets one port's read takes before it gives up (the second dump then).
PORT_LIMIT = 4096


def bind_made_sockets(
    req: ConnectRequest, ports: list[int], first: list[SocketRecord]
) -> list[SocketRecord] | None:
    """The sockets on ``ports`` (bind-made ports of the range) that the first dump does not have
    -- connected elsewhere -- read from each port's bind buckets
    (kernel/bindhash_table.read_port_sockets: one chain, no walk of the table), or None where
    that cannot stand for the dump (too many ports, a walk that faulted or was cut short, no
    BPF): the caller dumps them. TIME_WAITs are left out: they have no owner, and a bind-made
    port is decided by its bucket (the consumers' ``by_bind`` is all these sockets serve)."""
    from rebind.kernel.bindhash_table import LOCAL_COOKIE, problem, read_port_sockets, to_record
    from rebind.model.sockstate import SockKind, Unavailable

    if len(ports) > PER_PORT_MAX:
        return None
    seen = {(r.local, r.remote) for r in first}
    out: list[SocketRecord] = []
    for port in ports:
        got = read_port_sockets(port, PORT_LIMIT)
        if isinstance(got, Unavailable) or problem(got.owners) is not None:
            return None
        for i, (st, inode) in enumerate(zip(got.owners.sockets, got.inodes, strict=True)):
            if st.kind is SockKind.TIMEWAIT or not st.remote.port or (st.local, st.remote) in seen:
                continue  # no owner; peerless (the first dump has every one); in the first dump
            out.append(to_record(st, inode, None, st.cookie or LOCAL_COOKIE | i))
    return out


def dump_tcp(bc: bytes) -> list[SocketRecord]:
    """One TCPDIAG_GETSOCK walk, both families, every state, filtered by ``bc``."""
    from rebind.kernel import diag
    from rebind.model.records import Proto, State

    with diag.DiagSocket() as d:
        return list(d.dump(None, Proto.TCP, frozenset(State), bytecode=bc))


class FirstDump:
    """:func:`first_bytecode`'s dump, running in a thread from construction on."""

    def __init__(self, req: ConnectRequest) -> None:
        self.req = req
        self._records: list[SocketRecord] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rebind-connect-dump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._records = dump_tcp(first_bytecode(self.req))
        except BaseException as exc:  # raised again in the caller's thread (result)
            self._error = exc

    def result(self) -> list[SocketRecord]:
        """The records (waits for the dump); its error, if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._records is not None
        return self._records
