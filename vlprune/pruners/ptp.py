"""PTP (Pyramid Token Pruning): region budgets from bottom-up saliency, then tokens by saliency fused with top-down
instruction relevance, inside the language model.

Reference: Liang et al., "Pyramid Token Pruning for High-Resolution Large Vision-Language Models via Region, Token,
and Instruction-Guided Importance" (arXiv 2509.15704). **No official code exists**; the paper's text could not be
read in full, so this module follows its abstract and a public re-implementation, and says which is which.

From the paper (abstract): training-free; three levels of importance combined hierarchically: bottom-up visual
saliency at the **region** level (how much of the budget each region gets) and at the **token** level (which tokens
inside a region), and top-down **instruction-guided** relevance; regions are the sub-images of a dynamically tiled
high-resolution input.

From the public re-implementation (unverified), and the project's choices where nothing says more:
- Token saliency ``b``: the attention each patch receives in the vision feature layer, averaged over the tower's
  queries and heads (the re-implementation's choice for towers without [CLS]; vlprune uses it for every tower so that
  one rule serves CLIP, SigLIP and DINOv2).
- Region budgets: proportional to each region's mean saliency, floors plus the remainder to the heaviest regions, a
  full region's excess handed to the others (the same rule as HoloV's crop budgets).
- Instruction relevance ``c_j = max_i`` (head-mean attention of instruction token ``i`` to visual token ``j``) at
  decoder layer 2, softmax over all keys; the fused score is ``(1 - α) · minmax(b) + α · minmax(c)`` with
  ``α = 0.5``; each region keeps its budget of the highest fused scores.
- Pruning happens at the input of layer 3 (the layers up to 2 run on every token, FastV-style), at the tokens'
  original RoPE positions (``default_positions``: with no official code to follow, vlprune keeps them as FastV's
  in-LLM pruning does, which also keeps pruning equal to masking). ``layer`` moves it (scored at ``layer - 1``);
  ``keep`` counts the tokens after it.
- Regions: on tiled inputs (LLaVA-NeXT, OneVision) the regions are the sub-images as the paper defines them: the base
  view and each tile, each token's saliency computed within its own crop. LLaVA-1.5 has one image and no tiles, so
  there the regions are spatial tiles of the token grid, ``regions=4`` (2 x 2) by default; so on Qwen-VL, whose
  dynamic-resolution grids take the image's aspect ratio, tiles of that grid.
- Line breaks (``image_newline``) carry no saliency and form no region: they are dropped unless the budget exceeds
  every other token (nothing in the paper's abstract says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, QueryRows, Selection, Stage, StageContext, StagePlan, check_layer
from vlprune.pruners.groups import crop_quotas, grid_tiles, keep_by_quota, tile_crops


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(B, N) values scaled to [0, 1] per sample (all zeros when a sample's values are equal)."""
    low, high = values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low).clamp(min=torch.finfo(values.dtype).tiny)


def instruction_relevance(attention: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) the most any instruction token attends to each visual token. attention: (B, T, N); valid: (B, T)."""
    return attention.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)


def spatial_regions(geometry: VisualGeometry, sample: int, regions: int) -> torch.Tensor:
    """(N,) region of each visual token of an untiled sample: ``regions`` rectangular tiles of its image's own
    token grid (square for LLaVA-1.5, any aspect ratio for Qwen-VL's dynamic resolution)."""
    row, col = geometry.row[sample], geometry.col[sample]
    height, width = geometry.extents[sample]
    tiles = grid_tiles(height, width, regions).to(row.device)
    return tiles[row.clamp(min=0) * width + col.clamp(min=0)]


def region_quotas(
    saliency: torch.Tensor, region_of: torch.Tensor, keep: int, regions: int | None = None
) -> torch.Tensor:
    """(B, regions) tokens each region keeps, in proportion to its mean saliency; ``regions`` is read from
    ``region_of`` when not given."""
    regions = int(region_of.max()) + 1 if regions is None else regions
    region_of = region_of.to(saliency.device)
    totals = torch.zeros(saliency.shape[0], regions, device=saliency.device).index_add_(1, region_of, saliency.float())
    capacity = torch.zeros(regions, dtype=torch.long, device=saliency.device).index_add_(
        0, region_of, torch.ones_like(region_of)
    )  # bincount's width would depend on the data
    means = totals / capacity
    weights = means / means.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(means.dtype).tiny)
    return crop_quotas(weights, capacity, keep)


