"""What the keys of `rebind top` run: why, free, wait, reload. I/O; no Textual here.

``why`` and ``free`` reuse the commands' own engines and printed forms: `rebind why`'s
:func:`rebind.diagnosis.diagnose` + ``render/why.py``'s ``print_diagnosis`` and `rebind free`'s
:func:`rebind.actions.free.plan_free` / :func:`~rebind.actions.free.execute_plan` + the
renderer both share (``render/free.py``: ``print_plan``, ``print_result``), captured as text
through :func:`captured` (one small adapter each, so changes to those commands show up here
unchanged). Every captured line goes through
:func:`rebind.textsafe.visible`: process names in them are hostile.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rebind.model.records import State
from rebind.textsafe import visible
from rebind.top.model import PortKey, PortView

if TYPE_CHECKING:
    from rebind.actions.wait import WaitResult
    from rebind.diagnosis import Diagnosis
    from rebind.model.conflict import BindRequest
    from rebind.model.free import FreePlan
    from rebind.model.free_result import FreeResult

#: /proc/net/unix flag of a listening socket (__SO_ACCEPTCON) and type of a stream socket.
_ACCEPTCON = 0x10000
_SOCK_STREAM = 1


def captured(fn: Callable[..., Any], *args: Any) -> list[str]:
    """Lines a command's printer writes to stdout/stderr, escaped. Call from one thread only
    (it swaps sys.stdout for the duration; the TUI calls it on its event-loop thread)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        fn(*args)
    return [visible(line) for line in buf.getvalue().splitlines()]


def request(key: PortKey) -> BindRequest:
    """What `rebind why PORT` asks: a plain bind of the wildcard address, as this user."""
    from rebind.diagnosis import default_request

    return default_request(key.port, proto=key.proto)


# -- why -----------------------------------------------------------------------------------------


def why(key: PortKey) -> Diagnosis:
    from rebind.diagnosis import diagnose

    return diagnose(request(key))


def why_lines(d: Diagnosis) -> list[str]:
    from rebind.render.why import print_diagnosis

    return captured(print_diagnosis, d)


# -- free ----------------------------------------------------------------------------------------


def free_plan(key: PortKey) -> FreePlan:
    from rebind.actions.free import plan_free

    return plan_free(request(key))


def plan_lines(plan: FreePlan) -> list[str]:
    from rebind.render.free import print_plan

    return captured(print_plan, plan)


def free_confirmation(plan: FreePlan) -> tuple[list[str], str | None]:
    """What the `f` screen shows and asks: the plan as `rebind free --dry-run` prints it (each
    target's other ports and sockets included), then, when there is something to do, a last
    line naming everything else the signal takes down right above the question. Returns
    (lines, question); question None: nothing to ask."""
    lines = plan_lines(plan)
    if plan.bindable:
        return [*lines, "nothing to do: the port is bindable"], None
    if not plan.has_actions:
        return [*lines, "nothing rebind may do frees it (see above)"], None
    also = plan.collateral_summary()
    question = "Proceed (signal / destroy as above)? y/n"
    if also:
        question = visible(f"Proceed? This also takes down {also}. y/n")
    return lines, question


def run_free(plan: FreePlan, say: Callable[[str], None]) -> FreeResult:
    from rebind.actions.free import execute_plan

    return execute_plan(plan, on_event=lambda msg: say(visible(msg)))


def result_lines(result: FreeResult) -> list[str]:
    from rebind.render.free import print_result

    return captured(print_result, result)


# -- wait ----------------------------------------------------------------------------------------


def wait_step(key: PortKey, timeout: float = 1.0) -> WaitResult:
    """One bounded slice of `rebind wait PORT` (trial binds), so the TUI can stop between slices."""
    from rebind.actions.wait import wait_bindable

    return wait_bindable(request(key), timeout=timeout)


def wait_status(res: WaitResult, waited: float) -> str:
    """The wait screen's line while the port stays busy: `rebind why`'s headline (what blocks,
    whose it is, and "free in N s" when it frees by itself: a countdown, as each 1 s slice
    diagnoses again) and how long top has waited. Escaped."""
    d = res.diagnosis
    if d is not None:
        what = d.headline
    elif res.trial is not None:
        what = f"a trial bind still fails ({res.trial})"
    else:
        what = "a trial bind still fails"
    return visible(f"still busy: {what} · waiting {waited:.0f}s")


# -- reload (rebind run) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Supervisor:
    """A `rebind run` holding the port, and its control socket (from the kernel's unix table)."""

    pid: int
    control: str


def unix_listeners(pid: int, proc: str = "/proc") -> list[str]:
    """Paths of the listening unix stream sockets a process holds (kernel-reported paths:
    /proc/PID/net/unix in the process's own network namespace; abstract names are skipped)."""
    from rebind.kernel.procfs import ProcFS

    procfs = ProcFS(proc)
    inodes = procfs.socket_fds(pid).inodes()
    if not inodes:
        return []
    return [
        path
        for inode, flags, kind, path in procfs.unix_sockets(pid)
        if inode in inodes and flags & _ACCEPTCON and kind == _SOCK_STREAM and path.startswith("/")
    ]


def find_supervisor(view: PortView, proc: str = "/proc") -> Supervisor | str:
    """The `rebind run` serving this port, or why none could be identified.

    A supervisor holds the listening socket itself (it never closes it) and a control socket
    (``--control``). Candidates are the listener's owners that hold a listening unix socket,
    those whose command line says ``rebind run`` first; the caller then checks the peer
    credentials when connecting (:func:`control`), so a name alone never decides.
    """
    from rebind.supervisor.client import looks_like_run

    owners = [o for r in view.rows if r.state is State.LISTEN for o in r.owners]
    if not owners:
        return f"no process is seen listening on {view.key}"
    ranked = sorted({o.pid: o for o in owners}.values(), key=lambda o: (not looks_like_run(o.cmdline), o.pid))
    for o in ranked:
        paths = unix_listeners(o.pid, proc)
        if paths:
            return Supervisor(o.pid, paths[0])
    if any(looks_like_run(o.cmdline) for o in ranked):
        return f"the `rebind run` serving {view.key} has no --control socket (use --pid-file and kill -HUP)"
    return f"{view.key} is not served by `rebind run` (no owner has a control socket)"


def control(sup: Supervisor, command: str, timeout: float) -> str:
    """Send one command (``status``, ``reload``) to the supervisor and return its answer line.

    The one control client (supervisor/client.py): the peer must be the supervisor itself
    (SO_PEERCRED pid) and run as root or us; a socket file swapped in a shared directory, or
    another process's socket, is refused.
    """
    from rebind.supervisor.client import ask

    return ask(sup.control, command, timeout, expect_pid=sup.pid) or "failed: no answer (supervisor exited?)"
