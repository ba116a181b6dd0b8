"""Validation shared by every entry point (CLI options, Python API, specs): one place that turns
bad input into :class:`rebind.errors.UsageError`, so no caller sees ``struct.error``,
``OverflowError`` or a silently wrapped port.
"""

from __future__ import annotations

import math
import signal
from typing import Any

from rebind.errors import UsageError

#: The longest duration any option accepts: select()/poll() take milliseconds as a C int
#: (2**31 - 1 ms ≈ 24.8 days); a longer wait overflows (OverflowError in selectors).
MAX_SECONDS = 86_400.0 * 24


def parse_port(value: Any, *, what: str = "port", allow_zero: bool = False) -> int:
    """A port number from an int or a string of ASCII digits.

    ``str.isdigit()`` is not enough: it accepts ``'²'`` and other Unicode digits that ``int()``
    rejects (a traceback), and ``int()`` accepts ``'٣'`` (Arabic-Indic three) — neither is a port
    anyone typed on purpose. ``bool`` is rejected too (``True`` is an int in Python).
    """
    low = 0 if allow_zero else 1
    if isinstance(value, bool):
        raise UsageError(f"{what} {value!r} is not a port number ({low}-65535)")
    if isinstance(value, int):
        port = value
    else:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()):
            raise UsageError(f"{what} {value!r} is not a port number ({low}-65535)")
        port = int(text)
    if not low <= port <= 65535:
        raise UsageError(f"{what} {port} is out of range ({low}-65535)")
    return port


def parse_seconds(
    value: Any, *, what: str = "duration", minimum: float = 0.0, maximum: float = MAX_SECONDS
) -> float:
    """A finite number of seconds in [minimum, maximum]; ``inf``, ``nan`` and huge values are
    usage errors (they crash select() with OverflowError, or never compare true)."""
    if isinstance(value, bool):
        raise UsageError(f"{what} {value!r} is not a number of seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds):
        raise UsageError(f"{what} must be a finite number of seconds, not {value!r}")
    if not minimum <= seconds <= maximum:
        raise UsageError(f"{what} {seconds:g} s is out of range ({minimum:g}-{maximum:g} s)")
    return seconds


def parse_signal(sig: int | str) -> int:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` -> 15; UsageError for anything else (0, a number
    no signal has, an unknown name, a bool)."""
    if isinstance(sig, bool) or not isinstance(sig, int | str):
        raise UsageError(f"signal must be a name or a number (e.g. TERM, 15), not {sig!r}")
    if isinstance(sig, int):
        number = sig
    else:
        text = sig.strip().upper()
        if text.isascii() and text.isdigit():
            number = int(text)
        else:
            name = text if text.startswith("SIG") else f"SIG{text}"
            member = getattr(signal.Signals, name, None)
            if member is None:
                raise UsageError(f"unknown signal {sig!r} (e.g. TERM, INT, HUP, KILL)")
            number = int(member)
    valid = {int(s) for s in signal.valid_signals()}
    if number not in valid or number == 0:
        raise UsageError(f"{sig!r} is not a signal number")
    return number


def signal_name(sig: int) -> str:
    """15 -> ``SIGTERM`` (the number itself when no signal has it)."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
