"""Pruner registry: ``create(name, **options)`` builds a pruner, ``register`` adds one, ``available()`` lists them.

A pruner is a dataclass subclass of :class:`Pruner` decorated with :func:`register`; importing its module registers it.
Users register their own the same way::

    @vlprune.pruners.register
    @dataclass
    class MyPruner(Pruner):
        name = "mine"
        stage = Stage.PRE_LLM
        reference = "my paper"
        ...
"""

from __future__ import annotations

import dataclasses
import difflib

from vlprune.errors import VlpruneError
from vlprune.pruners.base import (
    Pruner,
    QueryRows,
    RecycledTokens,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    VisionLayerContext,
    resolve_keep,
    top_k_sorted,
)

_REGISTRY: dict[str, type[Pruner]] = {}


def register(cls: type[Pruner]) -> type[Pruner]:
    """Class decorator: make ``cls`` available under ``cls.name``. Re-registering a name replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Pruner)):
        raise TypeError(f"register expects a Pruner subclass, got {cls!r}")
    # `is_dataclass` is true for any Pruner subclass (it inherits the fields); the class itself must be decorated.
    if not cls.name or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be a dataclass with a non-empty class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered pruners, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Pruner]:
    """The pruner class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise VlpruneError(f"unknown method {name!r}{hint}; available: {', '.join(available())}") from None


def create(name: str, **options: object) -> Pruner:
    """Build the pruner ``name`` with its options (``keep=64``, ``layer=2``, ...). Options set to None keep their
    defaults, so callers can pass optional CLI values straight through."""
    cls = get(name)
    valid = {f.name for f in dataclasses.fields(cls)}
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - valid)
    if unknown:
        raise VlpruneError(
            f"method {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(valid))}"
        )
    return cls(**given)


# Importing the built-in pruners registers them.
from vlprune.pruners import (  # noqa: E402, F401
    divprune,
    fastervlm,
    fastv,
    flowcut,
    holov,
    none,
    pyramiddrop,
    random,
    sparsevlm,
    vflowopt,
    visionzip,
    zoo_prune,
)

__all__ = [
    "Pruner",
    "QueryRows",
    "RecycledTokens",
    "Selection",
    "Stage",
    "StageContext",
    "StagePlan",
    "VisionLayerContext",
    "available",
    "create",
    "get",
    "register",
    "resolve_keep",
    "top_k_sorted",
]
