"""The adapter registry: which adapter serves which transformers class, filled by :func:`register_adapter`.

An adapter module decorates its class with the transformers classes it serves; importing the module registers it.
The families come out in registration order, which is the order ``vlprune methods`` and the docs list them in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vlprune.errors import VlpruneError

if TYPE_CHECKING:
    from vlprune.adapters.base import ModelAdapter
    from vlprune.adapters.traits import AdapterTraits

FAMILIES: dict[str, type[ModelAdapter]] = {}
"""transformers class name -> adapter (the exact class: a subclass may lay its modules out differently)."""


def register_adapter(*class_names: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: serve the transformers classes ``class_names`` (exact names) with the decorated adapter."""

    def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
        for name in class_names:
            FAMILIES[name] = adapter
        return adapter

    return register


def adapter_class_for(class_name: str) -> type[ModelAdapter]:
    """The adapter registered for the transformers class ``class_name``.

    Raises:
        VlpruneError: no adapter serves it (the message lists the supported classes).
    """
    adapter = FAMILIES.get(class_name)
    if adapter is None:
        supported = ", ".join(name for name in FAMILIES if name.endswith("ForConditionalGeneration"))
        raise VlpruneError(f"unsupported model family {class_name}; vlprune supports {supported}")
    return adapter


def registered_traits() -> list[AdapterTraits]:
    """The traits of every registered family, once each, in registration order."""
    seen: dict[str, AdapterTraits] = {}
    for adapter in FAMILIES.values():
        seen.setdefault(adapter.traits.family, adapter.traits)
    return list(seen.values())


def family_names() -> tuple[str, ...]:
    """The registered families' names, in registration order."""
    return tuple(traits.family for traits in registered_traits())


def traits_of(family: str) -> AdapterTraits:
    """The traits of the registered family ``family`` (its usual vision tower).

    Raises:
        VlpruneError: no registered family has that name (the message lists them).
    """
    for traits in registered_traits():
        if traits.family == family:
            return traits
    raise VlpruneError(f"unknown model family {family!r}; the families are {', '.join(family_names())}")
