"""Many instances of a frozen slotted dataclass, built fast (a port's ten thousand TIME_WAITs).

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (its own
``__setattr__`` refuses): ~2.3 us for SocketRecord's 17 fields, the largest part of `rebind
trace`'s snapshot at a port of ten thousand TIME_WAITs (docs/benchmarks.md). Setting the slots
through their descriptors (``SocketRecord.proto.__set__(r, v)``) takes ~1.1 us; a plain class
with the same ``__slots__`` (:func:`twin`), set attribute by attribute, ~0.35 us: its instance
then becomes the dataclass's by ``__class__`` assignment, which Python allows between classes
whose instances have the same layout -- "only if both classes have the same __slots__" (the
language reference, data model, __slots__). The result is an instance of the dataclass in every
respect: its type, equality, hash, repr, and frozen from then on.

Every slot must be set before the switch (one left unset reads as AttributeError, as on an
instance made by ``object.__new__``): callers set them all, in one place each, and the unit
tests compare what they build with the dataclass's own ``__init__``.
"""

from __future__ import annotations

from typing import Any


def twin(cls: type[Any]) -> type[Any]:
    """A plain class with ``cls``'s slots, whose instances, every slot set, become ``cls``'s
    instances by ``obj.__class__ = cls``. Checked once here (TypeError where the layouts
    differ: ``cls`` not a slotted class of its own slots, or an interpreter that refuses)."""
    slots = cls.__dict__.get("__slots__")
    if not isinstance(slots, tuple) or not slots or "__dict__" in slots:
        raise TypeError(f"{cls.__name__} has no slots of its own to share")
    made: type[Any] = type(f"{cls.__name__}Slots", (), {"__slots__": slots, "__module__": cls.__module__})
    probe = made()
    for name in slots:
        setattr(probe, name, None)
    probe.__class__ = cls  # TypeError: "object layout differs"
    return made
