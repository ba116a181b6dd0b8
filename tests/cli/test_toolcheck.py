"""`make test` on a machine without the system tools (issue 18 #17): their tests skip with ONE
summary line, the run passes; under CI=true a missing tool fails. No root, nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TESTS = """
from tests.toolcheck import need_tool

def test_rules():
    need_tool("promtool")

def test_rules_again():
    need_tool("promtool")

def test_nginx():
    need_tool("nginx")

def test_plain():
    assert True
"""


def _bare_path(tmp: Path) -> str:
    """A PATH with only what the shell script itself uses: none of the tools."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    for tool in ("bash", "sort", "dirname", "id", "env", "cat", "awk", "comm"):
        for d in ("/usr/bin", "/bin"):
            if os.path.exists(f"{d}/{tool}"):
                (bin_ / tool).symlink_to(f"{d}/{tool}")
                break
    return str(bin_)


def _pytest(tmp: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp / "test_tools.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=_bare_path(tmp), PYTHONPATH=str(ROOT), NO_COLOR="1")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.toolcheck", "-p", "no:cacheprovider", "-ra",
         "--rootdir", str(tmp), str(tmp / "test_tools.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip


def test_missing_tools_skip_with_one_summary_line(tmp_path):
    res = _pytest(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = [ln for ln in res.stdout.splitlines() if "need missing tools" in ln]
    assert len(summary) == 1, res.stdout
    assert "3 test(s)" in summary[0] and "promtool (2)" in summary[0] and "nginx (1)" in summary[0]
    assert "SKIPPED" not in res.stdout  # no per-test skip lines for them
    assert "1 passed, 3 skipped" in res.stdout


def test_missing_tools_fail_under_ci(tmp_path):
    res = _pytest(tmp_path, "true")
    assert res.returncode == 1, res.stdout
    assert "promtool is missing" in res.stdout and "3 failed, 1 passed" in res.stdout


def test_systest_without_root_or_apt_runs_the_command_and_says_what_it_skips(tmp_path):
    env = dict(os.environ, PATH=_bare_path(tmp_path), REBIND_SYSTEST_INSTALL="0")
    res = subprocess.run(
        [str(ROOT / "tools" / "systest.sh"), "bash", "-c", "echo ran"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "ran"
    line = res.stdout.splitlines()[0]
    assert line.startswith("systest: not installing") and "prometheus" in line and "nginx-light" in line


FAKE_DPKG_QUERY = """#!/bin/bash
while read -r p; do printf 'ii  %s\\n' "$p"; done < "$FAKE/state"
"""
FAKE_APT_GET = """#!/bin/bash
echo "apt-get $*" >> "$FAKE/log"
case " $* " in
  *" install "*) for a in "$@"; do case "$a" in -*|install) ;; *) echo "$a" >> "$FAKE/state";; esac; done
                 echo libdep-pulled-in >> "$FAKE/state"
                 [ -x "$FAKE/policy" ] && echo "policy present during install" >> "$FAKE/log" ;;
  *" purge "*) for a in "$@"; do grep -vx -- "$a" "$FAKE/state" > "$FAKE/state.new"; mv "$FAKE/state.new" "$FAKE/state"; done ;;
esac
exit 0
"""


def test_systest_as_root_with_apt_installs_then_purges_exactly_what_it_added(tmp_path):
    """The install path with apt-get, dpkg-query and id faked (nothing touches the machine): the
    missing tools' packages are installed with policy-rc.d in place, the command runs, and the
    purge removes exactly the packages that were not there before -- dependencies included,
    packages already installed never."""
    path = _bare_path(tmp_path)
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (
        ("dpkg-query", FAKE_DPKG_QUERY),
        ("apt-get", FAKE_APT_GET),
        ("id", "#!/bin/sh\necho 0\n"),
    ):
        # _bare_path linked `id` to the real /usr/bin/id: writing through that link replaced the
        # machine's id with this fake (and the podman fixture then took every uid for 0). A fake
        # replaces the link itself, and is created O_EXCL|O_NOFOLLOW so it can never follow one.
        f = Path(path) / name
        f.unlink(missing_ok=True)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    (Path(path) / "tmux").symlink_to("/bin/true")  # present: not installed
    for tool in ("grep", "mv", "chmod", "rm"):
        for d in ("/usr/bin", "/bin"):
            if os.path.exists(f"{d}/{tool}") and not (Path(path) / tool).exists():
                (Path(path) / tool).symlink_to(f"{d}/{tool}")
    before = "base-files\nlibc6\n"
    (fake / "state").write_text(before)
    env = dict(os.environ, PATH=path, FAKE=str(fake), REBIND_POLICY_RC=str(fake / "policy"))
    env.pop("REBIND_SYSTEST_INSTALL", None)
    res = subprocess.run(
        [str(ROOT / "tools" / "systest.sh"), "bash", "-c", "echo ran; exit 7"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 7, res.stdout + res.stderr  # the command's status is the script's
    assert "ran" in res.stdout
    log = (fake / "log").read_text().splitlines()
    install = next(ln for ln in log if " install " in ln)
    assert "prometheus" in install and "nginx-light" in install and " tmux" not in install
    assert "policy present during install" in log
    purge = next(ln for ln in log if " purge " in ln).split()
    assert "libdep-pulled-in" in purge and "prometheus" in purge
    assert "libc6" not in purge and "base-files" not in purge
    assert (fake / "state").read_text() == before  # left as found
    assert not (fake / "policy").exists()
    assert "echo 0" not in Path("/usr/bin/id").read_bytes().decode("latin-1")  # the real id untouched
