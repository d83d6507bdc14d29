"""The Qwen-VL family: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` (dynamic resolution, 2 x 2 patch merging, multimodal RoPE; Qwen3-VL adds
DeepStack).

Each image of ``image_grid_thw`` = (t, h, w) patches becomes t · (h / m) · (w / m) language-model tokens (m the
``spatial_merge_size``), in raster order of the merged grid. Their positions are multimodal: ``get_rope_index``
numbers each token (temporal, height, width), the text after an image resumes after the image's largest extent, and
decoding continues from a cached ``rope_deltas``. The decoder layers receive the cos/sin of those positions, so the
engine keeps each kept token's own (t, h, w) rotation by gathering them ("original" positions, the only mode here),
and the model's own decode positions, computed from the unpruned prompt, stay consistent with it.

Qwen3-VL adds the features of some vision layers to the visual positions after the first decoder layers
(``_deepstack_process``); the engine shortens those planes with the same kept indices (see
:mod:`vlprune.engine.deepstack`).

Not yet: pruning inside or reading from the vision encoder (windowed attention, the merge groups), and videos.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from vlprune.adapters.base import LanguageModelShape, ModelAdapter
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry, batch_geometry, single_view
from vlprune.kernels import gather_tokens


class Qwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` (or a bare ``Qwen2VLModel``)."""

    family = "qwen2-vl"
    geometry_inputs = ("image_grid_thw",)
    position_modes = ("original",)
    reads_vision_tower = False
    deepstack = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base_model = model if isinstance(model, self.base_model_class()) else model.model
        self.config = model.config
        self.language_model = self.base_model.language_model
        self.decoder_layers = self.language_model.layers
        self.rotary_embedding = self.language_model.rotary_emb
        self.projector = self.base_model.visual.merger
        self.image_token_id = int(self.config.image_token_id)
        self.vision_has_cls = False
        self.vision_drops_cls = False
        text = self.config.text_config
        windowed = sorted({kind for kind in (getattr(text, "layer_types", None) or []) if kind != "full_attention"})
        if windowed:
            raise VlpruneError(
                f"language model layers of type {windowed} are not supported; vlprune builds full causal masks only"
            )

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import Qwen2VLModel

        return Qwen2VLModel

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def check_call(self, model_kwargs: dict[str, Any]) -> None:
        if model_kwargs.get("pixel_values_videos") is not None:
            raise VlpruneError(
                f"{self.family}: pruning prompts with videos is not implemented yet; pass images (pixel_values)"
            )

    def visual_geometry(
        self, model_kwargs: dict[str, Any], per_sample: list[int], device: torch.device
    ) -> VisualGeometry:
        """One merged grid per image, (h / m) x (w / m) tokens in raster order, from ``image_grid_thw``."""
        grids = model_kwargs.get("image_grid_thw")
        if grids is None:
            raise VlpruneError(
                f"the {self.family} model encoded no image_grid_thw for this prefill: pass pixel_values with the "
                "processor's image_grid_thw"
            )
        merge = self.merge_size
        images = []
        for frames, height, width in grids.tolist():
            if frames != 1:
                raise VlpruneError(f"{self.family}: an image of {frames} temporal patches is not supported")
            images.append(single_view(height // merge, width // merge))
        try:
            return batch_geometry(images, per_sample, device)
        except ValueError as error:
            raise VlpruneError(f"{self.family}: {error}; were the prompts and pixel values made together?") from None

    def vision_feature_attention(self) -> nn.Module:
        raise VlpruneError(f"reading the vision encoder is not implemented for {self.family} yet")

    def vision_feature_layer_index(self) -> int:
        raise VlpruneError(f"pruning inside the vision encoder is not implemented for {self.family} yet")

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.base_model.visual.blocks

    @property
    def vision_tower(self) -> nn.Module:
        return self.base_model.visual

    def query_key(
        self,
        index: int,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE queries of ``rows`` (B, R) and keys of every token that decoder layer ``index`` would compute
        from its input ``hidden`` (B, L, D), with the layer's multimodal cos/sin. Returns (B, H, R, d), (B, Hkv, L, d).
        """
        layer = self.decoder_layers[index]
        attention = layer.self_attn
        module = sys.modules[type(attention).__module__]
        normed = layer.input_layernorm(hidden)
        batch, length = hidden.shape[:2]
        picked = gather_tokens(normed, rows)
        query = attention.q_proj(picked).view(batch, rows.shape[1], -1, attention.head_dim).transpose(1, 2)
        key = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Qwen3-style per-head norms before RoPE
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = position_embeddings
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        query, _ = module.apply_rotary_pos_emb(query, query, gather_tokens(cos, rows), gather_tokens(sin, rows))
        key, _ = module.apply_rotary_pos_emb(key, key, cos, sin)
        return query, key

    def language_model_shape(self) -> LanguageModelShape:
        text = self.config.text_config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return LanguageModelShape(
            num_layers=len(self.decoder_layers),
            hidden_size=text.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            gated_mlp=hasattr(self.decoder_layers[0].mlp, "gate_proj"),
        )

    def attention_implementations(self) -> set[str]:
        return {self.config.text_config._attn_implementation}


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 (the transformers class's spelling)
    """``Qwen2_5_VLForConditionalGeneration`` (or a bare ``Qwen2_5_VLModel``): Qwen2-VL's layout with a windowed
    vision encoder, which the language-model side does not see."""

    family = "qwen2.5-vl"

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import Qwen2_5_VLModel

        return Qwen2_5_VLModel


class Qwen3VLAdapter(Qwen2VLAdapter):
    """``Qwen3VLForConditionalGeneration`` (or a bare ``Qwen3VLModel``), with DeepStack."""

    family = "qwen3-vl"
    deepstack = True

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import Qwen3VLModel

        return Qwen3VLModel