def view_quotas(saliency: torch.Tensor, region_of: torch.Tensor, keep: int) -> torch.Tensor:
    """(1, regions) tokens per sub-image (region 0, the line breaks, gets budget only when the others are full)."""
    regions = int(region_of.max()) + 1
    region_of = region_of.to(saliency.device)
    totals = torch.zeros(1, regions, device=saliency.device).index_add_(1, region_of, saliency.float())
    capacity = torch.bincount(region_of, minlength=regions)
    means = totals / capacity.clamp(min=1)
    means[:, 0] = 0.0
    weights = means / means.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(means.dtype).tiny)
    return crop_quotas(weights, capacity, keep)


@register
@dataclass
class PTP(Pruner):
    """Options: ``layer`` (stage layer, default 3: scored with layer 2), ``alpha`` (weight of the instruction
    relevance, 0.5), ``regions`` (spatial regions of the token grid, 4)."""

    name = "ptp"
    stage = Stage.IN_LLM
    reference = "PTP, arXiv 2509.15704 (no official code)"
    default_positions = "original"  # no official code: as FastV-style in-LLM pruning does

    layer: int = 3
    alpha: float = 0.5
    regions: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 <= self.alpha <= 1:
            raise VlpruneError(f"alpha={self.alpha!r} must be in [0, 1] (0.5 weighs saliency and instruction equally)")
        if isinstance(self.regions, bool) or not isinstance(self.regions, int) or self.regions < 1:
            raise VlpruneError(f"regions={self.regions!r} must be a positive int (4 = 2 x 2 tiles)")

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        layer = check_layer(self.layer, num_layers, minimum=1, method=self.name)
        return [
            StagePlan(
                layer=layer,
                keep=self._required_keep(num_visual),
                query_rows=QueryRows.TEXT,
                needs=frozenset({Need.RECEIVED_ATTENTION}),
            )
        ]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        assert ctx.query_attention is not None and ctx.vision_received_attention is not None
        saliency = ctx.vision_received_attention  # (B, N): attention each token receives in its crop
        relevance = instruction_relevance(ctx.query_attention, ctx.query_mask)
        score = (1 - self.alpha) * min_max(saliency) + self.alpha * min_max(relevance)
        geometry = ctx.geometry
        if geometry is None:
            region_of = tile_crops(ctx.num_visual, self.regions)
            quota = region_quotas(saliency, region_of, ctx.keep)
            return Selection(keep_index=keep_by_quota(score, region_of, quota), scores=score)
        if not geometry.has_tiles:
            rows = []
            for sample in range(ctx.batch_size):
                region_of = spatial_regions(geometry, sample, self.regions)
                quota = region_quotas(saliency[sample : sample + 1], region_of, ctx.keep, self.regions)
                rows.append(keep_by_quota(score[sample : sample + 1], region_of, quota, ctx.keep)[0])
            return Selection(keep_index=torch.stack(rows), scores=score)
        rows = []
        for sample in range(ctx.batch_size):
            region_of = geometry.view[sample].clamp(min=-1) + 1  # 0: line breaks, 1: base view, 2..: tiles
            quota = view_quotas(saliency[sample : sample + 1], region_of, ctx.keep)
            rows.append(keep_by_quota(score[sample : sample + 1], region_of, quota)[0])
        return Selection(keep_index=torch.stack(rows), scores=score)
