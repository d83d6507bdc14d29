"""The multimodal processor's part: each image gets exactly its budget of placeholder tokens, so that the language
model, its KV cache, the scheduler and every decode step see the pruned length.

:class:`PrunedImagePlaceholders` goes before a family's own vLLM processor class. It shortens each image's placeholder
run (vLLM's own count for that image, from its size or grid) to the image's budget, and hands the budget to the model
with the image's other inputs (the ``vlprune_keep`` field), so that the model keeps exactly as many tokens as the
prompt has places for. A request's ``mm_processor_kwargs={"vlprune_keep": K}`` overrides the served budget for its
images (the processor cache keys items by these kwargs too, so budgets never mix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlprune.adapters import AdapterTraits
from vlprune.errors import VlpruneError
from vlprune.pruners.base import check_budget, parse_budget
from vlprune.vllm.settings import REQUEST_KEY, PruneSettings, check_family, settings_from_config


def request_budget(hf_processor_mm_kwargs: Mapping[str, object], settings: PruneSettings) -> int | float:
    """The budget of a request's images: its own ``vlprune_keep``, else the served one.

    Raises:
        VlpruneError: a request budget that is no count or fraction.
    """
    budget = hf_processor_mm_kwargs.get(REQUEST_KEY)
    if budget is None:
        return settings.keep
    if isinstance(budget, str):
        return parse_budget(budget)
    return check_budget(budget)


def encode_budget(budget: int | float) -> float:
    """A budget as one number per image for the model (a fraction is below 1, a count at least 1)."""
    return float(budget)


def decode_budget(value: float) -> int | float:
    """The budget :func:`encode_budget` wrote."""
    return value if value < 1 else round(value)


class PrunedImagePlaceholders:
    """Mixin for a vLLM multimodal processor (put it first among the bases): images get their budget of placeholders
    when the model's config has a ``vlprune`` entry; otherwise the processor is vLLM's own, unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A bad setting, or a method the family cannot serve, fails where vLLM's front end makes the processor: before
        # the engine starts and any weight loads.
        settings = self.vlprune_settings
        if settings is not None:
            config = self.info.get_hf_config()
            check_family(settings.pruner(), self.vlprune_traits(config), config.vision_config.model_type)

    @staticmethod
    def vlprune_traits(hf_config: Any) -> AdapterTraits:
        """The family's traits for a model with this config (each family's processor says)."""
        raise NotImplementedError

    @property
    def vlprune_settings(self) -> PruneSettings | None:
        cached = getattr(self, "_vlprune_settings", False)
        if cached is False:
            cached = settings_from_config(self.info.get_hf_config())
            self._vlprune_settings = cached
        return cached

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        own = {key: value for key, value in hf_kwargs.items() if key != REQUEST_KEY}  # not a transformers argument
        return super()._call_hf_processor(hf_data, own)

    def _finalize_hf_mm_data(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
        passthrough_data: Mapping[str, object],
        processed_data: Any = None,
    ) -> Any:
        processed = super()._finalize_hf_mm_data(hf_data, hf_kwargs, passthrough_data, processed_data)
        settings = self.vlprune_settings
        images = hf_data.get("images")
        if settings is not None and images:
            if "image_embeds" in processed:
                raise VlpruneError(
                    "vlprune prunes images from their pixels; requests with image embeddings are not served"
                )
            budget = encode_budget(request_budget(hf_kwargs, settings))
            processed[REQUEST_KEY] = torch.full((len(images),), budget, dtype=torch.float64)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if REQUEST_KEY in hf_inputs:
            from vllm.multimodal.inputs import MultiModalFieldConfig

            fields[REQUEST_KEY] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
    ) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = self.vlprune_settings
        if settings is None:
            return updates
        return [
            _shortened(update, settings, out_mm_kwargs) if update.modality == "image" else update for update in updates
        ]


def _shortened(update: Any, settings: PruneSettings, out_mm_kwargs: Any) -> Any:
    """``update`` (a :class:`PromptReplacement` of images) with each image's run cut to its budget."""
    from dataclasses import replace

    stock = update.replacement

    def pruned_run(item_idx: int) -> list[int]:
        run = stock(item_idx) if callable(stock) else stock
        if not isinstance(run, list) or len(set(run)) != 1:
            raise VlpruneError(
                "vlprune shortens runs of one image token; this model's processor places other tokens among an "
                "image's (not served yet)"
            )
        item = out_mm_kwargs["image"][item_idx]
        budget = decode_budget(float(item[REQUEST_KEY].data)) if REQUEST_KEY in item else settings.keep
        return run[:1] * settings.image_budget(len(run), budget)

    return replace(update, replacement=pruned_run)
