"""The kernel's own bind state of some ports' sockets: the BPF tcp/udp socket iterators.

inet_diag shows a socket's addresses, state, uid and (LISTEN/CLOSE only) v6only, never the
flags bind() and connect() decide by. The iterators (``bpf_iter__tcp``/``bpf_iter__udp``,
Linux 5.9) hand a program every socket of one network namespace; :mod:`.sockprog`'s program
copies (into :mod:`.socklayout`'s record, decoded by :mod:`.sockdecode`), for the sockets of the asked ports:

- ``skc_reuse`` / ``skc_reuseport`` (SO_REUSEADDR / SO_REUSEPORT; a TIME_WAIT's ``tw_reuse`` /
  ``tw_reuseport`` are the same bits, copied from the closing socket by inet_twsk_alloc),
  ``skc_ipv6only``, ``skc_bound_dev_if``: what inet_csk_bind_conflict / udp_lib_lport_inuse
  compare;
- ``sk_userlocks``: SOCK_BINDPORT_LOCK / SOCK_BINDADDR_LOCK say the port (address) came from
  bind(), not from connect()'s autobind (SOCK_CONNECT_BIND, Linux 6.18) -- what connect()'s
  port choice and __inet_hash_connect's reuse of a port depend on;
- ``sk_uid`` (SO_REUSEPORT compares it) and the iterator's uid;
- for TIME_WAIT: ``tw_substate``, ``tw_ts_recent`` / ``tw_ts_recent_stamp`` (tcp_twsk_unique
  reuses a TIME_WAIT for connect() by its own timestamps) and ``tw_connect_bind`` (6.18);
- for TCP, the port's ``struct inet_bind_bucket`` (``icsk_bind_hash``, a TIME_WAIT's
  ``tw_tb``): the fast-reuse cache (``fastreuse``, ``fastreuseport``, ``fastuid``,
  ``fast_rcv_saddr``, ``fast_v6_rcv_saddr``, ``fast_sk_family``, ``fast_ipv6_only``) that
  lets inet_csk_get_port skip the conflict walk, and so can allow a bind the owners' flags alone
  would refuse; on 6.18 also the (port, address) ``inet_bind2_bucket``'s own
  ``fastreuse``/``fastreuseport`` (``icsk_bind2_hash``, ``tw_tb2``; optional members);
- for UDP, the iterator's hash slot and the order of the sockets in it (the kernel's chain
  order; on 6.7+ the iterator walks ``udptable->hash2``, keyed by address and port).

The iterator runs in the network namespace of the thread that creates it (bpf_iter_init_seq_net
takes current's), and reports that namespace's sockets only (tested:
tests/kernel/test_sockiter.py). Needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), BTF and a
kernel allowing tracing programs (not lockdown "confidentiality"); ``REBIND_NO_BPF=1`` turns
it off, as for the owner scan. Anything missing gives
:class:`~rebind.model.sockstate.Unavailable` with the reason, never an exception: callers fall
back to inet_diag plus what they can infer, and mark the rest unknown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from rebind.errors import RebindError
from rebind.kernel.bpf import btf as btfmod
from rebind.kernel.bpf.layoutcache import layout_cache
from rebind.kernel.bpf.sockdecode import decode_records
from rebind.kernel.bpf.socklayout import (
    COUNT_VALUE,
    OPTIONAL_MEMBERS,
    SOCK_MEMBERS,
    SOCK_TARGETS,
    STOP_KEY,
    SockLayout,
)
from rebind.kernel.bpf.sockprog import Maps, build_sock_program, check_layout, sock_layout_from_btf
from rebind.kernel.bpf.syscall import (
    BPF_MAP_TYPE_HASH,
    BPFUnavailable,
    check_bpf_environment,
    load_program,
    map_create,
    map_lookup,
    map_update,
    run_iterator,
)
from rebind.model.records import Proto, State
from rebind.model.sockstate import (
    PortStateCounts,
    SockState,
    SockStates,
    Unavailable,
)


def _check_caps() -> None:
    check_bpf_environment(honour_no_bpf=True)


def _decode_layout(lines: list[str]) -> SockLayout | None:
    attach: dict[str, int] = {}
    bits: dict[str, btfmod.Bits] = {}
    try:
        for line in lines:
            kind, name, *values = line.split()
            if kind == "attach":
                attach[name] = int(values[0])
            else:
                bits[name] = btfmod.Bits(int(values[0]), int(values[1]))
        lay = SockLayout(attach, bits)
        check_layout(lay)
    except (ValueError, IndexError, KeyError, btfmod.BTFError):
        return None
    required = {f"{s}.{m}" for s, m in SOCK_MEMBERS}
    if set(attach) != set(SOCK_TARGETS) or not required <= set(bits):
        return None
    return lay


def _encode_layout(lay: SockLayout) -> list[str]:
    return [
        *(f"attach {k} {v}" for k, v in sorted(lay.attach.items())),
        *(f"bits {k} {v.bit_offset} {v.bit_size}" for k, v in sorted(lay.bits.items())),
    ]


#: Reading the layout walks most of vmlinux BTF (~0.5 s on 6.18: bench/sockiter.py): cached per
#: boot like the owner scan's, one file per member list (kernel/bpf/layoutcache.py).
LAYOUT_CACHE = layout_cache(
    "bpf-sock-layout",
    3,
    (SOCK_MEMBERS, OPTIONAL_MEMBERS),
    build=sock_layout_from_btf,
    encode=_encode_layout,
    decode=_decode_layout,
)


def load_sock_layout(*, use_cache: bool = True) -> SockLayout:
    """This kernel's layout: from this process, the per-boot cache, or its BTF."""
    return LAYOUT_CACHE.load(use_cache=use_cache)


