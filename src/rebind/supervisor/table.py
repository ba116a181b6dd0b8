"""How the supervisor's transition table (:data:`.machine.TRANSITIONS`) is filled: one row per
(event type, role of the generation it concerns, phase), each asserted unique, so that a
missing or doubled row is a bug the unit tests find by walking the whole product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias, TypeVar

from rebind.supervisor.vocab import Action, Config, Event, Gen, Phase, Role, State

Result: TypeAlias = tuple[State, list[Action]]
Handler: TypeAlias = Callable[[Config, State, Event], Result]
E = TypeVar("E")
Key: TypeAlias = tuple[type, Role, Phase]


class Rows:
    """The row makers of one table."""

    def __init__(self, rows: dict[Key, Handler]) -> None:
        self.rows = rows

    def add(self, event: type, roles: tuple[Role, ...], phases: tuple[Phase, ...], handler: Handler) -> None:
        """Rows whose handler gets the event as is."""
        for role in roles:
            for phase in phases:
                key = (event, role, phase)
                assert key not in self.rows, key
                self.rows[key] = handler

    def gen_rows(
        self,
        event: type[E],
        roles: tuple[Role, ...],
        phases: tuple[Phase, ...],
        handler: Callable[[Config, State, E, Gen], Result],
    ) -> None:
        """Rows for an event about one generation: the handler gets that generation."""

        def run(cfg: Config, state: State, ev: Event) -> Result:
            gen = state.gen(getattr(ev, "number", None))
            assert isinstance(ev, event) and gen is not None, (ev, gen)
            return handler(cfg, state, ev, gen)

        self.add(event, roles, phases, run)

    def whole(
        self, event: type[E], phases: tuple[Phase, ...], handler: Callable[[Config, State, E], Result]
    ) -> None:
        """Rows for an event about the supervisor as a whole (role NONE)."""

        def run(cfg: Config, state: State, ev: Event) -> Result:
            assert isinstance(ev, event), ev
            return handler(cfg, state, ev)

        self.add(event, (Role.NONE,), phases, run)
