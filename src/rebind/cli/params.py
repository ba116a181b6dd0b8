"""Parameter types shared by the commands: bad input becomes one clear line and exit 2."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import click

from rebind.model.records import State, parse_state


class PortType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    name = "PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            port = value
        else:
            text = str(value).strip()
            if not text.isdigit():
                self.fail(f"{value!r} is not a port number (1-65535)", param, ctx)
            port = int(text)
        if not 1 <= port <= 65535:
            self.fail(f"port {port} is out of range (1-65535)", param, ctx)
        return port


class StateType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    name = "STATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> State:
        if isinstance(value, State):
            return value
        try:
            return parse_state(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class AddressType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    name = "ADDR"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> IPv4Address | IPv6Address:
        if isinstance(value, IPv4Address | IPv6Address):
            return value
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if text in ("*", "any"):
            text = "0.0.0.0"
        try:
            return ip_address(text)
        except ValueError:
            self.fail(f"{value!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1, ::)", param, ctx)


class PortSpecType(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """PORT or ADDR:PORT ([v6]:PORT)."""

    name = "[ADDR:]PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[IPv4Address | IPv6Address | None, int]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        addr = None
        if ":" in text:
            host, _, port_text = text.rpartition(":")
            addr = ADDRESS.convert(host, param, ctx)
            text = port_text
        return addr, PORT.convert(text, param, ctx)


PORT = PortType()
STATE = StateType()
ADDRESS = AddressType()
PORT_SPEC = PortSpecType()
