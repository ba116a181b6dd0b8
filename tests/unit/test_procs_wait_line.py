"""The test harness's line reader (tests/conftest.py, Procs.wait_line): lines, not reads."""

from __future__ import annotations

from typing import Any

import pytest

# One write of two lines, then silence: both lines are in the pipe before the first read.
TWO_AT_ONCE = "import os, time\nos.write(1, b'first\\nsecond\\n')\ntime.sleep(60)\n"


def test_two_lines_in_one_write_are_two_lines(procs: Any) -> None:
    p = procs.python(TWO_AT_ONCE)
    assert procs.wait_line(p) == "first"
    assert procs.wait_line(p, timeout=5) == "second"  # was: TimeoutError (buffered, select() blind)


def test_half_a_line_is_waited_for_within_the_timeout(procs: Any) -> None:
    p = procs.python("import os, time\nos.write(1, b'par')\ntime.sleep(60)\n")
    with pytest.raises(TimeoutError):
        procs.wait_line(p, timeout=0.5)  # was: readline() blocked until the child exited


def test_stderr_lines_and_the_rest(procs: Any) -> None:
    code = "import os\nos.write(2, b'one\\ntwo\\nthree')\n"
    p = procs.python(code)
    assert procs.wait_line(p, stream="stderr") == "one"
    assert procs.rest(p, "stderr") == "two\nthree"


def test_an_early_exit_says_so_with_stderr(procs: Any) -> None:
    p = procs.python("import sys\nsys.exit('bad config')\n")
    with pytest.raises(RuntimeError, match="exited before it was ready: bad config"):
        procs.wait_line(p)
