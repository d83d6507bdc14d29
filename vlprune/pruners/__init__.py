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
from typing import TYPE_CHECKING

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners.base import (
    Pruner,
    QueryRows,
    RecycledTokens,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    VisionLayerContext,
    check_budget,
    parse_budget,
    resolve_keep,
    top_k_sorted,
)
from vlprune.pruners.options import coerce_options
from vlprune.pruners.plans import plan_needs

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits

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
        close = difflib.get_close_matches(str(name), available_methods(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise VlpruneError(f"unknown method {name!r}{hint}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Every name ``create`` accepts on its own, sorted: the pruners and the attention modifiers (``"var"``)."""
    return sorted([*available(), *available_modifiers()])


def available_modifiers() -> list[str]:
    """Names of the attention modifiers, which combine with any pruner as ``METHOD+NAME`` (or alone as ``NAME``)."""
    from vlprune.pruners.var import VAR

    return [VAR.name]


_LISTING_LAYERS = 32  # LLaVA-1.5-7B's depth, for describing where a method's default plan acts


def stages_of(name: str) -> str:
    """Where the method ``name`` acts by default: its declared stage, plus "in-LLM" when its default plan on a
    LLaVA-1.5-shaped model (at a quarter of the tokens) also prunes inside the language model, so that the listing
    cannot drift from the code (VFlowOpt: "pre-LLM+in-LLM")."""
    from vlprune.pruners.base import PROBE_TOKENS

    if name in available_modifiers():  # they prune nothing: they rewrite attention inside the language model
        return Stage.ATTENTION.value
    cls = get(name)
    if cls.stage not in (Stage.VISION, Stage.PRE_LLM):
        return cls.stage.value
    try:
        plan = cls(keep=0.25).plan(PROBE_TOKENS, _LISTING_LAYERS)
    except Exception:  # a user's pruner that cannot plan for this shape: its declared stage stands
        return cls.stage.value
    later = any(stage.layer > 0 for stage in plan)
    return f"{cls.stage.value}+{Stage.IN_LLM.value}" if later else cls.stage.value


def __getattr__(name: str) -> object:
    if name == "FAMILY_NAMES":  # read when asked: the adapters' registry may grow after this module loads
        from vlprune.adapters import family_names

        return family_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def families_of(method: str | Pruner) -> list[str]:
    """The registered families a method runs on: the method ``name`` with its defaults, or a pruner with its own
    options. Each family's adapter declares what its stages can be given (``AdapterTraits``); a method runs where
    its plan for that family needs nothing the family lacks (:func:`vlprune.adapters.refusal`, the rule the engine
    refuses by).
    """
    from vlprune.adapters import registered_traits
    from vlprune.pruners.var import VAR

    families = [traits.family for traits in registered_traits()]
    if method == VAR.name:
        return families
    if isinstance(method, Pruner):
        pruner = method
    else:
        cls = get(method)
        pruner = cls() if cls.name == "none" else cls(keep=0.25)
    return [traits.family for traits in registered_traits() if unsupported_reason(pruner, traits) is None]


def unsupported_reason(
    pruner: Pruner, traits: AdapterTraits, needs: frozenset[Need] | None = None, tower_name: str = "the vision tower"
) -> str | None:
    """Why ``pruner``, whose stages need ``needs`` (by default those of its plan for such a model), cannot run on a
    model with ``traits`` (its vision tower named ``tower_name``), or None when it can."""
    from vlprune.adapters import refusal
    from vlprune.pruners.base import PROBE_TOKENS

    if needs is None:
        needs = plan_needs(pruner.plan_for(traits, PROBE_TOKENS, _LISTING_LAYERS))
    return refusal(
        traits,
        needs,
        pruner.name,
        cls_substitute=type(pruner).cls_substitute,
        prunes_in_vision=pruner.prunes_vision_tower(),
        tower_name=tower_name,
    )


def _options_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def create(name: str, **options: object) -> Pruner:
    """Build the pruner ``name`` with its options (``keep=64``, ``layer=2``, ...). Options set to None keep their
    defaults, so callers can pass optional CLI values straight through.

    ``"fastv+var"`` adds the attention modifier VAR to the pruner FastV (``"var"`` alone: VAR without pruning); each
    option goes to whichever of the two has it.
    """
    from vlprune.pruners.var import VAR

    base_name, plus, modifier_name = str(name).partition("+")
    if not plus and base_name == VAR.name:
        base_name, modifier_name = "none", VAR.name
    if plus and modifier_name != VAR.name:
        raise VlpruneError(f"unknown attention modifier {modifier_name!r} in {name!r}; available: {VAR.name}")
    cls = get(base_name)
    valid = _options_of(cls)
    modifier_valid = _options_of(VAR) if modifier_name else set()
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - valid - modifier_valid)
    if unknown:
        raise VlpruneError(
            f"method {name!r} has no option {', '.join(unknown)}; its options are: "
            f"{', '.join(sorted(valid | modifier_valid))}"
        )
    shared = sorted(set(given) & valid & modifier_valid)
    if shared:
        raise VlpruneError(f"option {shared[0]!r} of {name!r} is ambiguous: both {base_name} and var have it")
    own = coerce_options(cls, name, {k: v for k, v in given.items() if k in valid})
    if own.get("keep") is not None:
        own["keep"] = check_budget(own["keep"])
    pruner = _build(cls, name, own)
    if modifier_name:
        pruner.modifier = _build(
            VAR, name, coerce_options(VAR, name, {k: v for k, v in given.items() if k in modifier_valid})
        )
    return pruner


def _build(cls: type[Pruner], name: str, options: dict[str, object]) -> Pruner:
    """``cls(**options)``; a TypeError from a pruner's own checks becomes a VlpruneError naming the method."""
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        if isinstance(error, VlpruneError):
            raise
        raise VlpruneError(f"method {name!r}: {error}") from None


# Importing the built-in pruners registers them.
from vlprune.pruners import (  # noqa: E402, F401
    adaptinfer,
    cdpruner,
    dart,
    divprune,
    fastervlm,
    fastv,
    flowcut,
    holov,
    mmtok,
    none,
    ptp,
    pyramiddrop,
    random,
    scope,
    sparsevlm,
    tops,
    vflowopt,
    visionzip,
    vispruner,
    vscan,
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
    "available_methods",
    "available_modifiers",
    "check_budget",
    "create",
    "families_of",
    "get",
    "parse_budget",
    "register",
    "resolve_keep",
    "stages_of",
    "top_k_sorted",
    "unsupported_reason",
]
