"""Bad input to the Python API is a UsageError with one clear message, never struct.error,
KeyError, TypeError or a hang (issue 8 items 6, 9); one address spelling everywhere (item 20).
No root needed: validation happens before any socket is opened."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import pytest

from rebind.actions.pick import check_range, parse_range, pick_port
from rebind.actions.wait import NotWaitable, wait_bindable, wait_listening
from rebind.errors import ExitCode, UsageError
from rebind.model.records import Endpoint, fmt_addr
from rebind.render import sockets as render
from rebind.sockets import socket_table


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ports": [70000]},
        {"ports": [0]},
        {"ports": [-1]},
        {"ports": ["²"]},
        {"ports": [True]},
        {"ports": "8080"},  # a string is not a list of ports (it would be '8', '0', ...)
        {"ports": 8080},
        {"protos": ["sctp"]},
        {"protos": "tcp"},
        {"protos": []},
        {"families": ["ipx"]},
        {"families": [socket.AF_UNIX]},
        {"states": ["bogus"]},
        {"states": [99]},
    ],
    ids=repr,
)
def test_socket_table_rejects_bad_filters(kwargs):
    with pytest.raises(UsageError) as err:
        socket_table(owners=False, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port_range": ("a", "b")},
        {"port_range": (1, 70000)},
        {"port_range": (0, 10)},
        {"port_range": (30, 20)},
        {"port_range": "20000-21000"},
        {"port_range": (1, 2, 3)},
        {"port_range": None, "proto": "sctp"},
        {"lease": float("inf")},
        {"lease": float("nan")},
        {"lease": -1},
        {"lease": 1e300},
    ],
    ids=repr,
)
def test_pick_port_rejects_bad_arguments(kwargs):
    with pytest.raises(UsageError):
        pick_port(**kwargs)


@pytest.mark.parametrize("text", ["²-³", "1-²", "a-b", "20000-", "-5", "", "1-70000", "٣"])
def test_parse_range_rejects(text):
    with pytest.raises(UsageError):
        parse_range(text)


def test_ranges_accepted():
    assert parse_range("20000-21000") == (20000, 21000)
    assert parse_range("80") == (80, 80)
    assert check_range([1, 2]) == (1, 2)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), float("-inf"), 1e300, -1])
def test_wait_rejects_non_finite_timeouts(timeout):
    with pytest.raises(UsageError):
        wait_bindable(1, timeout=timeout)
    with pytest.raises(UsageError):
        wait_listening(1, timeout=timeout)


def test_wait_rejects_bad_interval():
    for interval in (0, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            wait_bindable(1, timeout=1, interval=interval)


def test_not_waitable_exit_code_follows_errno():
    import errno

    assert NotWaitable("x", errno.EACCES).exit_code == ExitCode.ENVIRONMENT
    assert NotWaitable("x", errno.EAFNOSUPPORT).exit_code == ExitCode.ENVIRONMENT
    assert NotWaitable("x", errno.EINVAL).exit_code == ExitCode.USAGE


def test_ipv4_mapped_addresses_print_dotted_everywhere():
    mapped = ip_address("::ffff:127.0.0.1")
    assert fmt_addr(mapped) == "::ffff:127.0.0.1"
    assert str(Endpoint(mapped, 80)) == "[::ffff:127.0.0.1]:80"
    assert render.endpoint_json(Endpoint(mapped, 80)) == {"addr": "::ffff:127.0.0.1", "port": 80}
    for plain in ("::1", "::", "127.0.0.1", "fe80::1", "::127.0.0.1"):
        assert fmt_addr(ip_address(plain)) == str(ip_address(plain))


# ---------------------------------------------------------------------------------------------
# Every public function (rebind.__all__) with bad input: a RebindError with one line, never a
# raw AttributeError / OverflowError / gaierror (audit 2026-12-05 L2). Each case fails before
# any socket is opened or any table is read, so no root and no namespace are needed.


def _start_server(host: object, **kw: object) -> object:
    import asyncio

    import rebind

    async def go() -> object:
        return await rebind.start_server(lambda _r, _w: None, host, 0, **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


def _bad_api_calls() -> list[tuple[str, object]]:
    import rebind as r

    nan = float("nan")
    return [
        ("diagnose(None)", lambda: r.diagnose(None)),
        ("diagnose(8080)", lambda: r.diagnose(8080)),
        ("diagnose('8080')", lambda: r.diagnose("8080")),
        ("diagnose(req, table=5)", lambda: r.diagnose(r.default_request(1), table=5)),
        ("default_request(None)", lambda: r.default_request(None)),
        ("default_request(70000)", lambda: r.default_request(70000)),
        ("default_request(1, addr=5)", lambda: r.default_request(1, addr=5)),
        ("default_request(1, proto=None)", lambda: r.default_request(1, proto=None)),
        ("default_request(1, device=5)", lambda: r.default_request(1, device=5)),
        ("socket_table(protos=None)", lambda: r.socket_table(protos=None, owners=False)),
        ("socket_table(states='LISTEN')", lambda: r.socket_table(states="LISTEN", owners=False)),
        ("socket_table_all_netns(ports=[70000])", lambda: r.socket_table_all_netns(ports=[70000])),
        ("wait_bindable(None)", lambda: r.wait_bindable(None, timeout=0.1)),
        ("wait_bindable(addr=host name)", lambda: r.wait_bindable(1, addr="notahost.invalid", timeout=0.1)),
        ("wait_bindable(timeout='x')", lambda: r.wait_bindable(1, timeout="x")),
        ("wait_listening(proto='x')", lambda: r.wait_listening(1, proto="x", timeout=0.1)),
        ("free(None)", lambda: r.free(None)),
        ("free(on_event=5)", lambda: r.free(1, on_event=5)),
        ("plan_free(70000)", lambda: r.plan_free(70000)),
        ("plan_free(signal='BOGUS')", lambda: r.plan_free(1, signal="BOGUS")),
        ("plan_free(signal=None)", lambda: r.plan_free(1, signal=None)),
        ("plan_free(signal=1.5)", lambda: r.plan_free(1, signal=1.5)),
        ("plan_free(signal=True)", lambda: r.plan_free(1, signal=True)),
        ("plan_free(signal=10**30)", lambda: r.plan_free(1, signal=10**30)),
        ("plan_free(grace=nan)", lambda: r.plan_free(1, grace=nan)),
        ("plan_free(req, proto=)", lambda: r.plan_free(r.default_request(1), proto="udp")),
        ("free(req, addr=)", lambda: r.free(r.default_request(1), addr="127.0.0.1")),
        ("wait_bindable(req, reuseaddr=)", lambda: r.wait_bindable(r.default_request(1), reuseaddr=True)),
        ("plan_free(None)", lambda: r.plan_free(None)),
        ("execute_plan(None)", lambda: r.execute_plan(None)),
        ("execute_plan('x')", lambda: r.execute_plan("x")),
        ("pick_port('x')", lambda: r.pick_port("x")),
        ("pick_port(settings=5)", lambda: r.pick_port(settings=5)),
        ("wait_bindable(on_progress=5)", lambda: r.wait_bindable(1, timeout=0.1, on_progress=5)),
        ("pick_port(port_range=(1,))", lambda: r.pick_port(port_range=(1,))),
        ("connect_diagnose(None, 80)", lambda: r.connect_diagnose(None, 80, owners=False)),
        ("connect_diagnose(port 70000)", lambda: r.connect_diagnose("127.0.0.1", 70000, owners=False)),
        ("connect_diagnose(local_port=70000)", lambda: r.connect_diagnose("127.0.0.1", 80, local_port=70000)),
        ("listen(backlog=10**12)", lambda: r.listen("127.0.0.1", 0, backlog=10**12)),
        ("listen(backlog=-5)", lambda: r.listen("127.0.0.1", 0, backlog=-5)),
        ("listen(backlog='x')", lambda: r.listen("127.0.0.1", 0, backlog="x")),
        ("listen(backlog=True)", lambda: r.listen("127.0.0.1", 0, backlog=True)),
        ("listen(5, 0)", lambda: r.listen(5, 0)),
        ("listen(NUL in host)", lambda: r.listen("127.0.0.1\0", 0)),
        ("listen(63+ char label)", lambda: r.listen("a" * 300, 0)),
        ("listen(name=5)", lambda: r.listen("127.0.0.1", 0, name=5)),
        ("listen(reuseport='yes')", lambda: r.listen("127.0.0.1", 0, reuseport="yes")),
        ("listen(dual_stack=1)", lambda: r.listen("::", 0, dual_stack=1)),
        ("listen(port=None)", lambda: r.listen("127.0.0.1", None)),
        ("start_server(backlog=10**12)", lambda: _start_server("127.0.0.1", backlog=10**12)),
        ("start_server(5)", lambda: _start_server(5)),
        ("notify(5)", lambda: r.notify(5)),
        ("notify(None)", lambda: r.notify(None)),
        ("notify_ready(5)", lambda: r.notify_ready(5)),
    ]


@pytest.mark.parametrize(("label", "call"), _bad_api_calls(), ids=[c[0] for c in _bad_api_calls()])
def test_public_api_bad_input_is_one_clear_rebind_error(
    label: str, call, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rebind.errors import RebindError

    # notify() only looks at its argument when there is someone to tell.
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")

    with pytest.raises(RebindError) as err:
        call()
    assert "\n" not in str(err.value), label


def test_listen_unresolvable_host_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host name the resolver does not know: getaddrinfo's gaierror becomes one line (the lookup
    is replaced so the test does not depend on the machine's DNS)."""
    import rebind

    def no_such_host(*_a: object, **_k: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(
        UsageError, match=r"cannot resolve host 'notahost\.invalid': Name or service not known"
    ):
        rebind.listen("notahost.invalid", 0)
    with pytest.raises(UsageError, match="cannot resolve host"):
        _start_server("notahost.invalid")


def test_diagnose_names_what_it_needs() -> None:
    import rebind

    with pytest.raises(UsageError, match=r"diagnose\(\) needs a BindRequest, not NoneType"):
        rebind.diagnose(None)  # type: ignore[arg-type]


def test_a_request_is_taken_as_is_and_keywords_build_the_same_one() -> None:
    from rebind.diagnosis import default_request, request_for

    req = default_request(8080, proto="udp", addr="127.0.0.1", reuseaddr=True)
    assert request_for(req) is req
    assert request_for(8080, proto="udp", addr="127.0.0.1", reuseaddr=True) == req
    with pytest.raises(UsageError, match=r"belong in the BindRequest.*\(got addr, proto\)"):
        request_for(req, proto="tcp", addr="::1")
