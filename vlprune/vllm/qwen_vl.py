"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``) served
pruned: vLLM's model classes with their images' tokens selected after the merger, each kept token at its own
multimodal RoPE position.

transformers' ``get_rope_index`` numbers an image's tokens ``base + (t, h, w)`` and the text after it from
``base + max(t, h, w)`` over the whole grid; the HF engine keeps each kept token's own (t, h, w) and leaves the text's
numbering alone ("original" positions, the only mode on Qwen-VL). vLLM computes a request's positions from its prompt
before the images are encoded: here the text's come out right from the pruned prompt (each image's grid, not its kept
tokens, decides where the text after it resumes), and the image's placeholders are numbered provisionally. After the
encoder runs, vLLM's runner hands the model each step's media embeddings with four channels appended (the kept tokens'
(t, h, w) and ``max(t, h, w) + 1`` of the grid, as vLLM's video pruning lays them out) to renumber
(``recompute_mrope_positions``): the model places each media token at its run's start plus its own (t, h, w). vLLM's
own renumbering is not used: it misplaces a run that follows another in the same prefill step, and its video pruning
numbers the text after a tall image from the grid's width. :mod:`vlprune.vllm.runner_flag` makes the runner call it.

Videos are not pruned: their tokens get their full positions (or vLLM's own EVS, when ``video_pruning_rate`` is set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from vlprune.adapters import AdapterTraits
from vlprune.adapters.qwen_vl import MergedTokenProjector, Qwen2_5_VLAdapter, Qwen2VLAdapter
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.vllm.image_pruning import PrunesImages, image_pruning_for
from vlprune.vllm.processing import PrunedImagePlaceholders
from vlprune.vllm.runner_flag import follow_served_model
from vlprune.vllm.settings import REQUEST_KEY
from vlprune.vllm.tower_reads import TowerRecorder, packed_tower_reads


class VlpruneQwen2VLProcessor(PrunedImagePlaceholders, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor with each image's placeholders cut to its budget."""

    @staticmethod
    def vlprune_traits(hf_config: Any) -> AdapterTraits:
        return Qwen2VLAdapter.traits


class VlpruneQwen2_5_VLProcessor(PrunedImagePlaceholders, Qwen2_5_VLMultiModalProcessor):  # noqa: N801
    """vLLM's Qwen2.5-VL processor with each image's placeholders cut to its budget."""

    @staticmethod
    def vlprune_traits(hf_config: Any) -> AdapterTraits:
        return Qwen2_5_VLAdapter.traits


def media_positions(grid_thw: list[int], merge_size: int, **video: float) -> torch.Tensor:
    """(tokens, 4) each token's (t, h, w) position relative to the media's start, and the offset the text after the
    media continues from: ``max`` over the whole grid plus one (``get_rope_index``: ``max(t, h, w)`` for an image)."""
    positions = compute_mrope_for_media(torch.tensor(grid_thw), merge_size, **video).clone()
    positions[:, 3] = positions[:, :3].max() + 1
    return positions


class QwenImagePruning(PrunesImages):
    """What the Qwen-VL families share (put before vLLM's class): the pruned images with their position channels, the
    request's first positions, the tower's reads. A family gives its traits and its tower's token order."""

    vlprune_family_traits: AdapterTraits

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        # Checked before the layers are built, so that a bad setting fails before any weight loads.
        pruning = image_pruning_for(
            config, self.vlprune_family_traits, config.vision_config.model_type, reindexed=False
        )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlprune_start(pruning)
        self.vlprune_recomputes_positions = pruning is not None
        if pruning is not None:
            # Media embeddings now carry position channels, which the runner strips when its flag is set.
            self.is_multimodal_pruning_enabled = True
            follow_served_model()

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """A request's first positions, from its prompt with each image's budget of placeholders: the text exactly as
        ``get_rope_index`` numbers it (each media's grid, not its kept tokens, decides where the text after it
        resumes), and each image's placeholders provisionally at its first grid positions, until the runner renumbers
        them from the kept tokens' own (``recompute_mrope_positions``)."""
        if self.vlprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces, start, base = [], 0, 0
        ordered = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        for feature, (offset, t, h, w, t_factor) in zip(ordered, self.iter_mm_grid_thw(mm_features), strict=True):
            text = offset - start
            pieces.append(torch.arange(text).expand(3, -1) + base)
            base += text
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            grid = grid.reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).long()
            placed = feature.mm_position.length
            pieces.append(grid[:, :placed] + base)
            base += int(grid.max()) + 1
            start = offset + placed
        pieces.append(torch.arange(len(input_tokens) - start).expand(3, -1) + base)
        positions = torch.cat(pieces, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """The runner's call after this step's media embeddings are gathered: strip their four position channels and
        place each media token at its run's start plus its own (t, h, w).

        The embeddings are this step's media tokens in prompt order, from ``num_computed_tokens`` on (a chunked
        prefill may bring part of a run, or the end of one run and the start of the next). The text's positions,
        and so the decode offset, are already right (:meth:`get_mrope_input_positions`); a run's start is the
        position after the token before it (its ``<|vision_start|>``). vLLM's own renumbering, written for video
        pruning, misplaces the tokens of a run that follows another in the same step; this one does not."""
        stripped = [embedding[:, :-4] for embedding in multimodal_embeddings]
        positions = mrope_positions.clone()
        if multimodal_embeddings:
            ids = torch.as_tensor(input_ids, device=positions.device)
            media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            offsets = torch.cat([embedding[:, -4:-1] for embedding in multimodal_embeddings]).round().long()
            places = media.nonzero().flatten()
            places = places[places >= num_computed_tokens][: len(offsets)]
            starts = torch.arange(len(ids), device=ids.device)
            starts = torch.where(media & ~torch.cat([media.new_zeros(1), media[:-1]]), starts, 0).cummax(0).values
            base = positions[0, starts[places] - 1] + 1
            positions[:, places] = base[None] + offsets.T.to(positions)
        delta = int(positions.max()) + 1 - positions.shape[1]
        return stripped, positions, delta

    def _vlprune_recorder_for(self, needs: frozenset[Need]) -> TowerRecorder:
        visual = self.visual
        attention = None
        if needs - {Need.VISION_FEATURES}:
            last = len(visual.blocks) - 1
            windowed = getattr(visual, "fullatt_block_indexes", None)  # Qwen2.5-VL's towers attend within windows
            if windowed is not None and last not in windowed:
                raise VlpruneError(
                    f"vlprune reads Qwen2.5-VL's last vision block ({last}), which attends within windows here "
                    f"(full-attention blocks: {list(windowed)})"
                )
            attention = visual.blocks[last].attn.attn
        # The merger's input, read at its first layer: vLLM's compile decorator calls the merger without its hooks.
        projector = visual.merger.ln_q if Need.VISION_FEATURES in needs else None
        return TowerRecorder(attention, projector, heads=self.config.vision_config.num_heads)

    def embed_multimodal(self, **kwargs: object) -> Any:
        encoded = kwargs.pop(REQUEST_KEY, None)
        if self.vlprune is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, given in inputs.items():
            if modality in ("image", "images"):  # Qwen2.5-VL's key, Qwen2-VL's
                embeddings += self._pruned_images(given, encoded)
            elif getattr(self, "video_pruning_rate", None):
                embeddings += tuple(self._postprocess_video_embeds_evs(self._process_video_input(given), given))
            else:
                embeddings += self._positioned_videos(given)
        return embeddings

    def _pruned_images(self, given: Any, encoded: Any) -> tuple[torch.Tensor, ...]:
        with self.vlprune_recorder.recording() as recording:
            per_image = self._process_image_input(given)
        grids = given["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        projector = MergedTokenProjector(self.visual.merger, merge**2)
        reads = packed_tower_reads(
            recording, list(per_image), self.vlprune.needs, merge**2, [self._raster_order(g) for g in grids], projector
        )
        kept = self.vlprune.prune(reads, self.vlprune.budgets(encoded, len(reads)))
        out = []
        for tokens, grid in zip(kept, grids, strict=True):
            positions = media_positions(grid, merge)[tokens.origin.cpu()].to(tokens.embeddings)
            out.append(torch.cat([tokens.embeddings, positions], dim=1))
        return tuple(out)

    def _raster_order(self, grid: list[int]) -> torch.Tensor:
        """The permutation from the tower's order of an image's merged tokens to raster order."""
        raise NotImplementedError

    def _positioned_videos(self, given: Any) -> tuple[torch.Tensor, ...]:
        grids = given["video_grid_thw"].tolist()
        seconds = given.get("second_per_grid_ts")
        seconds = [1.0] * len(grids) if seconds is None else [float(s) for s in seconds.long()]
        rate = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        merge = self.visual.spatial_merge_size
        out = []
        for tokens, grid, second in zip(self._process_video_input(given), grids, seconds, strict=True):
            positions = media_positions(grid, merge, tokens_per_second=rate, video_second_per_grid=second)
            out.append(torch.cat([tokens, positions.to(tokens)], dim=1))
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(
    VlpruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VlpruneQwen2_5_VLForConditionalGeneration(QwenImagePruning, Qwen2_5_VLForConditionalGeneration):  # noqa: N801
    """vLLM's ``Qwen2_5_VLForConditionalGeneration``, pruning each image's tokens when the config has a ``vlprune``
    entry."""

    vlprune_family_traits = Qwen2_5_VLAdapter.traits

    def _raster_order(self, grid: list[int]) -> torch.Tensor:
        """The tower attends window by window: its merged tokens come in window order."""
        window_index, _ = self.visual.get_window_index_thw(*grid)
        return torch.argsort(window_index)


@MULTIMODAL_REGISTRY.register_processor(
    VlpruneQwen2VLProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VlpruneQwen2VLForConditionalGeneration(QwenImagePruning, Qwen2VLForConditionalGeneration):
    """vLLM's ``Qwen2VLForConditionalGeneration``, pruning each image's tokens when the config has a ``vlprune``
    entry (the renumbering is the shared one: vLLM's class has none, as it supports no video pruning)."""

    vlprune_family_traits = Qwen2VLAdapter.traits

    def _raster_order(self, grid: list[int]) -> torch.Tensor:
        """The tower attends over whole images: its merged tokens are in raster order."""
        return torch.arange(grid[0] * grid[1] * grid[2] // self.visual.spatial_merge_size**2)
