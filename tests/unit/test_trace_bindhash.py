"""`rebind trace`'s bind-hash snapshot without a kernel: the owners' records with their extras
(inode, TIME_WAIT jiffies left) decoded, each socket turned into the SocketRecord inet_diag would
report (kernel/bindhash_table.py: pure), HZ from two samples, the walk's doubts refused, and
facts.gather using the given kernel states as they are. The kernel side, and the equality with
inet_diag's snapshot, is tests/kernel/test_trace_bindhash_kernel.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from rebind.kernel import bindhash_table as T
from rebind.kernel import hz as HZ
from rebind.kernel.bpf import asm
from rebind.kernel.bpf import bindhash as H
from rebind.kernel.bpf import bindhashlayout as L
from rebind.kernel.bpf import socklayout as R
from rebind.kernel.bpf.bindowners import (
    EXTRA_INODE,
    EXTRA_TW_LEFT,
    HELPER_JIFFIES64,
    OwnerState,
    build_owners_program,
)
from rebind.model.records import Endpoint, Family, Proto, SocketRecord, State, Timer
from rebind.model.sockstate import PortOwners, SockKind, SockState, Unavailable
from tests.unit.test_bpf_bindhash import FAKE, _helpers, _state
from tests.unit.test_bpf_sockiter import _record, fake_layout

LO = bytes([127, 0, 0, 1])


def _st(kind: SockKind, state: State, family: Family = Family.INET, **kw: object) -> SockState:
    addr = IPv4Address("127.0.0.1") if family is Family.INET else IPv6Address("::")
    args: dict[str, object] = dict(
        proto=Proto.TCP, family=family, state=state, kind=kind, local=Endpoint(addr, 8080),
        remote=Endpoint(addr, 0), cookie=0, netns=7, uid=None if kind is SockKind.TIMEWAIT else 1000,
        sk_uid=1000, bound_dev_if=0, reuse=0, reuseport=False, ipv6only=False, userlocks=12,
    )  # fmt: skip
    args.update(kw)
    return SockState.make(**args)  # type: ignore[arg-type]


def test_a_listener_becomes_inet_diags_record() -> None:
    r = T.to_record(_st(SockKind.FULL, State.LISTEN, bound_dev_if=3), 4242, None, 99)
    assert (r.state, r.uid, r.inode, r.cookie, r.ifindex, r.timer, r.expires_ms) == (
        State.LISTEN, 1000, 4242, 99, 3, Timer.NONE, None,
    )  # fmt: skip
    assert r.v6only is None and r.netns == 7 and not r.is_mini


def test_a_time_wait_has_its_substate_time_left_and_no_owner() -> None:
    st = _st(SockKind.TIMEWAIT, State.TIME_WAIT, tw_substate=State.FIN_WAIT2, userlocks=None)
    r = T.to_record(st, 0, 41_000, 5)
    assert (r.state, r.timer, r.expires_ms, r.uid, r.inode) == (
        State.FIN_WAIT2,
        Timer.TIME_WAIT,
        41_000,
        None,
        None,
    )
    assert r.is_mini


def test_close_in_a_bind_bucket_is_bound_inactive_and_v6only_as_inet_diag_says() -> None:
    bound = T.to_record(_st(SockKind.FULL, State.CLOSE, Family.INET6, ipv6only=True), 1, None, 1)
    assert bound.state is State.BOUND_INACTIVE and bound.v6only is True
    est = T.to_record(_st(SockKind.FULL, State.ESTABLISHED, Family.INET6, ipv6only=True), 1, None, 1)
    assert est.v6only is None  # inet_diag_msg_attrs_fill: LISTEN and CLOSE only
    assert T.to_record(_st(SockKind.FULL, State.LISTEN), 0, None, 1).inode is None  # an orphan: no file


@pytest.mark.parametrize(
    ("j", "hz", "ms"), [(10, 250, 40), (0, 1000, 0), (-5, 250, 0), (1, 300, 4), (3, 100, 30)]
)
def test_jiffies_to_ms_as_the_kernel_rounds(j: int, hz: int, ms: int) -> None:
    assert T.jiffies_to_ms(j, hz) == ms


@pytest.mark.parametrize(
    ("dj", "dns", "hz"),
    [(25, 100_000_000, 250), (26, 100_000_000, 250), (30, 100_000_000, 300), (100, 100_000_000, 1000),
     (10, 100_000_000, 100), (3, 10_000_000, None), (0, 100_000_000, None), (5, 0, None)],
)  # fmt: skip
def test_hz_is_a_standard_value_or_unknown(dj: int, dns: int, hz: int | None) -> None:
    assert T.snap_hz(dj, dns) == hz


def test_owner_records_carry_inode_and_time_left_and_still_share_their_common() -> None:
    tw = {"family": 2, "lport": 9000, "state": State.TIME_WAIT, "kind": R.KIND_TIMEWAIT, "rcv_saddr": LO,
          "tw_substate": State.TIME_WAIT, "tw_connect_bind": R.ABSENT}  # fmt: skip
    data = b"".join(
        [
            _record(cookie=0, dport=(40001).to_bytes(2, "big"), **{EXTRA_TW_LEFT: 1000}, **tw),
            _record(cookie=0, dport=(40002).to_bytes(2, "big"), **{EXTRA_TW_LEFT: 999}, **tw),
            _record(cookie=3, sk_uid=1000, uid=1000, family=2, lport=9000, state=State.LISTEN, rcv_saddr=LO,
                    **{EXTRA_INODE: 777}),
        ]
    )  # fmt: skip
    owners, rows, dec = H._owners_and_rows(7, 9000, _state(FLAGS=L.RAN, EMITTED=3), data)
    assert owners == H._owners_of(7, 9000, _state(FLAGS=L.RAN, EMITTED=3), data)
    assert owners.sockets[0].common is owners.sockets[1].common  # the extras are a socket's own
    got = T.PortSockets(
        owners, tuple(r[dec.bucket] for r in rows), tuple(r[dec.chain_after] for r in rows), 0, 0
    )
    recs = T.to_records(got, 250)
    assert [r.expires_ms for r, _ in recs] == [4000, 3996, None]
    assert [r.inode for r, _ in recs] == [None, None, 777]
    cookies = [r.cookie for r, _ in recs]
    assert cookies[2] == 3 and len(set(cookies)) == 3 and all(c >= T.LOCAL_COOKIE for c in cookies[:2])


def test_the_owners_program_reads_the_timer_against_jiffies() -> None:
    raw, _ = build_owners_program(FAKE, fake_layout(), 11, 12)
    assert HELPER_JIFFIES64 in _helpers(raw)
    text = asm.disassemble(raw)
    # main: jiffies_64 at the run, into the state map (r8) for the HZ calibration
    at = next(i for i, line in enumerate(text) if line.endswith(f"call helper {HELPER_JIFFIES64}"))
    assert text[at + 1].endswith(f"*(u64 *)(r8 + {OwnerState.JIFFIES}) = r0")
    # emit: the TIME_WAIT's timer minus jiffies, the helper called there too
    assert sum(line.endswith(f"call helper {HELPER_JIFFIES64}") for line in text) == 2


@pytest.mark.parametrize(
    ("owners", "why"),
    [
        (PortOwners(1, 80, (), truncated=True), "more than"),
        (PortOwners(1, 80, (), faulted=1), "changed"),
        (PortOwners(1, 80, (), inconsistent=True), "changed"),
        (PortOwners(1, 80, ()), None),
    ],
)
def test_any_doubt_about_the_walk_is_refused(owners: PortOwners, why: str | None) -> None:
    got = T.problem(owners)
    assert got is None if why is None else why in (got or "")


def test_gather_uses_the_given_states_and_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from rebind.kernel import facts as F
    from rebind.model.advice import Provenance
    from rebind.model.conflict import KernelSettings
    from rebind.model.records import SocketEntry, SocketTable
    from rebind.model.request import BindRequest
    from rebind.model.sockstate import SockStates

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("read again")

    monkeypatch.setattr(F, "_kernel_states", boom)
    monkeypatch.setattr(F, "_read_flags", boom)
    st = _st(SockKind.FULL, State.LISTEN, reuse=1)
    rec = T.to_record(st, 5, None, 1)
    table = SocketTable((SocketEntry(rec),), source="bindhash", owners_scanned=False)
    req = BindRequest(proto=Proto.TCP, addr=IPv4Address("127.0.0.1"), port=8080, uid=0)
    facts = F.gather(req, owners=False, table=table, trials=False, settings=KernelSettings(),
                     states=SockStates(7, (st,)))  # fmt: skip
    (h,) = facts.holders
    assert h.provenance is Provenance.KERNEL and h.opts.reuseaddr is True and h.kernel is st


def test_a_record_built_by_its_slots_equals_one_built_by_init() -> None:
    from dataclasses import fields

    from rebind.model.records import SocketRecord

    st = _st(SockKind.FULL, State.LISTEN, Family.INET6, ipv6only=True, bound_dev_if=2)
    r = T.to_record(st, 9, None, 4)
    assert r == SocketRecord(
        proto=Proto.TCP, family=Family.INET6, state=State.LISTEN, local=st.local, remote=st.remote, uid=1000,
        inode=9, cookie=4, ifindex=2, v6only=True, netns=7,
    )  # fmt: skip
    assert [f.name for f in fields(SocketRecord)][-2:] == ["netns", "birth"]  # to_record's order


def test_the_table_order_is_the_walks() -> None:
    from rebind.kernel.walk import _order

    pairs = []
    for i, (addr, port, rport, state) in enumerate(
        [("127.0.0.1", 80, 40000, State.TIME_WAIT), ("127.0.0.1", 80, 5000, State.TIME_WAIT),
         ("0.0.0.0", 80, 0, State.LISTEN), ("::", 80, 0, State.LISTEN), ("::1", 80, 9, State.ESTABLISHED),
         ("127.0.0.2", 80, 0, State.CLOSE)]
    ):  # fmt: skip
        fam = Family.INET6 if ":" in addr else Family.INET
        kind = SockKind.TIMEWAIT if state is State.TIME_WAIT else SockKind.FULL
        from ipaddress import ip_address

        a = ip_address(addr)
        st = _st(kind, state, fam, local=Endpoint(a, port), remote=Endpoint(a, rport), tw_substate=state)
        pairs.append((T.to_record(st, i, 1, i), st))
    assert [r for r, _ in T.table_order(pairs)] == sorted((r for r, _ in pairs), key=_order)


def test_hz_is_calibrated_once_and_an_ambiguous_rate_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0]

    def fake_sleep(s: float) -> None:
        clock[0] += int(s * 1e9)

    def sample(rate: float) -> object:
        def read(port: int, limit: int) -> T.PortSockets:
            return T.PortSockets(PortOwners(1, port, ()), (), (), int(clock[0] * rate / 1e9), clock[0])

        return read

    monkeypatch.setattr(T.time, "sleep", fake_sleep)
    # nothing known without measuring (kernel/hz.py's other sources), and nothing kept for the boot
    monkeypatch.setattr(HZ, "_MEMO", {})
    monkeypatch.setattr(HZ, "config_hz", lambda: None)
    monkeypatch.setattr(HZ, "cache_key", lambda: None)
    monkeypatch.setattr(T, "read_port_sockets", sample(250))
    assert T.calibrate_hz() == 250
    monkeypatch.setattr(T, "read_port_sockets", sample(1))
    assert T.calibrate_hz() == 250  # kept
    monkeypatch.setattr(HZ, "_MEMO", {})
    monkeypatch.setattr(T, "read_port_sockets", sample(600))  # no standard HZ near it
    assert T.calibrate_hz(wait=0) is None
    monkeypatch.setattr(T, "read_port_sockets", sample(250))
    assert T.calibrate_hz() is None  # not tried again


# ---------------------------------------------------------------------------------------------
# decode_port: the reference pipeline's answer (read_port_owners' SockStates, to_records, the
# failing socket left out, table_order), socket for socket, in one pass


def _mixed_port(port: int = 9000, *, bad: bool = False) -> list[bytes]:
    """Records of one port as the owners program writes them: a listener on 0.0.0.0 and its
    children's TIME_WAITs (two client addresses, remote ports whose text sorts otherwise than
    their numbers, one FIN_WAIT2 kept as a TIME_WAIT, one without a cookie yet), a bound-only
    IPv6 socket, a dual-stack listener on [::], an IPv6 TIME_WAIT, an orphan (no inode); with
    ``bad``, a faulted record and one of another port (reused mid-walk)."""
    lo2 = bytes([127, 0, 0, 2])
    v6 = IPv6Address("::1").packed
    tw = {"family": 2, "lport": port, "state": State.TIME_WAIT, "kind": R.KIND_TIMEWAIT, "rcv_saddr": LO,
          "tw_substate": State.TIME_WAIT, "tw_connect_bind": R.ABSENT, "has_bucket": 1, "tb_port": port,
          "reuse": 1}  # fmt: skip
    full = {"family": 2, "lport": port, "kind": R.KIND_FULL, "uid": 1000, "sk_uid": 1000, "has_bucket": 3,
            "tb_port": port, "userlocks": 12}  # fmt: skip
    out = [
        _record(cookie=11, state=State.LISTEN, **{EXTRA_INODE: 555}, **full),
        _record(cookie=12, state=State.LISTEN, **{**full, "family": 10, "v6_rcv_saddr": bytes(16)},
                **{EXTRA_INODE: 556}),
        _record(cookie=13, state=State.CLOSE, ipv6only=1, **{EXTRA_INODE: 557},
                **{**full, "family": 10, "v6_rcv_saddr": v6}),
        _record(cookie=14, state=State.ESTABLISHED, rcv_saddr=LO, daddr=lo2, dport=(4000).to_bytes(2, "big"),
                **full),  # an orphan: no file, no inode
    ]  # fmt: skip
    for k, rport in enumerate([40001, 5000, 39999, 40001, 700, 65535, 1024]):
        peer = LO if k % 2 else lo2
        out.append(_record(cookie=0 if k == 3 else 100 + k, daddr=peer, dport=rport.to_bytes(2, "big"),
                           tw_ts_recent=k, tw_ts_recent_stamp=k + 1, **{EXTRA_TW_LEFT: 250 * k + 1}, **tw))  # fmt: skip
    out.append(_record(cookie=120, daddr=LO, dport=(41000).to_bytes(2, "big"), **{EXTRA_TW_LEFT: 0},
                       **{**tw, "tw_substate": State.FIN_WAIT2}))  # fmt: skip
    out.append(_record(cookie=121, dport=(41001).to_bytes(2, "big"), v6_daddr=v6, **{EXTRA_TW_LEFT: 3},
                       **{**tw, "family": 10, "v6_rcv_saddr": v6}))  # fmt: skip
    if bad:
        out.append(_record(cookie=122, faults=1, **tw))
        out.append(_record(cookie=123, **{**tw, "lport": port + 1}))
    return out


def _reference(data: bytes, without: int, hz: int = 250) -> tuple[list[object], tuple[SockState, ...]]:
    owners, rows, dec = H._owners_and_rows(7, 9000, _state(FLAGS=L.RAN, EMITTED=len(data) // 144), data)
    got = T.PortSockets(
        owners, tuple(r[dec.bucket] for r in rows), tuple(r[dec.chain_after] for r in rows), 0, 0
    )
    pairs = T.table_order([p for p in T.to_records(got, hz) if not without or p[0].inode != without])
    return [r for r, _ in pairs], tuple(st for _, st in pairs)


@pytest.mark.parametrize("without", [0, 555, 557, 999])
@pytest.mark.parametrize("only_time_waits", [False, True], ids=["mixed", "time-waits"])
def test_decode_port_is_the_reference_pipeline_socket_for_socket(without: int, only_time_waits: bool) -> None:
    from rebind.model.sockstate import SockStates

    recs = _mixed_port()
    if only_time_waits:  # one local end: the sort by the remote end alone
        kind, family = R.RECORD_NAMES.index("kind"), R.RECORD_NAMES.index("family")
        recs = [
            r for r in recs if R.RECORD.unpack(r)[kind] == R.KIND_TIMEWAIT and R.RECORD.unpack(r)[family] == 2
        ]
    data = b"".join(recs)
    state = _state(FLAGS=L.RAN, EMITTED=len(recs))
    got = T.decode_port(7, 9000, state, data, 250, without)
    assert not isinstance(got, Unavailable)
    records, states = got
    want_records, want_states = _reference(data, without)
    assert records == want_records  # every field, in the same order
    assert [type(r) for r in records] == [SocketRecord] * len(records)
    assert [repr(r) for r in records] == [repr(r) for r in want_records]
    assert states == SockStates(7, want_states)
    assert len({id(st.common) for st in states.sockets}) < len(states.sockets)  # still shared
    if without in (555, 557):
        assert without not in {r.inode for r in records}


def test_decode_port_refuses_what_the_reference_refuses() -> None:
    for data in (b"".join(_mixed_port()), b"".join(_mixed_port(bad=True))):
        n = len(data) // 144
        for flags in (L.RAN | L.INCONSISTENT, L.RAN | L.FAULTED, L.RAN | L.OWNERS_TRUNCATED, 0, L.RAN):
            got = T.decode_port(7, 9000, _state(FLAGS=flags, EMITTED=n), data, 250)
            owners, _, _ = H._owners_and_rows(7, 9000, _state(FLAGS=flags, EMITTED=n), data)
            why = T.problem(owners)
            assert got.reason == why if isinstance(got, Unavailable) else why is None
    # the faulted record and the other port's are counted as read_port_owners counts them
    data = b"".join(_mixed_port(bad=True))
    owners, _, _ = H._owners_and_rows(7, 9000, _state(FLAGS=L.RAN, EMITTED=len(data) // 144), data)
    assert owners.faulted == 2
    assert isinstance(
        T.decode_port(7, 9000, _state(FLAGS=L.RAN, EMITTED=len(data) // 144), data, 250), Unavailable
    )


def test_records_built_in_plain_classes_of_their_slots_are_the_dataclasses() -> None:
    from dataclasses import FrozenInstanceError

    from rebind.slotted import twin

    slots = twin(Endpoint)
    e = slots()
    e.addr, e.port = IPv4Address("127.0.0.1"), 80
    e.__class__ = Endpoint
    assert type(e) is Endpoint and e == Endpoint(IPv4Address("127.0.0.1"), 80)
    assert hash(e) == hash(Endpoint(IPv4Address("127.0.0.1"), 80)) and str(e) == "127.0.0.1:80"
    with pytest.raises(FrozenInstanceError):
        e.port = 81  # type: ignore[misc]

    class Plain:
        pass

    with pytest.raises(TypeError):
        twin(Plain)
