"""What `why PORT` adds after its diagnosis (issue 20): the localhost split-brain finding and the
well-known holders (model/localhost.py, model/wellknown.py decide them; render/findings.py shows
them). A room of its own so that a port no process holds (ten thousand TIME_WAITs) carries its
empty findings without importing the catalogue's model (~4 ms of `why`'s imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rebind.model.localhost import SplitBrain
    from rebind.model.wellknown import Lookalike, Recognised


@dataclass(frozen=True, slots=True)
class Findings:
    """What `why PORT` adds to the diagnosis: the localhost split and the well-known holders."""

    localhost: SplitBrain | None = None
    holders: tuple[Recognised, ...] = ()
    lookalikes: tuple[Lookalike, ...] = ()
