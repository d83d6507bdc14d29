"""Which session is attached to which model: a model carries one vlprune session at a time, and a second attach is
refused with the way to release the first."""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from vlprune.errors import VlpruneError

registry: dict[int, weakref.ref] = {}
"""id(model) -> the session attached to it. Weak, so that a model dropped without detaching frees its entry's claim
when a new model reuses its id."""


def attached_to(model: nn.Module) -> Any | None:
    """The session attached to ``model`` now, or None."""
    claim = registry.get(id(model))
    session = None if claim is None else claim()
    return session if session is not None and session.model is model else None


def claim(model: nn.Module, session: Any) -> None:
    """Record ``session`` as ``model``'s.

    Raises:
        VlpruneError: another session holds the model (the message says how to release it).
    """
    holder = attached_to(model)
    if holder is not None:
        raise VlpruneError(f"this model already has a vlprune session attached; {holder.release_hint()}")
    registry[id(model)] = weakref.ref(session)


def release(model: nn.Module, session: Any) -> None:
    """Forget ``model``'s claim if ``session`` holds it (a refused second session must not release the first's)."""
    if attached_to(model) is session:
        del registry[id(model)]
