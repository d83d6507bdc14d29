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

The vision encoder is read at its last block, a full-attention block run image by image: each image's attention map
among its patches, the attention each patch receives (HoloV's substitute for [CLS] in its Qwen2.5-VL code) and the
block's keys (post-RoPE, heads averaged: VisionZip's Qwen2.5-VL code), put back from Qwen2.5-VL's window order into
raster order and pooled over each merge group; the merger's input per token (its m x m patches concatenated), with
the merger as that token's projector (:class:`MergedTokenProjector`). FlowCut prunes inside the encoder
(:mod:`vlprune.engine.packed_vision`). Videos are visual tokens frame by frame; the encoder's video pass is read time
step by time step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vlprune.adapters.base import ModelAdapter, continuation_starts
from vlprune.adapters.registry import register_adapter
from vlprune.adapters.traits import AdapterTraits, VisionTower
from vlprune.errors import VlpruneError
from vlprune.geometry import (
    TOKEN_FIELDS,
    ImageTokens,
    VisualGeometry,
    batch_geometry,
    interleaved_geometry,
    single_view,
)
from vlprune.needs import Need


class MergedTokenProjector(nn.Module):
    """The merger as a projector of one language-model token's features: (..., m² · D) -> (..., D_text), the m x m
    patches of each token concatenated (the merger itself reads every m² consecutive patch rows as one token)."""

    def __init__(self, merger: nn.Module, patches: int) -> None:
        super().__init__()
        self.merger = merger
        self.patches = patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        leading, width = features.shape[:-1], features.shape[-1]
        merged = self.merger(features.reshape(-1, width // self.patches))
        return merged.view(*leading, merged.shape[-1])


class MultimodalRotary(nn.Module):
    """The language model's multimodal rotary embedding, taking (B, K) positions too: those number a token (p, p, p),
    as the model numbers text (transformers before 5.24 accepts only the (3, B, K) form)."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 2:
            positions = positions[None].expand(3, -1, -1)
        return self.rotary(hidden, positions)


@register_adapter("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
class Qwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` (or a bare ``Qwen2VLModel``)."""

    traits = AdapterTraits(
        family="qwen2-vl",
        tower=VisionTower.PACKED,  # pruned inside through vlprune.engine.packed_vision
        has_cls=False,
        drops_cls=False,
        encodes_videos=True,
        position_modes=("original",),
        geometry_inputs=("image_grid_thw", "video_grid_thw", "input_ids"),
        # Read at the last block, image by image: no [CLS], and no one square map per prompt image.
        vision_reads=frozenset(
            {Need.RECEIVED_ATTENTION, Need.EARLY_ATTENTION, Need.VISION_KEYS, Need.VISION_FEATURES, Need.CROP_MAPS}
        ),
    )

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base_model = model if isinstance(model, self.base_model_class()) else model.model
        self.config = model.config
        self.language_model = self.base_model.language_model
        self.decoder_layers = self.language_model.layers
        self.rotary_embedding = MultimodalRotary(self.language_model.rotary_emb)
        self.projector = self.base_model.visual.merger
        self._token_projector = MergedTokenProjector(self.projector, self.merge_size**2)
        self.image_token_id = int(self.config.image_token_id)
        self.video_token_id = int(self.config.video_token_id)
        self.check_language_model()

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import Qwen2VLModel

        return Qwen2VLModel

    @property
    def token_projector(self) -> nn.Module:
        return self._token_projector

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def continuation_position_ids(
        self, start: int, count: int, device: torch.device, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The three multimodal rows of tokens after the prompt: text positions shifted by each sample's
        ``rope_deltas``, which the model stored when it numbered the prompt (from each sample's real tokens: with
        ``prompt_mask``, the prompt's (B, start) attention mask, a left-padded sample continues from its own
        length)."""
        deltas = self.base_model.rope_deltas
        if deltas is None:
            raise RuntimeError(f"{self.family}: the prompt's rope_deltas are missing; prefill the prompt first")
        steps = torch.arange(count, device=device)[None]
        positions = continuation_starts(start, device, prompt_mask) + steps + deltas.to(device)
        return positions[None].expand(3, -1, -1)

    def prompt_position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return None  # the model numbers its prompts itself (get_rope_index)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at the image and the video placeholder tokens."""
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def visual_geometry(
        self, model_kwargs: dict[str, Any], per_sample: list[int], device: torch.device
    ) -> VisualGeometry:
        """One merged grid per image, (h / m) x (w / m) tokens in raster order, from ``image_grid_thw``; a video's
        tokens frame by frame (``frame``: the temporal patch), from ``video_grid_thw``. The model fills the image
        tokens and the video tokens of the batch, each in order, from its two streams of features, so the tokens of
        each sample take their places from the prompt (``input_ids``; Qwen3-VL puts text between a video's frames)."""
        image_grids, video_grids = model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")
        if image_grids is None and video_grids is None:
            raise VlpruneError(
                f"the {self.family} model encoded no image_grid_thw or video_grid_thw for this prefill: pass "
                "pixel_values (or pixel_values_videos) with the processor's grids"
            )
        images = [self._frames(grid, video=False) for grid in ([] if image_grids is None else image_grids.tolist())]
        if video_grids is None:
            try:
                return batch_geometry(images, per_sample, device)
            except ValueError as error:
                raise VlpruneError(
                    f"{self.family}: {error}; were the prompts and pixel values made together?"
                ) from None
        videos = [self._frames(grid, video=True) for grid in video_grids.tolist()]
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            raise VlpruneError(f"{self.family}: placing video tokens needs the prompts' input_ids")
        try:
            return interleaved_geometry(images, videos, input_ids, self.image_token_id, self.video_token_id, device)
        except ValueError as error:
            raise VlpruneError(f"{self.family}: {error}; were the prompts and pixels made together?") from None

    def _frames(self, grid: list[int], video: bool) -> ImageTokens:
        frames, height, width = grid
        merge = self.merge_size
        if frames != 1 and not video:
            raise VlpruneError(f"{self.family}: an image of {frames} temporal patches is not supported")
        one = single_view(height // merge, width // merge)
        if frames == 1 and not video:
            return one
        fields = {name: getattr(one, name).repeat(frames) for name in TOKEN_FIELDS}
        fields["frame"] = torch.arange(frames).repeat_interleave(len(one))
        fields["crop"] = fields["frame"].clone()  # the encoder attends temporal patch by temporal patch
        return ImageTokens(**fields, num_crops=frames)

    def vision_feature_attention(self) -> nn.Module:
        """The last vision block's attention, whose output the merger reads (a full-attention block, image by image)."""
        return self.base_model.visual.blocks[-1].attn

    def received_tokens(self, chunks: list[torch.Tensor], image_inputs: dict[str, Any]) -> torch.Tensor:
        """Per chunk (an image, or a temporal patch of a video), the attention received by each patch pooled over its
        merge group (the mean of the m x m patches that become one token, as HoloV's Qwen2.5-VL code does), in the
        raster order of the merged grid: (chunks, T, 1), zero-padded to the largest chunk."""
        return self.pooled_tokens([chunk[:, None] for chunk in chunks], image_inputs)

    def pooled_tokens(self, chunks: list[torch.Tensor], image_inputs: dict[str, Any]) -> torch.Tensor:
        """(chunks, T, F) per-patch values (n, F) of each chunk, in the tower's processing order, as the mean over
        each merge group in the raster order of the merged grid, zero-padded to the largest chunk."""
        grids = chunk_grids(image_inputs)
        if len(grids) != len(chunks):
            raise RuntimeError(f"{self.family}: the vision values of {len(chunks)} chunks do not match the grids")
        unit = self.merge_size**2
        pooled = [
            self.raster_order(chunk.float().view(-1, unit, chunk.shape[-1]).mean(dim=1), grid)
            for chunk, grid in zip(chunks, grids, strict=True)
        ]
        width = max(len(tokens) for tokens in pooled)
        return torch.stack([torch.nn.functional.pad(tokens, (0, 0, 0, width - len(tokens))) for tokens in pooled])

    def pack_crop_values(
        self, values: torch.Tensor, model_kwargs: dict[str, Any], geometry: VisualGeometry, fill: float
    ) -> torch.Tensor:
        """(B, N0) per-patch values of each chunk (chunks, P, padded to the largest) as one value per
        language-model token: the mean over its merge group, in raster order."""
        grids = chunk_grids(model_kwargs)
        if len(grids) != values.shape[0]:
            raise RuntimeError(f"{self.family}: per-chunk values for {values.shape[0]} chunks do not match the grids")
        chunks = [row[: int(count)] for row, count in zip(values, grids.prod(dim=-1), strict=True)]
        return geometry.crop_values(self.received_tokens(chunks, model_kwargs).to(values.dtype), fill)[..., 0]

    def feature_tokens(self, features: torch.Tensor, image_inputs: dict[str, Any]) -> torch.Tensor:
        """(chunks, T, m² · D) each language-model token's merger input (its m x m patches concatenated), in raster
        order, from the merger's input (patches, D) of the packed images (and videos' temporal patches)."""
        grids = chunk_grids(image_inputs)
        if int(grids.prod(dim=-1).sum()) != features.shape[0]:
            raise RuntimeError(f"{self.family}: the merger's input does not match the recorded image grids")
        unit = self.merge_size**2
        per_chunk = features.split(grids.prod(dim=-1).tolist())
        tokens = [
            self.raster_order(chunk.reshape(-1, unit * features.shape[-1]), grid)
            for chunk, grid in zip(per_chunk, grids, strict=True)
        ]
        width = max(len(rows) for rows in tokens)
        return torch.stack([torch.nn.functional.pad(rows, (0, 0, 0, width - len(rows))) for rows in tokens])

    def vision_feature_layer_index(self) -> int:
        """The merger reads the last block's output: numbered as the layer after the last block."""
        return len(self.vision_layers)

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.base_model.visual.blocks

    @property
    def vision_tower(self) -> nn.Module:
        return self.base_model.visual

    def vision_full_attention_layers(self) -> tuple[int, ...]:
        """Qwen2.5-VL's full-attention blocks (the others attend within windows); every block elsewhere."""
        full = getattr(self.base_model.visual, "fullatt_block_indexes", None)
        return tuple(full) if full else tuple(range(len(self.vision_layers)))

    def attention_implementations(self) -> set[str]:
        return {self.config.text_config._attn_implementation, self.config.vision_config._attn_implementation}


@register_adapter("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 (the transformers class's spelling)
    """``Qwen2_5_VLForConditionalGeneration`` (or a bare ``Qwen2_5_VLModel``): Qwen2-VL's layout with a windowed
    vision encoder, which the language-model side does not see."""

    traits = replace(Qwen2VLAdapter.traits, family="qwen2.5-vl")

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import Qwen2_5_VLModel

        return Qwen2_5_VLModel

    def vision_feature_attention(self) -> nn.Module:
        visual = self.base_model.visual
        last = len(visual.blocks) - 1
        if last not in visual.fullatt_block_indexes:
            raise VlpruneError(
                f"{self.family}: the last vision block ({last}) attends within windows (full-attention blocks: "
                f"{list(visual.fullatt_block_indexes)}); the received attention is read from a full-attention block"
            )
        return visual.blocks[last].attn

    def raster_order(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Merged tokens in the windowed encoder's order put back in raster order."""
        window_index, _ = self.window_index(grid[None].to(tokens.device))
        return tokens[torch.argsort(window_index.to(tokens.device))]

    def window_index(self, grids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The encoder's window permutation of the merged tokens and its window bounds in patches, from the model's
        own function (transformers 5.24's ``vision_utils.get_vision_window_index``, or the encoder's
        ``get_window_index`` method of earlier versions)."""
        visual = self.base_model.visual
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:
            return visual.get_window_index(grids)
        return get_vision_window_index(grids, visual.spatial_merge_size, visual.window_size, visual.patch_size)


@register_adapter("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """``Qwen3VLForConditionalGeneration`` (or a bare ``Qwen3VLModel``), with DeepStack."""

    traits = replace(Qwen2VLAdapter.traits, family="qwen3-vl", deepstack=True)

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import Qwen3VLModel

        return Qwen3VLModel


def chunk_grids(inputs: dict[str, Any]) -> torch.Tensor:
    """(chunks, 3) the (1, h, w) grid of every chunk the encoder attends over: the bridge's list of the prefill's
    images and videos' temporal patches, or the images' grids alone."""
    grids = inputs.get("chunk_grids")
    if grids is not None:
        return grids
    images = inputs.get("image_grid_thw")
    if images is None:
        raise RuntimeError("no image grids were recorded for this prefill")
    return torch.tensor([[1, h, w] for t, h, w in images.tolist() for _ in range(t)], dtype=torch.long)
