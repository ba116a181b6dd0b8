"""The one /proc layer (kernel/procfs.py) and the one stat parser (kernel/procstat.py), on a
procfs root of our own: no process is read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from rebind.kernel.procfs import FdRead, ProcFS, outcome, socket_inode
from rebind.kernel.procstat import parse_stat


def _proc(tmp_path: Path, pid: int, links: dict[int, str]) -> ProcFS:
    fd = tmp_path / str(pid) / "fd"
    fd.mkdir(parents=True)
    for n, target in links.items():
        os.symlink(target, fd / str(n))
    return ProcFS(str(tmp_path))


def test_socket_fds_reads_sockets_and_skips_other_files(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 42, {0: "/dev/null", 3: "socket:[1234]", 4: "pipe:[77]", 9: "socket:[99]"})
    got = proc.socket_fds(42)
    assert got.fds == {3: 1234, 9: 99} and got.read is FdRead.OK
    assert got.inodes() == {1234, 99}
    links, read = proc.fd_links(42)
    assert links[4] == "pipe:[77]" and read is FdRead.OK


def test_a_process_that_is_gone_holds_nothing(tmp_path: Path) -> None:
    got = ProcFS(str(tmp_path)).socket_fds(7)
    assert got.fds == {} and got.read is FdRead.VANISHED


@pytest.mark.parametrize(
    ("err", "want"),
    [
        (errno.ENOENT, FdRead.VANISHED),  # reaped, or the fd closed since the listing
        (errno.ESRCH, FdRead.VANISHED),  # the task exited with its directory open
        (errno.EACCES, FdRead.INACCESSIBLE),  # ptrace_may_access() said no
        (errno.EPERM, FdRead.INACCESSIBLE),
        (errno.EMFILE, FdRead.INACCESSIBLE),  # we could not look: not "gone"
        (errno.ENOMEM, FdRead.INACCESSIBLE),
    ],
)
def test_the_one_errno_ladder(err: int, want: FdRead) -> None:
    assert outcome(OSError(err, os.strerror(err))) is want


def test_socket_links_and_nothing_else() -> None:
    assert socket_inode("socket:[123]") == 123
    assert socket_inode("socket:[]") is None
    assert socket_inode("socket:[12x]") is None
    assert socket_inode("/tmp/socket:[1]") is None
    assert socket_inode("anon_inode:[eventpoll]") is None


def test_the_unix_table_of_a_process(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 5, {})
    (tmp_path / "5" / "net").mkdir()
    (tmp_path / "5" / "net" / "unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 321 /run/app ctl.sock\n"
        "0000000000000000: 00000002 00000000 00000000 0002 01 322\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 323 @abstract\n"
    )
    assert proc.unix_sockets(5) == [
        (321, 0x10000, 1, "/run/app ctl.sock"),
        (322, 0, 2, ""),
        (323, 0x10000, 1, "@abstract"),
    ]


def test_the_stat_parser_takes_comm_with_spaces_and_parens() -> None:
    line = b"4242 (a) b (c) S 1 4242 4242 0 -1 4194560" + b" 0" * 12 + b" 987654 0 0\n"
    st = parse_stat(4242, line)
    assert st is not None
    assert (st.state, st.ppid, st.pgrp, st.start_ticks, st.zombie) == ("S", 1, 4242, 987654, False)
    zombie = parse_stat(1, line.replace(b") S ", b") Z "))
    assert zombie is not None and zombie.zombie
    assert parse_stat(1, b"1 (cut short) S 0") is None


def test_the_live_root_is_the_only_one_pidfds_and_bpf_see(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ProcFS().live and not ProcFS("/tmp/proc").live
    monkeypatch.setenv("REBIND_PROC_ROOT", "/srv/proc")
    assert ProcFS.default() == ProcFS("/srv/proc")
    assert ProcFS("/x").path(3, "fd", "4") == "/x/3/fd/4"


def test_a_question_of_any_stops_at_the_first_answer(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 8, {3: "socket:[1]", 4: "socket:[2]", 5: "socket:[3]"})
    got = proc.socket_fds(8, first=[5], until={3})
    assert got.fds == {5: 3} and got.read is FdRead.OK  # the hinted fd first, and enough
    assert proc.socket_fds(8, first=[7], until={9}).fds == {3: 1, 4: 2, 5: 3}  # a stale hint


def test_a_limit_bounds_the_links_read(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 9, {n: f"net:[{n}]" for n in range(10)})
    links, read = proc.fd_links(9, limit=4)
    assert len(links) == 4 and read is FdRead.OK
