"""What a served model is told to do: the ``vlprune`` entry of its configuration, checked once, with one-line errors.

A user turns pruning on with vLLM's own ``hf_overrides``, which adds the entry to the model's Hugging Face config::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides '{"vlprune": {"method": "divprune", "keep": 128}}'
    vllm.LLM(model=..., hf_overrides={"vlprune": {"method": "holov", "keep": 0.25, "options": {"crops": 4}}})

``keep`` is each image's budget (a count, or a fraction of that image's tokens); ``options`` are the method's own
(``vlprune methods`` lists them). A request may carry its own budget in ``mm_processor_kwargs={"vlprune_keep": 64}``.

The plugin serves the methods that select among an image's tokens once, before the language model, from what vLLM's
vision tower and projector compute (:data:`SERVED_NEEDS`). Methods that prune inside the language model need a
per-layer cut of the paged KV cache, and methods that prune inside the vision tower need a cut of vLLM's encoder;
both are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlprune.adapters import AdapterTraits, provided_needs
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import Pruner, Stage, create, families_of, resolve_keep, unsupported_reason
from vlprune.pruners.base import PROBE_TOKENS, check_budget
from vlprune.pruners.plans import plan_needs
from vlprune.vllm.image_selection import PLAN_LAYERS

CONFIG_KEY = "vlprune"
"""The key of the settings in the model's config (``hf_overrides={"vlprune": {...}}``)."""

REQUEST_KEY = "vlprune_keep"
"""The ``mm_processor_kwargs`` key of a request's own budget."""

SERVED_NEEDS = frozenset({Need.CLS_ATTENTION, Need.RECEIVED_ATTENTION, Need.VISION_KEYS, Need.VISION_FEATURES})
"""The inputs the plugin reads from vLLM's tower and projector (besides the projected tokens themselves)."""

_SETTING_NAMES = ("method", "keep", "options")


@dataclass(frozen=True)
class PruneSettings:
    """A checked ``vlprune`` entry: the method, its default budget per image and its options."""

    method: str
    keep: int | float
    options: Mapping[str, Any]

    def pruner(self, keep: int | float | None = None) -> Pruner:
        """A fresh pruner with these options and ``keep`` (this setting's budget when None)."""
        return create(self.method, **dict(self.options), keep=self.keep if keep is None else keep)

    def image_budget(self, image_tokens: int, keep: int | float | None = None) -> int:
        """The tokens an image of ``image_tokens`` keeps under ``keep`` (this setting's budget when None).

        Raises:
            VlpruneError: a count above the image's tokens, or an invalid budget.
        """
        budget = self.keep if keep is None else keep
        try:
            return resolve_keep(budget, image_tokens)
        except VlpruneError:
            if isinstance(budget, int) and not isinstance(budget, bool) and budget > image_tokens:
                raise VlpruneError(
                    f"vlprune keep={budget} is above this image's {image_tokens} visual tokens; pass at most "
                    f"{image_tokens}, or a fraction such as 0.25"
                ) from None
            raise


def settings_from_config(hf_config: object) -> PruneSettings | None:
    """The checked settings in a model config's ``vlprune`` entry, or None when it has none (the model is served
    unpruned, exactly as vLLM serves it).

    Raises:
        VlpruneError: an entry that is not a mapping, an unknown key, method or option, or an invalid budget.
    """
    entry = getattr(hf_config, CONFIG_KEY, None)
    if entry is None:
        return None
    return parse_settings(entry)