def current_netns() -> int:
    """The inode of this thread's network namespace (the one the iterators walk)."""
    return os.stat(f"/proc/self/task/{_gettid()}/ns/net").st_ino


def _gettid() -> int:
    return int(os.readlink("/proc/thread-self").rsplit("/", 1)[1])


# ---------------------------------------------------------------------------------------------
# running


def _ports_map(ports: Iterable[int], *, stop_key: bool = False) -> tuple[int, list[int]]:
    wanted = sorted({p for p in ports if 0 < p < 1 << 16})
    keys = wanted + ([STOP_KEY] if stop_key else [])
    fd = map_create(BPF_MAP_TYPE_HASH, 4, COUNT_VALUE.size, max(len(keys), 1))
    try:
        zero = bytes(COUNT_VALUE.size)
        for port in keys:
            map_update(fd, port.to_bytes(4, "little"), zero)
    except BaseException:
        os.close(fd)
        raise
    return fd, wanted


def _iterate(proto: Proto, ports_fd: int, *, count: bool, listeners_only: bool = False) -> bytes:
    lay = load_sock_layout()
    insns = build_sock_program(
        lay, Maps(ports=ports_fd), proto=proto.value, count=count, listeners_only=listeners_only
    )
    prog_fd = load_program(insns, lay.attach[f"bpf_iter_{proto.value}"])
    try:
        return run_iterator(prog_fd, _stopped(ports_fd) if listeners_only else None)
    finally:
        os.close(prog_fd)


def _stopped(ports_fd: int) -> Callable[[], bool]:
    """After EAGAIN in a listeners-only read (build_sock_program's ``listeners_only``): the
    STOP_KEY counter says it was the program's stop, not bpf_seq_read's pause after a million
    objects without output (read again then). A walk without any connection ends by itself."""

    def stopped() -> bool:
        flag = map_lookup(ports_fd, STOP_KEY.to_bytes(4, "little"), COUNT_VALUE.size)
        return bool(COUNT_VALUE.unpack(flag)[0])

    return stopped


def read_socket_states(
    ports: Iterable[int],
    protos: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    *,
    netns: int | None = None,
    listeners_only: bool = False,
) -> SockStates | Unavailable:
    """Every socket of these local ports in this thread's network namespace, as the kernel holds it.

    ``netns``: the namespace the caller means (an inode); if this thread is elsewhere, the
    answer would be another namespace's, so it is Unavailable instead.

    ``listeners_only``: TCP listening sockets only (with their bind bucket), read by walking the
    listening hash and stopping where the established hash begins: a few milliseconds where the
    whole walk takes over a hundred (bench/whyperf.py). UDP is walked whole either way.
    """
    try:
        here = current_netns()
        if netns is not None and netns != here:
            return Unavailable(f"the iterator walks this thread's network namespace ({here}), not {netns}")
        _check_caps()
        fd, wanted = _ports_map(ports, stop_key=listeners_only)
        try:
            if not wanted:
                return SockStates(here, ())
            out: list[SockState] = []
            faulted = 0
            for proto in dict.fromkeys(protos):
                only = listeners_only and proto is Proto.TCP
                got, bad = decode_records(proto, _iterate(proto, fd, count=False, listeners_only=only))
                out.extend(got)
                faulted += bad
        finally:
            os.close(fd)
    except (OSError, RebindError) as exc:  # BPFUnavailable included: never an exception
        return Unavailable(_reason(exc))
    return SockStates(here, tuple(out), faulted, listeners_only=listeners_only)


def prepare(netns: int | None = None) -> int | Unavailable:
    """This thread's network namespace if the BPF socket programs can run here for ``netns``
    (the namespace meant; capabilities, REBIND_NO_BPF, the BTF layout), else why not."""
    try:
        here = current_netns()
        if netns is not None and netns != here:
            return Unavailable(f"the BPF programs read this thread's network namespace ({here}), not {netns}")
        _check_caps()
        load_sock_layout()
    except (BPFUnavailable, OSError) as exc:
        return Unavailable(_reason(exc))
    return here


def count_socket_states(
    ports: Iterable[int], protos: Iterable[Proto] = (Proto.TCP, Proto.UDP)
) -> PortStateCounts | Unavailable:
    """Sockets per (proto, port, state), counted in the kernel: nothing per socket crosses."""
    try:
        here = current_netns()
        _check_caps()
        counts: list[tuple[Proto, int, State, int]] = []
        for proto in dict.fromkeys(protos):
            fd, wanted = _ports_map(ports)  # a fresh map per protocol: counters start at 0
            try:
                if not wanted:
                    continue
                _iterate(proto, fd, count=True)
                for port in wanted:
                    values = COUNT_VALUE.unpack(map_lookup(fd, port.to_bytes(4, "little"), COUNT_VALUE.size))
                    counts += [(proto, port, State(s), n) for s, n in enumerate(values) if n and s in _STATES]
            finally:
                os.close(fd)
    except (OSError, RebindError) as exc:  # BPFUnavailable included: never an exception
        return Unavailable(_reason(exc))
    return PortStateCounts(here, tuple(counts))


_STATES = frozenset(s.value for s in State)


def _reason(exc: BaseException) -> str:
    """One line: an errno's words, or the first line of our error (a verifier's log follows it)."""
    if isinstance(exc, OSError) and not isinstance(exc, BPFUnavailable):
        return f"BPF socket iterator: {exc.strerror or exc}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
