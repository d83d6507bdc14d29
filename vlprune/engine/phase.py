"""Phase detection: what a call of the base model is to a session (*prefill*: image tokens and no cache yet;
*decode*: a step over the cache of a pruned prefill; *idle*: anything else), and the checks that the call is one
vlprune can prune."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import torch

from vlprune.adapters import ModelAdapter
from vlprune.errors import VlpruneError


class Phase(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


class ModelCall(NamedTuple):
    """What the phase of a base-model call depends on."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cache: Any
    visual: torch.Tensor | None  # (B, L) the prompt's visual tokens, when the call carries token ids

    @property
    def starts_prefill(self) -> bool:
        """Whether the call is a prompt with visual tokens and no cache yet."""
        visual = self.visual
        return visual is not None and visual.shape[1] > 1 and not has_past(self.cache) and bool(visual.any())

    @property
    def query_length(self) -> int:
        return self.input_ids.shape[1] if self.input_ids is not None else 1


def read_model_call(adapter: ModelAdapter, args: tuple, kwargs: dict) -> ModelCall:
    """The call's prompt, mask and cache, checked.

    Raises:
        VlpruneError: images without an image token in the prompt, or an attention mask that is not 2-D.
    """
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = cache_argument(kwargs)
    attention_mask = kwargs.get("attention_mask")
    has_images = kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs"))
    adapter.check_call(kwargs)
    visual = None if input_ids is None else adapter.visual_token_mask(input_ids)
    if has_images and (visual is None or not bool(visual.any())):
        raise VlpruneError(
            "the prompt has no image token: put the processor's image token (for LLaVA '<image>') in the text "
            "so the processor expands it into visual tokens"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise VlpruneError(f"vlprune needs a 2-D attention mask, got shape {tuple(attention_mask.shape)}")
    return ModelCall(input_ids, attention_mask, cache, visual)


def returned_cache(kwargs: dict, output: Any) -> Any:
    """The cache a base-model call filled: the one it was given, else the one its output carries."""
    return cache_argument(kwargs) or getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def cache_argument(kwargs: dict) -> Any:
    # transformers 5.24 renamed `past_key_values` to `cache`; both spellings reach the hooks depending on the version.
    return kwargs.get("cache", kwargs.get("past_key_values"))


def has_past(cache: Any) -> bool:
    return cache is not None and int(cache.get_seq_length()) > 0
