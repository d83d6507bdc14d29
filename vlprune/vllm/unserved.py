"""vLLM's classes for the families vlprune's plugin does not prune yet, each refusing a config with a ``vlprune``
entry (which vLLM's own class would serve unpruned without a word) and otherwise exactly vLLM's.

The HF engine prunes these families (``vlprune run``, ``vlprune.load``); what the plugin lacks for each is in
:data:`UNSERVED_BECAUSE` and ``docs/vllm.md``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

from vlprune.errors import VlpruneError
from vlprune.vllm.settings import CONFIG_KEY

_TILES = "an image is a base view and tiles with line breaks, whose geometry the plugin does not hand the selection yet"
_DEEPSTACK = "its DeepStack planes would need the kept indices, and its positions are interleaved in five channels"

UNSERVED_BECAUSE = {"LLaVA-NeXT": _TILES, "LLaVA-OneVision": _TILES, "Qwen3-VL": _DEEPSTACK}
"""Each family the plugin refuses, and why."""


def unserved_error(family: str) -> VlpruneError:
    """The one-line refusal of a ``vlprune`` entry on ``family``."""
    return VlpruneError(
        f"vlprune's vLLM plugin does not prune {family} models yet ({UNSERVED_BECAUSE[family]}): remove the "
        f"{CONFIG_KEY!r} entry to serve the model unpruned, or prune it with vlprune's own engine (vlprune run, "
        f"vlprune.load)"
    )


class RefusesPruning:
    """Put before a vLLM model class: its ``__init__`` refuses a config with a ``vlprune`` entry (before any layer is
    built or weight loaded) and otherwise is the class's own."""

    vlprune_family: ClassVar[str] = ""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        if getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None) is not None:
            raise unserved_error(self.vlprune_family)
        super().__init__(vllm_config=vllm_config, prefix=prefix)


class VlpruneLlavaNextForConditionalGeneration(RefusesPruning, LlavaNextForConditionalGeneration):
    vlprune_family = "LLaVA-NeXT"


class VlpruneLlavaOnevisionForConditionalGeneration(RefusesPruning, LlavaOnevisionForConditionalGeneration):
    vlprune_family = "LLaVA-OneVision"


class VlpruneQwen3VLForConditionalGeneration(RefusesPruning, Qwen3VLForConditionalGeneration):
    vlprune_family = "Qwen3-VL"


class VlpruneQwen3VLMoeForConditionalGeneration(RefusesPruning, Qwen3VLMoeForConditionalGeneration):
    vlprune_family = "Qwen3-VL"
