"""LLaVA-1.5 (``LlavaForConditionalGeneration``) served pruned: vLLM's model class with its images' tokens selected
after the projector.

vLLM's LLaVA numbers the prompt's tokens contiguously, so the kept tokens are numbered 0..K-1 after the text before
them, as the pre-LLM references do (the HF engine's "reindex" positions), in the method's own order where its
reference keeps one (HoloV). The [CLS] attention, the attention each patch receives and the keys are read at the
tower's feature layer: vLLM builds the CLIP or SigLIP tower only up to that layer, so it is the tower's last.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlprune.adapters.llava import LlavaAdapter
from vlprune.needs import Need
from vlprune.pruners.zoo_prune import LinearActLinear
from vlprune.vllm.image_pruning import PrunesImages, image_pruning_for
from vlprune.vllm.processing import PrunedImagePlaceholders
from vlprune.vllm.settings import REQUEST_KEY
from vlprune.vllm.tower_reads import TowerRecorder, patch_tower_reads


class VlpruneLlavaProcessor(PrunedImagePlaceholders, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor with each image's placeholders cut to its budget."""

    vlprune_traits = staticmethod(LlavaAdapter.traits_for_config)


def build_processor(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
    """The pruning processor for LLaVA-1.5; vLLM's own for the Pixtral-based LLaVA models, which are not served."""
    from vllm.model_executor.models.llava import LlavaProcessingInfo

    if isinstance(info, LlavaProcessingInfo):
        return VlpruneLlavaProcessor(info, dummy_inputs, **kwargs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)


class LlavaProjector(nn.Module):
    """vLLM's LLaVA projector (``linear_2(act(linear_1(x)))``, whose linear layers return pairs) as a plain module that
    also gives its pieces, so that ZOO-Prune takes the same exact shortcut as on transformers' projector.

    vLLM's CPU build packs linear weights for its GEMM kernels after loading and leaves the layers' ``weight`` empty;
    ``pieces`` are then the copies taken at loading (:func:`projector_pieces`)."""

    def __init__(self, projector: nn.Module, pieces: LinearActLinear | None = None) -> None:
        super().__init__()
        self.projector = projector
        self.pieces = pieces

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def linear_act_linear(self) -> LinearActLinear | None:
        """The pieces, or None where the weights are packed and were not copied (ZOO-Prune's generic path)."""
        return self.pieces if self.pieces is not None else projector_pieces(self.projector, copy=False)


def projector_pieces(projector: nn.Module, *, copy: bool = True) -> LinearActLinear | None:
    """The pieces of vLLM's LLaVA projector while its layers hold plain (out, in) weights, else None."""
    first, second = projector.linear_1, projector.linear_2
    if first.weight.ndim != 2 or second.weight.ndim != 2:
        return None
    keep = (lambda tensor: tensor.detach().clone()) if copy else (lambda tensor: tensor)
    bias = None if first.bias is None else keep(first.bias)
    return LinearActLinear(keep(first.weight), bias, projector.act, keep(second.weight))


@MULTIMODAL_REGISTRY.register_processor(
    build_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder
)
class VlpruneLlavaForConditionalGeneration(PrunesImages, LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration``, pruning each image's tokens when the config has a ``vlprune`` entry."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        # Checked before the layers are built, so that a bad setting fails before any weight loads.
        pruning = image_pruning_for(
            config, LlavaAdapter.traits_for_config(config), config.vision_config.model_type, reindexed=True
        )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlprune_start(pruning)

    vlprune_projector_pieces: LinearActLinear | None = None

    def load_weights(self, weights: Any) -> set[str]:
        loaded = super().load_weights(weights)
        # Copied now (for ZOO-Prune, whichever method is served: vlprune_serve may switch to it): on the CPU, vLLM
        # packs the projector's weights after loading and empties the layers' own. A few MB: the projector's size.
        if self.vlprune is not None:
            self.vlprune_projector_pieces = projector_pieces(self.multi_modal_projector)
        return loaded

    def _vlprune_recorder_for(self, needs: frozenset[Need]) -> TowerRecorder:
        attention = None
        if needs - {Need.VISION_FEATURES}:
            attention = self.vision_tower.vision_model.encoder.layers[-1].self_attn.attn
        projector = self.multi_modal_projector if Need.VISION_FEATURES in needs else None
        return TowerRecorder(attention, projector, heads=self.config.vision_config.num_attention_heads)

    def embed_multimodal(self, **kwargs: object) -> Any:
        encoded = kwargs.pop(REQUEST_KEY, None)
        if self.vlprune is None:
            return super().embed_multimodal(**kwargs)
        with self.vlprune_recorder.recording() as recording:
            embeddings = super().embed_multimodal(**kwargs)
        if not isinstance(embeddings, torch.Tensor):  # no images, or images of several sizes
            if len(embeddings) == 0:
                return embeddings
            embeddings = torch.stack(list(embeddings))
        projector = LlavaProjector(self.multi_modal_projector, self.vlprune_projector_pieces)
        reads = patch_tower_reads(recording, embeddings, self.vlprune.needs, self.vlprune.traits.drops_cls, projector)
        kept = self.vlprune.prune(reads, self.vlprune.budgets(encoded, len(reads)))
        return tuple(tokens.embeddings for tokens in kept)
