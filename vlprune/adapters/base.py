"""What every model adapter provides: where a VLM keeps its vision tower, projector, decoder layers and image tokens,
the language model's sizes, and where each visual token came from (:mod:`vlprune.geometry`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlprune.adapters.traits import AdapterTraits
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens

SUPPORTED_ATTENTION = ("sdpa", "eager")


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


class _FromTraits:
    """An adapter attribute read from its traits, on the class and on an instance alike: the names users read before
    the traits existed (``adapter.family``, ``adapter.vision_has_cls``, ...); vlprune itself reads ``traits``."""

    def __init__(self, trait: str) -> None:
        self.trait = trait

    def __get__(self, adapter: object, owner: type) -> Any:
        return getattr((owner if adapter is None else adapter).traits, self.trait)


class ModelAdapter:
    """The small core interface every per-family adapter fills in (its ``__init__`` finds the modules).

    Attributes:
        traits: what the family is (:class:`~vlprune.adapters.traits.AdapterTraits`); a class declares its family's
            usual traits, an instance may refine them for its model (a LLaVA with a SigLIP tower has no [CLS]).
        model, config, base_model, language_model, decoder_layers, rotary_embedding, projector: the model's parts
            (``base_model``: the module whose forward receives input_ids and runs vision + language model;
            ``projector``: vision features -> language-model embeddings).
        image_token_id: the image placeholder token.

    ``family``, ``multi_crop``, ``geometry_inputs``, ``position_modes``, ``reads_vision_tower``, ``vision_chunked``,
    ``encodes_videos``, ``deepstack``, ``vision_has_cls`` and ``vision_drops_cls`` read the traits.
    """

    traits: AdapterTraits
    model: nn.Module
    config: Any
    base_model: nn.Module
    language_model: nn.Module
    decoder_layers: nn.ModuleList
    rotary_embedding: nn.Module
    projector: nn.Module
    image_token_id: int

    family = _FromTraits("family")
    multi_crop = _FromTraits("multi_crop")
    geometry_inputs = _FromTraits("geometry_inputs")
    position_modes = _FromTraits("position_modes")
    reads_vision_tower = _FromTraits("prunes_in_vision")
    vision_chunked = _FromTraits("packed_tower")
    encodes_videos = _FromTraits("encodes_videos")
    deepstack = _FromTraits("deepstack")
    vision_has_cls = _FromTraits("has_cls")
    vision_drops_cls = _FromTraits("drops_cls")

    # ------------------------------------------------------------------ the vision tower

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder module (hooks on it see every encoding)."""
        raise NotImplementedError

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers (blocks), in order."""
        raise NotImplementedError

    def vision_attention(self, index: int) -> nn.Module:
        """The module of vision encoder layer ``index`` that calls the attention function."""
        return innermost_attention(self.vision_layers[index])

    def vision_full_attention_layers(self) -> tuple[int, ...]:
        """The vision encoder layers whose attention spans each whole crop (every layer, unless the encoder attends
        within windows in some of them, as Qwen2.5-VL's does)."""
        return tuple(range(len(self.vision_layers)))

    @property
    def merge_size(self) -> int:
        """Patches merged into one language-model token along each side (1 where none are merged)."""
        return 1

    def raster_order(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Per-token values of one chunk (image or video time step) of grid ``grid`` = (t, h, w), in the order a
        packed tower processed them, put back in the raster order of the merged grid (the identity by default)."""
        return tokens

    def window_index(self, grids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A windowed packed tower's permutation of the merged tokens and its window bounds in patches (Qwen2.5-VL)."""
        raise NotImplementedError

    @property
    def token_projector(self) -> nn.Module:
        """The projector as a function of one visual token's features (what stages receive as ``projector``)."""
        return self.projector

    def feature_tokens(self, features: torch.Tensor, image_inputs: dict[str, Any]) -> torch.Tensor:
        """(crops, T, F) per-token projector inputs from what the projector received, for a chunked tower."""
        raise NotImplementedError

    def continuation_position_ids(
        self, start: int, count: int, device: torch.device, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Position ids (B, count) of ``count`` tokens fed through the cache after a prompt of ``start`` tokens, as
        ``generate`` would number them; ``prompt_mask`` (B, start), the prompt's attention mask, makes each
        left-padded sample continue from its own real length (without it: a batch of one, or of unpadded prompts)."""
        return continuation_starts(start, device, prompt_mask) + torch.arange(count, device=device)[None]

    def prompt_position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The position ids ``generate`` gives a left-padded prompt (real tokens 0, 1, ...), or None where the model
        numbers its prompts itself."""
        positions = attention_mask.long().cumsum(dim=-1) - 1
        return positions.masked_fill(attention_mask == 0, 1)

    def check_call(self, model_kwargs: dict[str, Any]) -> None:
        """Refuse a model call this family cannot prune (raises VlpruneError): by default a call that carries a video
        when the family's videos are not visual tokens to vlprune (``encodes_videos``), as their tokens would pass
        unpruned and uncounted."""
        if not self.traits.encodes_videos and carries_video(model_kwargs):
            raise VlpruneError(
                f"this prompt has a video, and vlprune does not prune the videos of {self.family} (their tokens would "
                "pass unpruned and uncounted); prompt with images only, run the video without vlprune attached, or "
                "use a Qwen-VL model, whose videos vlprune prunes"
            )

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at the image placeholder tokens."""
        return input_ids == self.image_token_id

    def visual_geometry(
        self, model_kwargs: dict[str, Any], per_sample: list[int], device: torch.device
    ) -> VisualGeometry:
        """Where each visual token of a prefill came from, from the model call's keyword arguments (``pixel_values``,
        ``image_sizes``, ...) and the visual tokens per sample."""
        raise NotImplementedError

    def image_views(self, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        """(visual tokens, crops) of every image of a prefill, in the order the vision tower encodes them, from the
        recorded image inputs (multi-crop families)."""
        raise NotImplementedError

    def pack_crop_values(
        self, values: torch.Tensor, model_kwargs: dict[str, Any], geometry: VisualGeometry, fill: float
    ) -> torch.Tensor:
        """(B, N0) per-crop patch values (crops, P) placed on the visual tokens as the model packs its features;
        ``fill`` at line breaks and padding. A family that places every patch as one token needs only the geometry."""
        return geometry.crop_values(values[..., None], fill)[..., 0]

    def received_tokens(self, chunks: list[torch.Tensor], image_inputs: dict[str, Any]) -> torch.Tensor:
        """(images, T, 1) attention each language-model token of each image receives, from the per-image attention
        received by its patches (``chunks``: one (n_i,) tensor per image, in the tower's order), for a chunked tower."""
        raise NotImplementedError

    def pooled_tokens(self, chunks: list[torch.Tensor], image_inputs: dict[str, Any]) -> torch.Tensor:
        """(images, T, F) per-token values from per-patch values (``chunks``: one (n_i, F) tensor per image, in the
        tower's order), for a chunked tower."""
        raise NotImplementedError

    def vision_feature_attention(self) -> nn.Module:
        """The vision attention module whose layer produces the features that reach the projector."""
        raise NotImplementedError

    def vision_feature_layer_index(self) -> int:
        raise NotImplementedError

    def attention_implementations(self) -> set[str]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the Llama/Qwen2-style decoder every family has

    def check_language_model(self) -> None:
        """Refuse a language model whose layers vlprune cannot mask (sliding windows) or address by index."""
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


def carries_video(model_kwargs: dict[str, Any]) -> bool:
    """Whether a model call carries a video: its pixels, or its features that ``generate`` encoded before the call."""
    encoded = model_kwargs.get("mm_encoder_outputs") or {}
    return model_kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None


def vision_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer layers: the ModuleList as long as the config's layer count."""
    count = tower.config.num_hidden_layers
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise VlpruneError(f"cannot find the {count} encoder layers of vision tower {type(tower).__name__}")


def innermost_attention(layer: nn.Module) -> nn.Module:
    """The module of an encoder layer that calls the attention function: the deepest one named '*Attention'."""
    candidates = [m for m in layer.modules() if "Attention" in type(m).__name__]
    innermost = [m for m in candidates if not any("Attention" in type(c).__name__ for c in m.children())]
    if len(innermost) != 1:
        raise VlpruneError(f"cannot find the attention module of vision layer {type(layer).__name__}")
    return innermost[0]


def continuation_starts(start: int, device: torch.device, prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, 1) the first position after each sample's prompt: its real tokens (``prompt_mask``, (B, start)), or
    ``start`` ((1, 1)) without a mask."""
    if prompt_mask is None:
        return torch.tensor([[start]], device=device)
    if prompt_mask.dim() != 2 or prompt_mask.shape[1] != start:
        raise VlpruneError(
            f"prompt_mask must be (batch, {start}), the prompt's attention mask; got {tuple(prompt_mask.shape)}"
        )
    return prompt_mask.to(device).long().sum(1, keepdim=True)
