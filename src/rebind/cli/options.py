"""The bind options every command that acts on a bind request takes, and the one way they
become a :class:`~rebind.model.request.BindRequest` (:func:`rebind.diagnosis.default_request`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from rebind.cli.params import ADDRESS, PORT_SPEC

if TYPE_CHECKING:
    from rebind.model.request import BindRequest

F = TypeVar("F", bound=Callable[..., Any])
Spec = tuple[IPv4Address | IPv6Address | None, int]


def _bind_decorators(spec_required: bool) -> list[Callable[[F], F]]:
    return [
        click.argument("spec", type=PORT_SPEC, metavar="[ADDR:]PORT", required=spec_required),
        click.option(
            "--addr",
            type=ADDRESS,
            default=None,
            help="Address the server binds (default 0.0.0.0; fe80::1%IFACE for link-local).",
        ),
        click.option("--udp", is_flag=True, help="A UDP socket instead of TCP."),
        click.option("--reuseaddr", is_flag=True, help="The server sets SO_REUSEADDR."),
        click.option("--reuseport", is_flag=True, help="The server sets SO_REUSEPORT."),
        click.option(
            "--v6only",
            type=click.Choice(["0", "1"]),
            is_flag=False,
            flag_value="1",
            default=None,
            metavar="[0|1]",
            callback=_v6only_value,
            help="IPv6 socket with IPV6_V6ONLY=1 (alone or 1), or =0: dual-stack even when "
            "net.ipv6.bindv6only=1. Default: the sysctl's.",
        ),
    ]


def _v6only_value(ctx: click.Context, param: click.Parameter, value: str | None) -> bool | None:
    return None if value is None else value == "1"


def bind_options(f: F) -> F:
    """The bind options `rebind why` takes, for every command that acts on a bind request."""
    for deco in reversed(_bind_decorators(True)):
        f = deco(f)
    return f


#: The parameters :func:`bind_options` adds, in :func:`request_from`'s order.
BIND_PARAMS = ("spec", "addr", "udp", "reuseaddr", "reuseport", "v6only")
#: The parameters :func:`device_options` adds.
DEVICE_PARAMS = ("device", "freebind")


@dataclass(frozen=True, slots=True)
class BindArgs:
    """The bind options as the user gave them, before they become a request: for `rebind why`,
    whose other questions (``--connect``, ``--reload``) use some of them and build no
    :class:`~rebind.model.request.BindRequest`."""

    spec: Spec | None
    addr: IPv4Address | IPv6Address | None
    udp: bool
    reuseaddr: bool
    reuseport: bool
    v6only: bool | None
    device: str | None = None
    freebind: bool = False

    def request(self) -> BindRequest:
        """The bind request these options ask about (:func:`request_from`); UsageError without
        a PORT."""
        if self.spec is None:
            raise click.UsageError("missing PORT")
        return request_from(
            self.spec,
            self.addr,
            self.udp,
            self.reuseaddr,
            self.reuseport,
            self.v6only,
            device=self.device,
            freebind=self.freebind,
        )


def _pop_args(kwargs: dict[str, Any], device: bool) -> BindArgs:
    extra = {name: kwargs.pop(name) for name in DEVICE_PARAMS} if device else {}
    return BindArgs(*(kwargs.pop(name) for name in BIND_PARAMS), **extra)


def bind_args_options(*, port_optional: bool = False, device: bool = False) -> Callable[[F], F]:
    """:func:`bind_options` (and with ``device``, :func:`device_options`) handed to the command
    as one ``bind`` (:class:`BindArgs`): for a command that builds the request only on some
    paths (`rebind why`)."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            return f(*args, bind=_pop_args(kwargs, device), **kwargs)

        wrapped: Any = command
        if device:
            wrapped = device_options(wrapped)
        return cast(F, (bind_options_port_optional if port_optional else bind_options)(wrapped))

    return decorate


def bind_request_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`bind_options` handed to the command as one ``req`` (:func:`request_from`): for a
    command that needs nothing but the request from them (`rebind free`, `rebind wait`)."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        return f(*args, req=_pop_args(kwargs, False).request(), **kwargs)

    return bind_options(command)


def bind_options_port_optional(f: F) -> F:
    """The same, with PORT optional: `rebind why --connect HOST:PORT` asks about no local port."""
    for deco in reversed(_bind_decorators(False)):
        f = deco(f)
    return f


def device_options(f: F) -> F:
    """SO_BINDTODEVICE and IP_FREEBIND: options that change bind()'s answer too."""
    for deco in reversed(
        [
            click.option(
                "--device",
                metavar="IFACE",
                default=None,
                help="The server sets SO_BINDTODEVICE (a link-local --addr's %SCOPE overrides it at "
                "bind(), as the kernel does).",
            ),
            click.option("--freebind", is_flag=True, help="The server sets IP_FREEBIND."),
        ]
    ):
        f = deco(f)
    return f


def request_from(
    spec: Spec,
    addr: IPv4Address | IPv6Address | None,
    udp: bool,
    reuseaddr: bool,
    reuseport: bool,
    v6only: bool | None,
    *,
    device: str | None = None,
    freebind: bool = False,
) -> BindRequest:
    """The same request `rebind why` builds from the same options."""
    from rebind.diagnosis import default_request

    spec_addr, port = spec
    if spec_addr is not None and addr is not None and spec_addr != addr:
        raise click.UsageError(f"two addresses given: {spec_addr} and {addr}")
    address = addr or spec_addr
    if v6only is not None and address is not None and address.version != 6:
        raise click.UsageError("--v6only needs an IPv6 address (e.g. --addr ::)")
    return default_request(
        port,
        addr=address,
        proto="udp" if udp else "tcp",
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        v6only=v6only,
        device=device,
        freebind=freebind,
    )
