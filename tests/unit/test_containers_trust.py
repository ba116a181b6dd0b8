"""What rebind believes of a container engine: names validated, fix lines quoted, API answers
bounded in size, nesting and time (issue 18 items 1 and 5), and process identity from the kernel's
view (real uid, executable), never from a process's own name."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rebind.kernel import containers as kc
from rebind.kernel.containers import engines as kce
from rebind.model.containers import (
    ContainerRef,
    Engine,
    json_depth_within,
    parse_api_answer,
    stop_command,
    valid_name,
)

ID = "ab" * 32
HOSTILE = [
    "web; curl http://127.0.0.1/x|sh #\x1b[2J\x1b]0;PWN\x07",
    "$(reboot)",
    "`id`",
    "a b",
    "-rf",
    "web\nrm -rf /",
    "'q'",
    "",
    "x" * 200,
    "wéb",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_not_valid(name: str) -> None:
    assert not valid_name(name)


def test_valid_names() -> None:
    for name in ("web", "prod-db", "a.b_c-1", "0x", "A" * 128):
        assert valid_name(name)
    assert not valid_name(None) and not valid_name(5)


@pytest.mark.parametrize("name", HOSTILE)
def test_stop_command_never_carries_a_hostile_name(name: str) -> None:
    for engine in (Engine.DOCKER, Engine.PODMAN):
        line = stop_command(ContainerRef(engine, ID, name))
        assert shlex.split(line) == [engine.value, "stop", ID[:12]]
    # An id that is not 64 hex is no safer than a name: nothing of it is printed.
    line = stop_command(ContainerRef(Engine.DOCKER, "$(id)", name))
    assert shlex.split(line) == ["docker", "ps"]


def test_stop_command_of_a_rootless_container_runs_as_its_user() -> None:
    line = stop_command(ContainerRef(Engine.PODMAN, ID, "rlweb", "alice"))
    assert line == "su - alice -c 'podman stop rlweb'"
    assert shlex.split(line) == ["su", "-", "alice", "-c", "podman stop rlweb"]
    assert shlex.split(shlex.split(line)[-1]) == ["podman", "stop", "rlweb"]
    # A user name that could not be a login name is never put in the line.
    odd = stop_command(ContainerRef(Engine.PODMAN, ID, "rlweb", "al ice;id"))
    assert "al ice" not in odd and shlex.split(odd.split("#")[0]) == ["podman", "ps"]


def test_other_engines_lines_parse_as_plain_words() -> None:
    for ref in (
        ContainerRef(Engine.CONTAINERD, ID, "web"),
        ContainerRef(Engine.KUBERNETES, "pod1234", None),
        ContainerRef(Engine.CONTAINERD, "bad;id", "x y"),
    ):
        line = stop_command(ref)
        assert subprocess.run(["sh", "-n", "-c", line], check=False).returncode == 0
        assert all(c not in line.split("#")[0] for c in ";|&$`()<>\n")


@pytest.mark.parametrize(
    "ref",
    [
        ContainerRef(Engine.DOCKER, ID, "web"),
        ContainerRef(Engine.PODMAN, ID, "web; rm -rf ~"),
        ContainerRef(Engine.PODMAN, ID, "rlweb", "alice"),
    ],
)
def test_printed_stop_line_runs_as_one_word_per_argument(ref: ContainerRef, tmp_path: Path) -> None:
    """The line exactly as printed, run by sh with stand-ins for the tools that record argv."""
    record = tmp_path / "argv.json"
    for tool in ("docker", "podman", "su"):
        stub = tmp_path / tool
        stub.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"with open({str(record)!r}, 'a') as f: f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        )
        stub.chmod(0o755)
    line = stop_command(ref)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    subprocess.run(["sh", "-c", line], env=env, check=True, timeout=10)
    (argv,) = [json.loads(x) for x in record.read_text().splitlines()]
    assert argv == shlex.split(line)[1:]
    assert len(argv) == (4 if ref.user else 2)


def test_add_docker_keeps_only_valid_ids_and_names() -> None:
    state = kc.EngineState()
    net = {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}
    kce._add_docker(
        state,
        [
            {"Id": ID, "Names": ["/web; curl x|sh #"], "NetworkSettings": net},
            {"Id": "cd" * 32, "Names": ["/db"], "NetworkSettings": {"Networks": {"n": {"IPAddress": 7}}}},
            {"Id": "web; id", "Names": ["/evil"]},
            "not a dict",
            {"Id": "ef" * 32, "Names": [{"x": 1}], "NetworkSettings": {"Networks": ["x"]}},
        ],
    )
    assert state.names == {"cd" * 32: (Engine.DOCKER, "db")}
    assert set(state.by_ip.values()) == {ID}
    assert state.ref(ID, Engine.DOCKER).name is None  # the container is known, its name is not


def test_podman_state_keeps_only_valid_ids_and_names(tmp_path: Path) -> None:
    f = tmp_path / "containers.json"
    f.write_text(json.dumps([{"id": ID, "names": ["db; id"]}, {"id": "cd" * 32, "names": ["db"]}]))
    state = kc.EngineState()
    assert kce._add_podman(state, str(f))
    assert state.names == {"cd" * 32: (Engine.PODMAN, "db")}
    f.write_bytes(b"[" * 100000)
    assert not kce._add_podman(kc.EngineState(), str(f))


# ----------------------------------------------------------------- API answers, parsed (pure)


def _http(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra) + body


def test_json_depth() -> None:
    assert json_depth_within(b"[]", 1) and not json_depth_within(b"[[]]", 1)
    assert json_depth_within(b'[{"a": [1, {"b": "[[[[[[["}]}]', 4)
    assert not json_depth_within(b'[{"a": [1, {"b": "[[[[[[["}]}]', 3)
    assert not json_depth_within(b"[" * 200000, 32)
    assert not json_depth_within(b"[]]", 32)  # unbalanced
    assert json_depth_within(b'["\\"[[["]', 1)  # escaped quote inside a string
    assert json_depth_within(b"[" + b"{}," * 100000 + b"{}]", 2)


def test_parse_api_answer() -> None:
    doc = [{"Id": ID, "Names": ["/web"]}]
    assert parse_api_answer(_http(json.dumps(doc).encode()), 32) == doc
    assert parse_api_answer(_http(b"[" * 200000), 32) == "answered JSON with unbalanced brackets"
    deep = b"[" * 5000 + b"]" * 5000  # balanced: json.loads alone would raise RecursionError
    assert parse_api_answer(_http(deep), 32) == "answered JSON nested deeper than 32 levels"
    assert parse_api_answer(_http(b"{}"), 32) == "answered JSON that is not a list"
    assert parse_api_answer(_http(b"[]", 500), 32) == "answered HTTP 500"
    assert parse_api_answer(_http(b"[1,")[:-1], 32) == "answered an incomplete body"
    assert parse_api_answer(b"garbage", 32) == "answered no HTTP"
    assert parse_api_answer(_http(b"[1,"), 32) == "answered JSON with unbalanced brackets"
    assert parse_api_answer(_http(b"[1,]"), 32) == "answered no valid JSON"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n"
    assert parse_api_answer(chunked, 32) == [1, 2]


# ------------------------------------------------------------- API answers, read over a socket


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple[str, dict[str, bytes | float]]]:
    """A unix-socket server whose answer (bytes) and drip interval (s) the test sets."""
    path = str(tmp_path / "api.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    cfg: dict[str, bytes | float] = {"answer": b"", "drip": 0.0}
    stop = threading.Event()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                answer = cfg["answer"]
                assert isinstance(answer, bytes)
                drip = float(cfg["drip"])
                try:
                    if drip:
                        conn.sendall(answer)
                        while not stop.wait(drip):
                            conn.sendall(b" ")
                    else:
                        conn.sendall(answer)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, cfg
    stop.set()
    srv.close()


def test_a_nested_bomb_is_an_engine_that_did_not_answer(
    fake_api: tuple[str, dict[str, bytes | float]],
) -> None:
    path, cfg = fake_api
    cfg["answer"] = _http(b"[" * 200000)  # fakeapi.py's bomb
    assert kce._docker_api(path) == (None, "answered JSON with unbalanced brackets")
    cfg["answer"] = _http(b"[" * 100000 + b"]" * 100000)
    assert kce._docker_api(path) == (None, "answered JSON nested deeper than 32 levels")


def test_a_huge_answer_is_not_read_past_the_bound(fake_api: tuple[str, dict[str, bytes | float]]) -> None:
    path, cfg = fake_api
    cfg["answer"] = _http(b"[" + b"1," * (3 << 20) + b"1]")
    assert kce._docker_api(path) == (None, "answer larger than 4 MiB")


def test_a_drip_ends_at_the_total_deadline(fake_api: tuple[str, dict[str, bytes | float]]) -> None:
    """One byte every 20 ms never lets a per-read timeout expire; the total deadline ends it."""
    path, cfg = fake_api
    cfg["answer"] = b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n"
    cfg["drip"] = 0.02
    answer, problem = kce._docker_api(path, time.monotonic() + 0.3)
    assert answer is None and problem == f"no complete answer within {kc.API_DEADLINE:g} s"


def test_the_peer_check_runs_before_anything_is_sent(
    fake_api: tuple[str, dict[str, bytes | float]],
) -> None:
    path, cfg = fake_api
    cfg["answer"] = _http(b"[]")
    seen: list[tuple[int, int]] = []

    def refuse(pid: int, uid: int) -> str:
        seen.append((pid, uid))
        return "its server is not root's"

    assert kce._docker_api(path, peer=refuse) == (None, "not asked: its server is not root's")
    assert seen == [(os.getpid(), os.geteuid())]  # SO_PEERCRED: this process serves it


# ------------------------------------------------------------------ process identity (fake /proc)


def _status(tmp: Path, pid: int, uids: str) -> None:
    d = tmp / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "status").write_text(f"Name:\tx\nUid:\t{uids}\nGid:\t0\t0\t0\t0\n")


def test_real_uid_needs_all_four_to_agree(tmp_path: Path) -> None:
    _status(tmp_path, 1, "0\t0\t0\t0")
    _status(tmp_path, 2, "65534\t0\t0\t0")  # setuid root started by nobody: /proc/2 is root's
    _status(tmp_path, 3, "1000\t1000\t1000\t1000")
    assert kc.real_uid(1, str(tmp_path)) == 0
    assert kc.real_uid(2, str(tmp_path)) is None
    assert kc.real_uid(3, str(tmp_path)) == 1000
    assert kc.real_uid(4, str(tmp_path)) is None


def test_root_owned_exe_reads_the_kernels_link(tmp_path: Path) -> None:
    d = tmp_path / "5"
    d.mkdir()
    real = os.path.realpath(sys.executable)  # the kernel's link names the file itself
    (d / "exe").symlink_to(real)
    st = os.stat(real)
    ok = st.st_uid == 0 and not st.st_mode & 0o022 and stat.S_ISREG(st.st_mode)
    base = os.path.basename(real)
    assert kc.root_owned_exe(5, str(tmp_path)) == (base if ok else None)
    mine = tmp_path / "dockerd"
    mine.write_text("")
    (tmp_path / "6").mkdir()
    (tmp_path / "6" / "exe").symlink_to(mine)
    mine.chmod(0o777)
    assert kc.root_owned_exe(6, str(tmp_path)) is None  # world-writable
    assert kc.root_owned_exe(7, str(tmp_path)) is None  # no such process


def test_resolve_proxy_believes_no_rootless_proxy_without_its_users_container(tmp_path: Path) -> None:
    """A process calling itself rootlessport (or pasta, slirp4netns) is no proxy on its own say."""
    for name in ("rootlessport", "pasta", "slirp4netns"):
        assert kc.resolve_proxy(9, name, (name,), 65534, kc.EngineState(), str(tmp_path)) is None
        assert kc.resolve_proxy(9, name, (name,), None, kc.EngineState(), str(tmp_path)) is None


# ----------------------------------------------------- rootless proxies, on a fake /proc tree

RLP_EXE = "/usr/lib/podman/rootlessport"
CONMON_EXE = "/usr/bin/conmon"


def _exe_ok(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


@pytest.fixture
def rootless_tree(tmp_path: Path) -> dict[str, Path]:
    """/proc as rootless Podman leaves it: rootlessport (100) whose main thread is in the
    container's netns, the container's process (200) there, its parent conmon (300) pointing at
    a bundle in the user's storage, whose containers.json lists the container."""
    if not (_exe_ok(RLP_EXE) and _exe_ok(CONMON_EXE)):
        pytest.skip("podman's rootlessport and conmon are not installed")
    uid = os.getuid()
    proc = tmp_path / "proc"
    store = tmp_path / "storage" / "vfs-containers"
    bundle = store / ID / "userdata"
    bundle.mkdir(parents=True)
    (store / "containers.json").write_text(json.dumps([{"id": ID, "names": ["rlweb"]}]))
    for pid, comm, exe, argv in (
        (100, "rootlessport", RLP_EXE, ["rootlessport"]),
        (200, "httpd", None, ["httpd"]),
        (300, "conmon", CONMON_EXE, [CONMON_EXE, "-c", ID, "-n", "rlweb", "-b", str(bundle)]),
    ):
        d = proc / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "fd").mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (d / "stat").write_text(f"{pid} ({comm}) S {300 if pid == 200 else 1} 0 0\n")
        if exe:
            (d / "exe").symlink_to(exe)
    (proc / "100" / "ns" / "net").write_text("")
    os.link(proc / "100" / "ns" / "net", proc / "200" / "ns" / "net")  # same inode: same netns
    (proc / "300" / "ns" / "net").write_text("")  # conmon lives in the host's
    (proc / "self" / "ns").mkdir(parents=True)
    os.link(proc / "300" / "ns" / "net", proc / "self" / "ns" / "net")
    return {"proc": proc, "store": store, "bundle": bundle}


