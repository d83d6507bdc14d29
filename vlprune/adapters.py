"""Model adapters: where a VLM family keeps its vision tower, projector, decoder layers and image tokens.

The engine and the pruners only talk to a :class:`ModelAdapter`, so supporting another family (LLaVA-NeXT, Qwen2-VL)
means adding an adapter here, not touching the pruners.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from vlprune.errors import VlpruneError
from vlprune.kernels import gather_tokens

SUPPORTED_ATTENTION = ("sdpa", "eager")

# Vision towers that put a [CLS] token first. SigLIP has none.
_TOWERS_WITH_CLS = {"clip_vision_model": True, "dinov2": True, "siglip_vision_model": False}


@dataclass(frozen=True)
class LanguageModelShape:
    """The sizes the statistics need (FLOPs, KV-cache bytes)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool


class ModelAdapter:
    """Base of the per-family adapters. Subclasses fill in the attributes in ``__init__``."""

    model: nn.Module
    base_model: nn.Module  # the module whose forward receives input_ids and runs vision + language model
    language_model: nn.Module
    decoder_layers: nn.ModuleList
    rotary_embedding: nn.Module
    projector: nn.Module  # vision features -> language-model embeddings
    image_token_id: int
    vision_has_cls: bool
    vision_drops_cls: bool  # whether the [CLS] output is dropped before the projector

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at the image placeholder tokens."""
        return input_ids == self.image_token_id

    def vision_feature_attention(self) -> nn.Module:
        """The vision attention module whose layer produces the features that reach the projector."""
        raise NotImplementedError

    def vision_feature_layer_index(self) -> int:
        raise NotImplementedError

    def language_model_shape(self) -> LanguageModelShape:
        raise NotImplementedError

    def attention_implementations(self) -> set[str]:
        raise NotImplementedError


class LlavaAdapter(ModelAdapter):
    """``LlavaForConditionalGeneration`` (or a bare ``LlavaModel``) with a CLIP, SigLIP or DINOv2 tower and a
    Llama/Qwen2-style decoder, with or without grouped-query attention."""

    def __init__(self, model: nn.Module) -> None:
        from transformers import LlavaModel

        self.model = model
        self.base_model = model if isinstance(model, LlavaModel) else model.model
        self.config = model.config
        self.language_model = self.base_model.language_model
        self.decoder_layers = self.language_model.layers
        self.rotary_embedding = self.language_model.rotary_emb
        self.projector = self.base_model.multi_modal_projector
        self.image_token_id = int(self.config.image_token_id)
        vision_type = self.config.vision_config.model_type
        if vision_type not in _TOWERS_WITH_CLS:
            raise VlpruneError(
                f"vision tower {vision_type!r} is not supported; supported towers: {', '.join(_TOWERS_WITH_CLS)}"
            )
        self.vision_has_cls = _TOWERS_WITH_CLS[vision_type]
        self.vision_drops_cls = self.vision_has_cls and self.config.vision_feature_select_strategy == "default"
        self._check_language_model()

    def _check_language_model(self) -> None:
        text = self.config.text_config
        layer_types = getattr(text, "layer_types", None) or []
        windowed = sorted({kind for kind in layer_types if kind != "full_attention"})
        if windowed:
            raise VlpruneError(
                f"language model layers of type {windowed} are not supported; vlprune builds full causal masks only"
            )
        for index, layer in enumerate(self.decoder_layers):
            if getattr(layer.self_attn, "layer_idx", index) != index:
                raise VlpruneError(f"decoder layer {index} reports layer_idx={layer.self_attn.layer_idx}")

    @property
    def vision_layers(self) -> nn.ModuleList:
        return _vision_encoder_layers(self.base_model.vision_tower)

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

    def vision_attention(self, index: int) -> nn.Module:
        """The module of vision encoder layer ``index`` that calls the attention function."""
        return _innermost_attention(self.vision_layers[index])

    def vision_feature_attention(self) -> nn.Module:
        """The vision attention module whose layer produces the features that reach the projector."""
        return self.vision_attention(self.vision_feature_layer_index())

    def query_key(
        self,
        index: int,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE queries of ``rows`` and keys of every token that decoder layer ``index`` would compute from its
        input ``hidden`` (B, L, D), without running the layer. rows: (B, R). Returns (B, H, R, d) and (B, Hkv, L, d).
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
        mlp = self.decoder_layers[0].mlp
        return LanguageModelShape(
            num_layers=len(self.decoder_layers),
            hidden_size=text.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            gated_mlp=hasattr(mlp, "gate_proj"),
        )

    def attention_implementations(self) -> set[str]:
        return {self.config.text_config._attn_implementation, self.config.vision_config._attn_implementation}


def _vision_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer layers: the ModuleList as long as the config's layer count."""
    count = tower.config.num_hidden_layers
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise VlpruneError(f"cannot find the {count} encoder layers of vision tower {type(tower).__name__}")


def _innermost_attention(layer: nn.Module) -> nn.Module:
    """The module of an encoder layer that calls the attention function: the deepest one named '*Attention'."""
    candidates = [m for m in layer.modules() if "Attention" in type(m).__name__]
    innermost = [m for m in candidates if not any("Attention" in type(c).__name__ for c in m.children())]
    if len(innermost) != 1:
        raise VlpruneError(f"cannot find the attention module of vision layer {type(layer).__name__}")
    return innermost[0]


def adapter_for(model: object) -> ModelAdapter:
    """The adapter of a supported model.

    Raises:
        VlpruneError: the model family is not supported, or its attention implementation is not.
    """
    from transformers import LlavaForConditionalGeneration, LlavaModel

    if not isinstance(model, LlavaForConditionalGeneration | LlavaModel):
        raise VlpruneError(
            f"unsupported model family {type(model).__name__}; vlprune supports LlavaForConditionalGeneration"
        )
    adapter = LlavaAdapter(model)
    unsupported = sorted(adapter.attention_implementations() - set(SUPPORTED_ATTENTION))
    if unsupported:
        raise VlpruneError(
            f"attn_implementation {unsupported} is not supported yet; load the model with one of {SUPPORTED_ATTENTION}"
        )
    return adapter