def parse_settings(entry: object) -> PruneSettings:
    """``{"method": ..., "keep": ..., "options": {...}}`` checked (see :func:`settings_from_config`)."""
    if not isinstance(entry, Mapping):
        raise VlpruneError(
            f'the vlprune setting must be a mapping such as {{"method": "divprune", "keep": 64}}, got {entry!r}'
        )
    unknown = sorted(set(entry) - set(_SETTING_NAMES))
    if unknown:
        raise VlpruneError(f"unknown vlprune setting(s) {', '.join(map(repr, unknown))}; valid: method, keep, options")
    method = entry.get("method")
    if not isinstance(method, str) or not method:
        raise VlpruneError(f"vlprune needs a method name, got method={method!r} (see `vlprune methods`)")
    if "keep" not in entry:
        raise VlpruneError(f"vlprune method {method!r} needs a budget: keep=<count per image> or keep=<fraction>")
    keep = check_budget(entry["keep"])
    options = entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise VlpruneError(f"vlprune options must be a mapping of the method's options, got {options!r}")
    if "keep" in options:
        raise VlpruneError("give vlprune's budget as its own setting keep=..., not among the options")
    settings = PruneSettings(method=method, keep=keep, options=dict(options))
    check_served(settings.pruner())
    return settings


def served_methods() -> list[str]:
    """The registered methods the plugin serves (on some family), sorted."""
    from vlprune.pruners import available, get

    served = []
    for name in available():
        try:
            pruner = get(name)(keep=1)
        except (VlpruneError, TypeError, ValueError):
            continue
        if _not_served_reason(pruner) is None:
            served.append(name)
    return served


def check_served(pruner: Pruner) -> None:
    """Refuse a method the plugin cannot serve, naming why.

    Raises:
        VlpruneError: an in-LLM method, a vision-encoder method, an attention modifier, or a method with more than one
            stage or a stage the plugin cannot feed.
    """
    reason = _not_served_reason(pruner)
    if reason is not None:
        if pruner.stage in (Stage.IN_LLM, Stage.VISION) or pruner.prunes_vision_tower():
            reason += f"; serve a pre-LLM method ({', '.join(served_methods())})"
        name = pruner.name + ("+var" if pruner.modifier is not None else "")
        raise VlpruneError(f"vlprune cannot serve {name!r} through vLLM: {reason}")


def _not_served_reason(pruner: Pruner) -> str | None:
    """Why the plugin cannot serve ``pruner`` on any family, or None."""
    if pruner.modifier is not None:
        return "VAR changes the attention of every decoder layer, which runs in vLLM's paged attention"
    if pruner.stage is Stage.IN_LLM:
        return "it prunes inside the language model, which needs a per-layer cut of vLLM's paged KV cache"
    if pruner.stage is Stage.VISION or pruner.prunes_vision_tower():
        return "it prunes inside the vision encoder, which needs a cut of vLLM's own encoder layers"
    if pruner.stage is not Stage.PRE_LLM:
        return "it prunes no visual tokens"
    plan = pruner.plan(PROBE_TOKENS, PLAN_LAYERS)
    if len(plan) != 1 or plan[0].layer != 0 or plan[0].query_rows is not None:
        layers = ", ".join(str(stage.layer) for stage in plan)
        return (
            f"it runs stages at language-model layers {layers}, and the plugin selects each image's tokens once, "
            f"before the language model"
        )
    unread = plan_needs(plan) - SERVED_NEEDS
    if unread & {Need.INITIAL_EMBEDDINGS, Need.TEXT_TOKENS, Need.INSTRUCTION_IDS}:
        return (
            "it reads the instruction, and vLLM encodes each image without its prompt (its multimodal "
            "embedding step sees the image's inputs alone)"
        )
    if unread:
        needs = ", ".join(sorted(need.value for need in unread))
        return f"it reads {needs}, which the plugin does not read from vLLM's vision tower"
    return None


def check_family(pruner: Pruner, traits: AdapterTraits, tower_name: str) -> frozenset[Need]:
    """The inputs ``pruner`` reads on a model with ``traits`` (the [CLS] attention served as received attention
    where its reference does so on towers without [CLS]).

    Raises:
        VlpruneError: a method the family cannot serve, with the families that can.
    """
    reason = unsupported_reason(pruner, traits, tower_name=tower_name)
    if reason is not None:
        serving = ", ".join(families_of(pruner)) or "none"
        raise VlpruneError(f"vlprune: {reason} (families that serve it: {serving})")
    needs = plan_needs(pruner.plan_for(traits, PROBE_TOKENS, PLAN_LAYERS))
    return provided_needs(traits, needs, type(pruner).cls_substitute)
