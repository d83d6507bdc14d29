"""Model adapters: where a VLM family keeps its vision tower, projector, decoder layers and image tokens, and where
each of its visual tokens came from.

The engine and the pruners only talk to a :class:`ModelAdapter`, so supporting another family means adding one
module here (and its entry in :data:`FAMILIES`), not touching the pruners.
"""

from __future__ import annotations

from vlprune.adapters.base import SUPPORTED_ATTENTION, LanguageModelShape, ModelAdapter
from vlprune.adapters.llava import LlavaAdapter
from vlprune.adapters.llava_next import LlavaNextAdapter
from vlprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vlprune.adapters.qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from vlprune.errors import VlpruneError

__all__ = [
    "FAMILIES",
    "SUPPORTED_ATTENTION",
    "LanguageModelShape",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "adapter_for",
]

FAMILIES: dict[str, type[ModelAdapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaModel": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "LlavaNextModel": LlavaNextAdapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "LlavaOnevisionModel": LlavaOnevisionAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2VLModel": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLAdapter,
    "Qwen2_5_VLModel": Qwen2_5_VLAdapter,
    "Qwen3VLForConditionalGeneration": Qwen3VLAdapter,
    "Qwen3VLModel": Qwen3VLAdapter,
}
"""transformers class name -> adapter (the exact class: a subclass may lay its modules out differently)."""


def adapter_for(model: object) -> ModelAdapter:
    """The adapter of a supported model.

    Raises:
        VlpruneError: the model family is not supported, or its attention implementation is not.
    """
    adapter_class = FAMILIES.get(type(model).__name__)
    if adapter_class is None:
        supported = ", ".join(name for name in FAMILIES if name.endswith("ForConditionalGeneration"))
        raise VlpruneError(f"unsupported model family {type(model).__name__}; vlprune supports {supported}")
    adapter = adapter_class(model)
    unsupported = sorted(adapter.attention_implementations() - set(SUPPORTED_ATTENTION))
    if unsupported:
        raise VlpruneError(
            f"attn_implementation {unsupported} is not supported yet; load the model with one of {SUPPORTED_ATTENTION}"
        )
    return adapter
