"""TIME_WAIT takeover (tcp_twsk_unique, C8/C9/C17): may connect() take over a time-wait entry
that holds the 4-tuple it wants?"""

from __future__ import annotations

from rebind.model.connect.facts import TIME_WAIT_MS, ConnectSettings, PortHolder
from rebind.model.connect.request import is_loopback
from rebind.model.records import SocketRecord, State


def tw_left_ms(r: SocketRecord) -> int | None:
    return r.expires_ms if r.is_mini else None


def tw_reuse_delay_ms(settings: ConnectSettings) -> int:
    """How old a time-wait entry must be before connect() takes it over: net.ipv4.tcp_tw_reuse_delay
    since 6.14, a fixed ~1 s before (the sysctl did not exist)."""
    return settings.tw_reuse_delay_ms if settings.kernel_version >= (6, 14) else 1000


def tw_reuse_check(
    h: PortHolder, settings: ConnectSettings, *, explicit_port: bool = False
) -> tuple[bool | None, str]:
    """tcp_twsk_unique: may connect() take over this time-wait entry with the same 4-tuple?
    None when it depends on whether the entry carries TCP timestamps and nobody could read that:
    the entry keeps the old connection's own (tw_ts_recent_stamp), whatever tcp_timestamps says
    now, so the sysctl is no evidence (issue 17).

    ``explicit_port``: the new socket already has its port (C17): only timestamps count.
    """
    if h.timestamps is None:
        yes, why = _tw_reuse(h, settings, explicit_port, ts=True)
        no, _ = _tw_reuse(h, settings, explicit_port, ts=False)
        if yes == no:
            return yes, why
        return None, (
            "only if the old connection used TCP timestamps, which the socket table does not show "
            f"(the entry keeps its own; tcp_timestamps={settings.tcp_timestamps} now is no evidence)"
        )
    return _tw_reuse(h, settings, explicit_port, ts=h.timestamps)


def _tw_reuse(h: PortHolder, settings: ConnectSettings, explicit_port: bool, *, ts: bool) -> tuple[bool, str]:
    r = h.socket
    if explicit_port:
        if ts:
            return True, "a socket with its own port takes a time-wait entry with timestamps over"
        return False, "the time-wait entry has no TCP timestamps, so even a bound socket cannot take it over"
    if r.state is State.FIN_WAIT2:
        return False, "an orphaned FIN_WAIT2 is never taken over by connect()'s own choice (C9)"
    if settings.tw_reuse == 0:
        return False, "tcp_tw_reuse=0"
    if settings.tw_reuse == 2 and not (is_loopback(r.local.addr) or is_loopback(r.remote.addr)):
        return False, "tcp_tw_reuse=2 reuses loopback connections only"
    if not ts:
        return False, "the connection did not use TCP timestamps"
    left = r.expires_ms
    delay = tw_reuse_delay_ms(settings)
    if left is not None:
        age = TIME_WAIT_MS - left
        if age <= delay:
            return False, f"only {age} ms old; tcp_tw_reuse_delay is {delay} ms"
    return True, f"tcp_tw_reuse={settings.tw_reuse}, timestamps, older than {delay} ms"
