"""What the supervisor's machine (:mod:`.machine`) says and when its timers fire (pure): the
hints it logs when a generation fails in a way that points at the server binding the port
itself, the backoff reset, and the timer events due at a given time. Re-exported by
:mod:`.machine`.
"""

from __future__ import annotations

from rebind.supervisor.vocab import Event, GraceOver, ReadyTimeout, RestartDue, Role, State

STABLE_AFTER = 10.0  # a generation that served this long resets the crash backoff
BINDS_ITSELF_HINT = (
    "if it failed with 'Address already in use' (Errno 98), it binds the port itself instead of "
    "using the socket rebind holds for it: make it take fd 3 (LISTEN_FDS, e.g. rebind.listen(), "
    "uvicorn --fd 3)"
)

ADDR_IN_USE_SEEN = (
    "its stderr says 'Address already in use': the server ignores LISTEN_FDS and binds the port "
    "itself, which rebind already holds; run it with its recipe (docs/supervisor.md: uvicorn --fd 3, "
    "gunicorn reads LISTEN_FDS, nginx with NGINX='3;' and --stop-signal QUIT, granian via a wrapper)"
)


def timer_events(state: State, now: float) -> list[Event]:
    """The timer events that are due at NOW (the caller feeds them to :func:`step`)."""
    out: list[Event] = []
    for g in state.gens:
        if g.deadline is None or now < g.deadline:
            continue
        if g.role is Role.STARTING:
            out.append(ReadyTimeout(g.number, now))
        elif g.role in (Role.STOPPING, Role.LINGERING, Role.DRAINING):
            out.append(GraceOver(g.number, now))
    if state.restart_at is not None and now >= state.restart_at:
        out.append(RestartDue(now))
    return out
