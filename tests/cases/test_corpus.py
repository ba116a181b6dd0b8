"""Runs the corpus of real cases (tests/cases/corpus.py): the situation is rebuilt in a throwaway
namespace, `rebind why` must name the true cause and print a fix, the fix runs exactly as
printed, and the reporter's server then binds (issue 20)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rebind.kernel.wellknown import catalogue
from rebind.model.records import Proto
from rebind.model.wellknown import ProcFacts, Recognised, recognise
from tests.cases.corpus import CASES, LISTEN, ORPHAN, Case
from tests.cases.daemons import DAEMONS
from tests.cases.sandbox import VENV_BIN, bind_works, need, port_held, run_on_terminal, sandbox, wait_for
from tests.conftest import Procs


def why(case: Case) -> dict[str, Any]:
    args = [str(case.port), *(["--udp"] if case.proto == "udp" else []), *case.why, "--json"]
    env = dict(os.environ, NO_COLOR="1")
    res = subprocess.run(
        [sys.executable, "-m", "rebind", "why", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode in (0, 1), res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def check_cause(case: Case, doc: dict[str, Any]) -> None:
    what, _, value = case.cause.partition(":")
    if what == "wellknown":
        assert [w["id"] for w in doc["wellknown"]] == [value], (doc["wellknown"], doc["lookalikes"])
    elif what == "blocker":
        assert value in {b["kind"] for b in doc["blockers"]}, [b["kind"] for b in doc["blockers"]]
    elif what == "localhost":
        assert doc["localhost"] is not None and doc["localhost"]["kind"] == value, doc["localhost"]
    else:
        raise AssertionError(f"unknown cause {case.cause}")


def terminal_env() -> dict[str, str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def start(procs: Procs, case: Case) -> None:
    for p in case.procs:
        code = p.snippet.format(addr=p.addr, port=case.port, reuseaddr=p.reuseaddr, v6only=p.v6only)
        # A shell starts the server as its own process-group leader (what lets `why` see that
        # the orphan's group leader is gone).
        proc = procs.python(code, start_new_session=p.snippet is ORPHAN)
        line = procs.wait_line(proc)
        if line.isdigit():
            procs.adopt(int(line))  # the orphaned child
        if p.exits:
            proc.wait(10)


def run_python_case(case: Case, procs: Procs) -> None:
    start(procs, case)
    doc = why(case)
    check_cause(case, doc)
    if case.fix.startswith("fix:"):
        title = case.fix[4:]
        (fix,) = [f for f in doc["fixes"] if f["title"].startswith(title)][:1]
        assert fix["command"], fix
        rc, out = run_on_terminal(fix["command"], terminal_env())
        assert rc == 0, out
        assert bind_works(case.port, case.proto, case.bind_addr), out
    elif case.fix.startswith("localhost:"):
        side = case.fix.split(":")[1]
        lh = doc["localhost"]
        text = "\n".join(lh["text"])
        assert "127.0.0.1" in text and "::1" in text
        target = lh["ipv4" if side == "v4" else "ipv6"]["listeners"][0]
        (line,) = [c for c in lh["commands"] if target in c or target.replace("[", "'[") in c]
        rc, out = run_on_terminal(line, terminal_env())
        assert rc == 0, out
        after = why(case)["localhost"]  # one server answers localhost now (maybe one family only)
        assert after is None or after["kind"] != "split", after
        assert bind_works(case.port, case.proto, case.bind_addr), out
    elif case.fix == "dual-stack":
        assert "bind '::' with IPV6_V6ONLY=0" in doc["localhost"]["fix"]
        for p in procs.popens:  # the stand-in restarted as the fix says
            p.send_signal(signal.SIGKILL)
            p.wait(5)
        wait_for(lambda: not port_held(case.port), 10, "the stand-in to exit")
        proc = procs.python(LISTEN.format(addr="::", port=case.port, reuseaddr=0, v6only=0))
        assert procs.wait_line(proc) == "ready"
        assert why(case)["localhost"] is None
        for addr, fam in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
            with socket.socket(fam) as c:
                c.connect((addr, case.port))  # both families answer now
    else:
        raise AssertionError(case.fix)


def run_daemon_case(case: Case, tmp_path: Path) -> None:
    assert case.daemon is not None
    d = DAEMONS[case.daemon]
    need(d.exe)
    with sandbox(tmp_path, d.setup) as box:
        for line in d.net:
            subprocess.run(line.split(), check=True)
        box.start(d.unit, d.argv, lambda: port_held(d.port, d.proto), d.id, d.restart_as)
        res = box.rebind("why", str(case.port), *(["--udp"] if case.proto == "udp" else []), "--json")
        doc = json.loads(res.stdout)
        check_cause(case, doc)
        outputs = []
        for line in doc["wellknown"][0]["fix"]:
            ran = box.run(line)
            assert ran.returncode == 0, (line, ran.stderr)
            outputs.append(ran.stdout)
        if d.frees_port:
            wait_for(lambda: not port_held(case.port, case.proto), 15, f"{d.id} to let go")
            assert (
                box.rebind(
                    "why", str(case.port), *(["--udp"] if case.proto == "udp" else []), "--check-fix"
                ).returncode
                == 0
            )
            assert bind_works(case.port, case.proto, case.bind_addr)
        else:  # sshd: your server gets the port `rebind pick` printed
            picked = int(outputs[-1].split()[0])
            assert bind_works(picked, case.proto, case.bind_addr)


RESOLVED = ProcFacts(1, "/usr/lib/systemd/systemd-resolved", 0, stat.S_IFREG | 0o755, 991, "systemd-resolve")


def run_nat_case(case: Case, tmp_path: Path) -> None:
    need("iptables")
    with sandbox(tmp_path) as box:
        box.nodeport("web", "frontend", case.port, case.proto)
        doc = json.loads(box.rebind("why", str(case.port), "--json").stdout)
        check_cause(case, doc)
        assert doc["wellknown"][0]["fix"][-1] == "kubectl -n web delete service frontend"
        for line in doc["wellknown"][0]["fix"]:
            ran = box.run(line)
            assert ran.returncode == 0, (line, ran.stderr)
        assert box.rebind("why", str(case.port), "--check-fix").returncode == 0
        assert bind_works(case.port, case.proto, case.bind_addr)


def run_recorded_case(case: Case, tmp_path: Path) -> None:
    proto = Proto(case.proto)
    if case.cause == "wellknown:systemd-resolved":
        got = recognise(catalogue(), RESOLVED, case.port, proto, {"systemd-resolve": 991})
        assert isinstance(got, Recognised) and got.entry.id == "systemd-resolved"
        # The drop-in and resolv.conf steps, in a scratch root (systemctl needs systemd).
        root = tmp_path
        (root / "etc").mkdir()
        (root / "run/systemd/resolve").mkdir(parents=True)
        os.symlink("../run/systemd/resolve/stub-resolv.conf", root / "etc/resolv.conf")
        for line in got.fix:
            if not line.startswith("systemctl "):
                moved = line.replace("/etc/", f"{root}/etc/").replace(" /run/", f" {root}/run/")
                subprocess.run(["sh", "-ec", moved], check=True)
        conf = root / "etc/systemd/resolved.conf.d/rebind-nostub.conf"
        assert "DNSStubListener=no" in conf.read_text()
        # With the stub gone, the reporter's server binds 53.
        assert bind_works(case.port, case.proto)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case(case: Case, netns, procs: Procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if case.kind == "daemon":
        run_daemon_case(case, tmp_path)
    elif case.kind == "python":
        run_python_case(case, procs)
    elif case.kind == "nat":
        run_nat_case(case, tmp_path)
    else:
        run_recorded_case(case, tmp_path)


def test_corpus_shape() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    for c in CASES:
        assert "#" in c.thread and ": " in c.thread, c.id
    covered = {c.daemon for c in CASES if c.daemon} | {
        c.cause.split(":")[1] for c in CASES if c.kind in ("recorded", "nat")
    }
    assert covered == {e.id for e in catalogue()}  # every catalogue entry is exercised
