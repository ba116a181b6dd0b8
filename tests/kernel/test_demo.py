"""`rebind demo` replays the origin story for real and every step behaves as told."""

from __future__ import annotations


def test_demo_runs_the_whole_story(rebind_cli, netns):
    res = rebind_cli("demo", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.count("OSError: [Errno 98] Address already in use") == 2  # plain and SO_REUSEADDR restart
    assert "TIME_WAIT left by a server without SO_REUSEADDR" in out
    assert "restart with SO_REUSEADDR: listening" in out
    assert "C server restarted over its own TIME_WAIT: listening" in out or "no C compiler" in out
    assert "served by 2 different processes" in out
    assert "\x1b[" not in out
