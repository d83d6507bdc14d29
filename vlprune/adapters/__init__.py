"""Model adapters: where a VLM family keeps its vision tower, projector, decoder layers and image tokens, where each
of its visual tokens came from, and what the family is (:class:`AdapterTraits`).

The engine and the pruners only talk to a :class:`ModelAdapter` and its traits, so supporting another family means
adding one module here whose adapter class is decorated with :func:`register_adapter` (and imported below), not
touching the pruners.
"""

from __future__ import annotations

from vlprune.adapters.base import SUPPORTED_ATTENTION, LanguageModelShape, ModelAdapter
from vlprune.adapters.llava import LlavaAdapter
from vlprune.adapters.llava_next import LlavaNextAdapter
from vlprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vlprune.adapters.qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from vlprune.adapters.registry import (
    FAMILIES,
    adapter_class_for,
    family_names,
    register_adapter,
    registered_traits,
    traits_of,
)
from vlprune.adapters.traits import AdapterTraits, VisionTower, provided_needs, refusal
from vlprune.errors import VlpruneError

__all__ = [
    "FAMILIES",
    "SUPPORTED_ATTENTION",
    "AdapterTraits",
    "LanguageModelShape",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "VisionTower",
    "adapter_for",
    "family_names",
    "provided_needs",
    "refusal",
    "register_adapter",
    "registered_traits",
    "traits_of",
]


def adapter_for(model: object) -> ModelAdapter:
    """The adapter of a supported model.

    Raises:
        VlpruneError: the model family is not supported, or its attention implementation is not.
    """
    adapter = adapter_class_for(type(model).__name__)(model)
    unsupported = sorted(adapter.attention_implementations() - set(SUPPORTED_ATTENTION))
    if unsupported:
        raise VlpruneError(
            f"attn_implementation {unsupported} is not supported yet; load the model with one of {SUPPORTED_ATTENTION}"
        )
    return adapter
