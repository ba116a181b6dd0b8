"""Parameter types shared by the commands: bad input becomes one clear line and exit 2."""

from __future__ import annotations

import math
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import click

from rebind.errors import UsageError
from rebind.model.addr import parse_ip, parse_source, parse_target, split_host_port
from rebind.model.records import State, parse_state
from rebind.model.validate import MAX_SECONDS, parse_port, parse_seconds


class Parsed(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A parameter type made of a model parser (model/addr.py, model/validate.py): its
    UsageError becomes click's one line and exit 2; a value already of a ``ready`` type (a
    default, or a value passed programmatically) goes through as it is."""

    def __init__(self, name: str, parse: Callable[[Any], Any], ready: tuple[type, ...] = ()) -> None:
        self.name = name
        self._parse = parse
        self._ready = ready

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self._ready and isinstance(value, self._ready):
            return value
        try:
            return self._parse(value)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


class SecondsType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A finite number of seconds in [minimum, maximum] (at most MAX_SECONDS, about 24 days):
    the one seconds type of every command's duration options (parsed by
    ``model/validate.parse_seconds``, which the API calls too).

    inf, nan and huge values are usage errors: they overflow select()/poll() timeouts or never
    compare true, so a command would crash or hang instead of doing what was asked.
    """

    name = "SECONDS"

    def __init__(self, minimum: float = 0.0, *, maximum: float = MAX_SECONDS, positive: bool = False) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        what = param.opts[0] if param is not None and param.opts else "duration"
        try:
            number = float(value)
            too_long = self.maximum == MAX_SECONDS and math.isfinite(number) and number > MAX_SECONDS
        except (TypeError, ValueError):
            too_long = False
        if too_long:
            self.fail(f"{what} {value} is too long (at most {MAX_SECONDS / 86400:g} days)", param, ctx)
        try:
            seconds = parse_seconds(value, what=what, minimum=self.minimum, maximum=self.maximum)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{what} must be more than 0 seconds", param, ctx)
        return seconds


class StateType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    name = "STATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> State:
        if isinstance(value, State):
            return value
        try:
            return parse_state(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class PortSpecType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """PORT or ADDR:PORT ([v6]:PORT)."""

    name = "[ADDR:]PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[IPv4Address | IPv6Address | None, int]:
        if isinstance(value, tuple):
            return value
        try:
            host, port = split_host_port(str(value), what="", alone="port")
        except UsageError as exc:
            self.fail(str(exc), param, ctx)
        addr = None if host is None else ADDRESS.convert(host, param, ctx)
        return addr, PORT.convert(port or "", param, ctx)


# parse_port, not str.isdigit(): '²' is a digit to isdigit() and a ValueError to int().
PORT = Parsed("PORT", parse_port)
#: ADDR: a literal address ([v6] brackets, '*', and %SCOPE on IPv6).
ADDRESS = Parsed("ADDR", lambda v: parse_ip(v, wildcard=True, scope=True), (IPv4Address, IPv6Address))
#: --connect HOST:PORT / [V6]:PORT -> (host text, port); the host is resolved later.
TARGET = Parsed("HOST:PORT", lambda v: parse_target(str(v)), (tuple,))
#: --from ADDR / ADDR:PORT / [V6]:PORT -> (address, fixed local port or None).
SOURCE = Parsed("ADDR[:PORT]", lambda v: parse_source(str(v)), (tuple,))
SECONDS = SecondsType()
STATE = StateType()
PORT_SPEC = PortSpecType()