def _resolve(tree: dict[str, Path]) -> ContainerRef | None:
    found = kc.resolve_proxy(
        100, "rootlessport", ("rootlessport",), os.getuid(), kc.EngineState(), str(tree["proc"])
    )
    return found[1] if found else None


def test_rootless_proxy_with_its_users_container(rootless_tree: dict[str, Path]) -> None:
    import pwd

    ref = _resolve(rootless_tree)
    user = None if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    assert ref == ContainerRef(Engine.PODMAN, ID, "rlweb", user)


def test_rootless_conmon_of_another_user_is_not_believed(rootless_tree: dict[str, Path]) -> None:
    (rootless_tree["proc"] / "300" / "status").write_text("Uid:\t4242\t4242\t4242\t4242\n")
    assert _resolve(rootless_tree) is None


def test_rootless_container_must_be_in_the_users_state(rootless_tree: dict[str, Path]) -> None:
    state = rootless_tree["store"] / "containers.json"
    state.write_text(json.dumps([{"id": "cd" * 32, "names": ["other"]}]))
    assert _resolve(rootless_tree) is None
    state.write_text(json.dumps([{"id": ID, "names": ["rlweb"]}]))
    state.chmod(0o666)  # anyone may have written it
    assert _resolve(rootless_tree) is None
    state.chmod(0o644)
    assert _resolve(rootless_tree) is not None


def test_rootless_proxy_by_name_only_is_not_believed(rootless_tree: dict[str, Path]) -> None:
    fake = rootless_tree["proc"].parent / "rootlessport"
    fake.write_text("")
    if os.geteuid() == 0:
        os.chown(fake, 65534, 65534)  # as a user's own file is
    exe = rootless_tree["proc"] / "100" / "exe"
    exe.unlink()
    exe.symlink_to(fake)  # the user's own file called rootlessport
    assert _resolve(rootless_tree) is None


def test_rootless_bundle_must_be_podmans_shape(rootless_tree: dict[str, Path]) -> None:
    cmdline = rootless_tree["proc"] / "300" / "cmdline"
    other = rootless_tree["store"] / ID
    cmdline.write_bytes(b"\0".join(x.encode() for x in (CONMON_EXE, "-c", ID, "-b", str(other))) + b"\0")
    assert _resolve(rootless_tree) is None
    cmdline.write_bytes(b"\0".join(x.encode() for x in (CONMON_EXE, "-c", ID)) + b"\0")
    assert _resolve(rootless_tree) is None
