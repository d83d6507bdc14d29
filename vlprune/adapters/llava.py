"""LLaVA-1.5: ``LlavaForConditionalGeneration`` (or a bare ``LlavaModel``), one square patch grid per image."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vlprune.adapters.base import ModelAdapter, vision_encoder_layers
from vlprune.adapters.registry import register_adapter
from vlprune.adapters.traits import AdapterTraits
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry, batch_geometry, single_view

# Vision towers that put a [CLS] token first. SigLIP has none.
_TOWERS_WITH_CLS = {"clip_vision_model": True, "dinov2": True, "siglip_vision_model": False}


@register_adapter("LlavaForConditionalGeneration", "LlavaModel")
class LlavaAdapter(ModelAdapter):
    """``LlavaForConditionalGeneration`` (or a bare ``LlavaModel``) with a CLIP, SigLIP or DINOv2 tower and a
    Llama/Qwen2-style decoder, with or without grouped-query attention."""

    traits = AdapterTraits(family="llava", geometry_inputs=("pixel_values",))

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base_model = model if isinstance(model, self.base_model_class()) else model.model
        self.config = model.config
        self.language_model = self.base_model.language_model
        self.decoder_layers = self.language_model.layers
        self.rotary_embedding = self.language_model.rotary_emb
        self.projector = self.base_model.multi_modal_projector
        self.image_token_id = int(self.config.image_token_id)
        self.traits = self.traits_for_config(self.config)
        self.check_language_model()

    @classmethod
    def traits_for_config(cls, config: object) -> AdapterTraits:
        """The family's traits for a model with this config: whether its tower has a [CLS] token, and whether the
        model drops it before the projector (the "default" feature strategy).

        Raises:
            VlpruneError: a vision tower vlprune does not read.
        """
        vision_type = config.vision_config.model_type
        if vision_type not in _TOWERS_WITH_CLS:
            raise VlpruneError(
                f"vision tower {vision_type!r} is not supported; supported towers: {', '.join(_TOWERS_WITH_CLS)}"
            )
        has_cls = _TOWERS_WITH_CLS[vision_type]
        drops_cls = has_cls and config.vision_feature_select_strategy == "default"
        return replace(cls.traits, has_cls=has_cls, drops_cls=drops_cls)

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import LlavaModel

        return LlavaModel

    def visual_geometry(
        self, model_kwargs: dict[str, Any], per_sample: list[int], device: torch.device
    ) -> VisualGeometry:
        """One patch grid per image, after the [CLS] token when the "full" strategy keeps it. The grid is the pixel
        values' height and width over the patch size (a tower such as DINOv2 runs at the processor's size, not its
        config's); without the pixel values, one square grid per sample."""
        pixels = model_kwargs.get("pixel_values")
        leading_cls = self.traits.has_cls and not self.traits.drops_cls
        total = sum(per_sample)
        if pixels is not None:
            patch = self.config.vision_config.patch_size
            image = single_view(pixels.shape[-2] // patch, pixels.shape[-1] // patch, leading_cls=leading_cls)
            if total % len(image):
                raise VlpruneError(
                    f"the prompts hold {total} visual tokens, not a multiple of the {len(image)} of one image"
                )
            return batch_geometry([image] * (total // len(image)), per_sample, device)
        images = []
        for count in per_sample:
            side = math.isqrt(count - leading_cls)
            square = side * side == count - leading_cls
            images.append(
                single_view(side, side, leading_cls) if square else single_view(1, count - leading_cls, leading_cls)
            )
        return batch_geometry(images, per_sample, device)

    @property
    def vision_layers(self) -> nn.ModuleList:
        return vision_encoder_layers(self.base_model.vision_tower)

    @property
    def vision_tower(self) -> nn.Module:
        return self.base_model.vision_tower

    def vision_feature_layer_index(self) -> int:
        """Index of the encoder layer whose output the projector reads (the deepest one when several are read)."""
        feature_layer = self.config.vision_feature_layer
        if isinstance(feature_layer, list | tuple):
            # Several feature layers are concatenated; the deepest one carries the [CLS] attention FasterVLM reads.
            feature_layer = max(feature_layer, key=lambda v: v if v >= 0 else v + 10_000)
        count = len(self.vision_layers)
        hidden_index = feature_layer if feature_layer >= 0 else count + 1 + feature_layer
        if not 1 <= hidden_index <= count:
            raise VlpruneError(
                f"vision_feature_layer={feature_layer} selects the patch embeddings, which have no attention"
            )
        return hidden_index - 1

    def vision_feature_attention(self) -> nn.Module:
        """The vision attention module whose layer produces the features that reach the projector."""
        return self.vision_attention(self.vision_feature_layer_index())

    def attention_implementations(self) -> set[str]:
        return {self.config.text_config._attn_implementation, self.config.vision_config._attn_implementation}
