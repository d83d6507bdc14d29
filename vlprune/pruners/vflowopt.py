"""VFlowOpt: token pruning guided by an importance map from the vision encoder, with recycling and calibrated
hyperparameters.

Reference: Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided
Optimization", ICCV 2025 (arXiv 2508.05211); official code github.com/sihany077/VFlowOpt (LLaVA-OneVision:
``siglip_encoder.py``, ``llava_qwen_training_free.py``, ``lmms_eval/models/llava_onevision_training_free.py``).

What the reference does and vlprune reproduces:

1. **Importance map** at the vision feature layer: with ``A`` the head-mean attention among the image's tokens and
   ``a_j = mean_i A_ij`` the attention each token receives, the relatively important tokens are
   ``K = {j : a_j > t · mean(a)}`` and ``I_j = mean_{k in K} A_kj + α · softmax_j(H_j)``, ``H_j`` the entropy (bits) of
   the 256-bin histogram of patch j's grey levels.
2. **Pre-LLM stage** keeping ``R1 · N`` tokens. On an untiled image (the reference's single-tensor path, which
   LLaVA-1.5 is) it is a plain top-k by importance. **Recycling** belongs to the reference's multi-crop path and is
   an option here (``recycle=True``): ``int(N / m²)`` more tokens are pruned to make room (``num_merged_tokens =
   int(image_token_length / (a * a))``), the pruned tokens are grouped by square grid cells of side ``m`` patches, and
   each cell's pruned tokens are averaged, weighted by importance, into the place of the cell's most important
   pruned token (which stays, in spatial order).
3. **Two stages inside the language model** (layers 9 and 18 of Qwen2-7B's 28, scaled to the depth) keeping
   ``R2`` and then ``R3`` of the tokens present, the least important by the same map dropped; kept tokens keep their
   original RoPE positions. ``R3`` follows from the layer-averaged budget: ``R̄ · L = R1 · l1 + R1 R2 (l2 - l1) +
   R1 R2 R3 (L - l2)``.
4. **Calibration** (``vlprune calibrate --method vflowopt``, :mod:`vlprune.eval.calibrate`): a Bayesian search of
   ``R1, R2, t, m, α`` maximising the cosine similarity of the last prompt token's last-layer hidden state with and
   without pruning over a few unlabelled samples; its JSON output feeds ``--config``.

**Multi-crop images** (LLaVA-OneVision, the reference's ``anyres_max`` path, and LLaVA-NeXT alike; Qwen-VL's images
of any size the same way, one crop per image, each token the mean of its 2 x 2 merge group): the map is
computed per view (the base image and each tile) from that view's attention, placed on the visual tokens as the model
packs its features (the tiles' maps stitched, unpadded and, where OneVision shrinks the grid, bilinearly resized
with the features), and every ``image_newline`` token gets importance 1, so it stays. Recycling is on by default
for tiled images, as in the reference: the pruned tokens are grouped by cells of side ``m`` on the base view's grid
and, apart, on the stitched grid whose width counts the line-break column.

Defaults are the reference's released configurations for 10%, 25% and 50% of the tokens (t, m, R1, R2 of the nearest
one, R1 scaled to the budget, R3 solved from the constraint; α = 0 in all of them, so the entropy term is off);
``keep`` is the layer-averaged number of visual tokens.

Deviations, each for a reason:
- The reference publishes no LLaVA-1.5 configuration (its code serves LLaVA-OneVision with SigLIP, 27 x 27 patches);
  ``m`` is given on that grid and scaled to the model's (``m · g / 27``), the map is read at the feature layer
  (the reference's layer 25 is the last layer LLaVA-OneVision uses), and towers with a [CLS] token leave it out of
  the map's rows and columns (the softmax still spans it).
- With recycling the pre-LLM stage keeps exactly ``R1 · N`` tokens: the reference re-keeps one token per non-empty
  cell, so its count varies with the image; vlprune keeps the representatives of the ``int(N / m²)`` most important
  cells and, when fewer cells are non-empty, the next most important pruned tokens instead (a batch needs one count).
- Multi-crop recycling uses each image's base and stitched grids of the prompt, so it works for any tile grid and
  for samples of several images (the reference hard-codes 27 x 27 and serves single-image samples only).
- Grey levels are clamped to [0, 255] before the histogram (the reference casts the normalised pixels x 255 to
  uint8, which wraps negative values around).
- Batches of more than one sample work (the reference is batch 1 and passes the map through an environment variable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlprune.errors import VlpruneError
from vlprune.geometry import BASE, VisualGeometry
from vlprune.kernels import gather_tokens, merge_tokens
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import (
    Pruner,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    is_probe,
    resolve_keep,
    top_k_sorted,
)

REFERENCE_DEPTH = 28
REFERENCE_LAYERS = (9, 18)
REFERENCE_GRID = 27
# Released LLaVA-OneVision configurations: budget share -> (t, alpha, m, R1, R2).
RELEASED = {
    0.10: (39.265, 0.0, 17.387, 0.11662, 1.0),
    0.25: (34.760, 0.0, 15.581, 0.26510, 0.98334),
    0.50: (28.683, 0.0, 11.757, 0.72332, 0.74875),
}

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits


def importance_map(attention: torch.Tensor, sensitivity: float) -> torch.Tensor:
    """(B, N) attention from the relatively important tokens to each token. attention: (B, N, N) rows = queries;
    all-zero rows and their columns are padding (maps of images with fewer patches, padded to the largest)."""
    real = attention.sum(dim=-1) > 0  # (B, N): a real row is a softmax row
    count = real.sum(dim=-1, keepdim=True).clamp(min=1)
    received = attention.sum(dim=1) / count  # (B, N): mean over the real query rows
    mean = received.masked_fill(~real, 0).sum(dim=-1, keepdim=True) / count
    important = (received > sensitivity * mean) & real
    important = torch.where(important.any(dim=-1, keepdim=True), important, real)
    weights = important.float()[..., None]
    return (attention * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def patch_entropy(pixel_values: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid²) entropy in bits of each patch's 256-bin grey-level histogram (grey = channel mean x 255)."""
    batch, _, height, width = pixel_values.shape
    grey = (pixel_values.float().mean(dim=1) * 255).clamp(0, 255).to(torch.uint8).long()  # (B, H, W)
    size_h, size_w = height // grid, width // grid
    patches = grey[:, : grid * size_h, : grid * size_w].reshape(batch, grid, size_h, grid, size_w)
    patches = patches.permute(0, 1, 3, 2, 4).reshape(batch, grid * grid, size_h * size_w)
    counts = torch.zeros(batch, grid * grid, 256, device=pixel_values.device).scatter_add_(
        2, patches, torch.ones_like(patches, dtype=torch.float)
    )
    share = counts / counts.sum(dim=-1, keepdim=True)
    return -(torch.special.xlogy(share, share) / math.log(2)).sum(dim=-1)


def cell_of_tokens(grid: int, cell: float) -> torch.Tensor:
    """(grid²,) grid cell of each token in raster order, cells of side ``cell`` patches."""
    index = (torch.arange(grid) / cell).floor().long()
    per_row = int(index.max()) + 1
    return (index[:, None] * per_row + index[None, :]).reshape(-1)


def cells_of_views(geometry: VisualGeometry, grid: int, cell: float) -> torch.Tensor:
    """(B, N) grid cell of each visual token of a multi-crop prompt, cells of side ``cell`` patches: on the base
    view's ``grid`` x ``grid`` patches, and apart on the stitched tile grid, whose line-break column (at ``full_col``
    = its width) is one more column; every image of a sample has its own cells."""
    base = geometry.view == BASE
    row = torch.where(base, geometry.row, geometry.full_row).clamp(min=0)
    col = torch.where(base, geometry.col, geometry.full_col).clamp(min=0)
    cell_row, cell_col = (row / cell).floor().long(), (col / cell).floor().long()
    span = math.ceil((max(grid, int(geometry.full_col.max()) + 1) + 1) / cell) + 1
    key = ((geometry.image.clamp(min=0) * 2 + (~base).long()) * span + cell_row) * span + cell_col
    return torch.stack([torch.unique(row_key, return_inverse=True)[1] for row_key in key])


def recycle_into_cells(
    importance: torch.Tensor, hidden: torch.Tensor, cells: torch.Tensor, keep: int, room: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VFlowOpt's pre-LLM selection with recycling, per sample.

    Args:
        importance: (B, N); hidden: (B, N, D); cells: (N,) or (B, N) cell of each token; keep: tokens to keep;
            room: how many of them are cell representatives (the reference's ``int(N / m²)``): the ``keep - room``
            most important tokens stay as they are.

    Returns:
        (B, keep) ascending kept indices and (B, keep, D) their hidden states, where each cell's kept representative
        (its most important pruned token) holds the importance-weighted mean of the cell's pruned tokens.
    """
    count = importance.shape[1]
    cells = cells.to(importance.device).expand(importance.shape[0], -1)
    kept_rows, hidden_rows = [], []
    for sample in range(importance.shape[0]):
        score, tokens, sample_cells = importance[sample], hidden[sample], cells[sample]
        num_cells = int(sample_cells.max()) + 1
        order = score.argsort(descending=True, stable=True)
        kept = torch.zeros(count, dtype=torch.bool, device=score.device)
        kept[order[: max(keep - room, 0)]] = True
        # Each cell's most important pruned token represents it; the next best pruned tokens fill empty cells' room.
        pruned_order = order[~kept[order]]
        first_in_cell = torch.ones_like(pruned_order, dtype=torch.bool)
        seen = torch.zeros(num_cells, dtype=torch.bool, device=score.device)
        for position, token in enumerate(pruned_order.tolist()):
            cell = int(sample_cells[token])
            first_in_cell[position] = not bool(seen[cell])
            seen[cell] = True
        representatives = pruned_order[first_in_cell][: keep - int(kept.sum())]
        extras = pruned_order[~first_in_cell][: keep - int(kept.sum()) - len(representatives)]
        kept[extras] = True
        pruned = ~kept
        kept[representatives] = True
        weight = score.clamp(min=1e-12) * pruned
        cell_means = merge_tokens(tokens[None], sample_cells[None], num_cells, weight[None])[0]  # (cells, D)
        new_hidden = tokens.clone()
        new_hidden[representatives] = cell_means[sample_cells[representatives]].to(tokens.dtype)
        index = kept.nonzero()[:, 0]
        kept_rows.append(index)
        hidden_rows.append(new_hidden[index])
    return torch.stack(kept_rows), torch.stack(hidden_rows)


@register
@dataclass
class VFlowOpt(Pruner):
    """Options: ``ratios`` ([R1, R2, R3]), ``sensitivity`` (t), ``cell`` (m, in patches of a 27 x 27 grid),
    ``entropy_weight`` (α), ``layers`` (the two in-LLM stage layers of a 28-layer model), ``recycle`` (default: on for
    multi-crop images, as the reference's anyres path, off for untiled ones, as its single-tensor path);
    ``keep`` is the layer-averaged number of visual tokens."""

    name = "vflowopt"
    stage = Stage.PRE_LLM
    reference = "VFlowOpt, ICCV 2025 (sihany077/VFlowOpt)"
    default_positions = "original"  # forward_illava keeps position_ids[:, del_musk]

    ratios: list[float] | None = None
    sensitivity: float | None = None
    cell: float | None = None
    entropy_weight: float | None = None
    layers: list[int] | None = None
    recycle: bool | None = None

    def stage_layers(self, num_layers: int) -> list[int]:
        layers = self.layers or REFERENCE_LAYERS
        scaled = [max(1, round(layer * num_layers / REFERENCE_DEPTH)) for layer in layers]
        if len(scaled) != 2 or not 0 < scaled[0] < scaled[1] < num_layers:
            raise VlpruneError(
                f"vflowopt needs two increasing in-LLM stage layers, got {scaled} for {num_layers} layers"
            )
        return scaled

    def settings(self, num_visual: int, num_layers: int) -> tuple[list[float], float, float, float]:
        """(R1, R2, R3), t, m (reference grid), α for this model and budget."""
        share = resolve_keep(self._required_keep(num_visual), num_visual) / num_visual
        nearest = min(RELEASED, key=lambda s: abs(s - share))
        t, alpha, m, r1, r2 = RELEASED[nearest]
        first, second = self.stage_layers(num_layers)
        if self.ratios is not None:
            ratios = list(self.ratios)
            if len(ratios) == 2:
                ratios.append(solve_last_ratio(share, ratios[0], ratios[1], first, second, num_layers))
        else:
            r1 = min(1.0, r1 * share / nearest)
            ratios = [r1, r2, solve_last_ratio(share, r1, r2, first, second, num_layers)]
        if len(ratios) != 3 or not all(0 < r <= 1 for r in ratios):
            raise VlpruneError(f"ratios={ratios} must be three values in (0, 1] (R1, R2, R3)")
        return (
            ratios,
            t if self.sensitivity is None else self.sensitivity,
            m if self.cell is None else self.cell,
            alpha if self.entropy_weight is None else self.entropy_weight,
        )

    def counts(self, num_visual: int, num_layers: int) -> list[int]:
        (r1, r2, r3), *_ = self.settings(num_visual, num_layers)
        first = max(1, round(num_visual * r1))
        second = max(1, round(first * r2))
        return [first, second, max(1, round(second * r3))]

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return self._stages(num_visual, num_layers, multi_crop=False)

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        # Where the family gives one square map per image (LLaVA-1.5's untiled path) the reference reads it; elsewhere
        # the maps come per crop (a view, or a Qwen-VL image of any size) and are packed onto the tokens as the model
        # packs its features.
        return self._stages(num_visual, num_layers, multi_crop=Need.VISION_MAP not in traits.provides)

    def _stages(self, num_visual: int, num_layers: int, multi_crop: bool) -> list[StagePlan]:
        counts = [num_visual] * 3 if is_probe(num_visual) else self.counts(num_visual, num_layers)
        layers = [0, *self.stage_layers(num_layers)]
        return [
            StagePlan(layer=layer, keep=count, needs=frozenset({Need.CROP_MAPS if multi_crop else Need.VISION_MAP}))
            for layer, count in zip(layers, counts, strict=True)
        ]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        if ctx.vision_crop_attention is not None:
            return self._select_multi_crop(ctx)
        assert ctx.vision_attention is not None and ctx.pixel_values is not None
        _, t, m, alpha = self.settings(ctx.vision_attention.shape[1], ctx.num_layers)
        importance = importance_map(ctx.vision_attention, t)
        grid = math.isqrt(importance.shape[1])
        if alpha != 0:
            if grid * grid != importance.shape[1]:
                raise VlpruneError(f"the entropy term needs a square token grid, got {importance.shape[1]} tokens")
            importance = importance + alpha * torch.softmax(patch_entropy(ctx.pixel_values, grid), dim=-1)
        current = gather_tokens(importance, ctx.visual_origin.clamp(min=0))
        if ctx.stage_index > 0 or not self.recycle:
            return Selection(keep_index=top_k_sorted(current, ctx.keep), scores=current)
        if grid * grid != importance.shape[1]:
            raise VlpruneError(f"recycling needs a square token grid, got {importance.shape[1]} tokens")
        side = m * grid / REFERENCE_GRID
        cells = cell_of_tokens(grid, side)
        room = min(int(importance.shape[1] / side**2), ctx.keep)
        keep_index, kept_hidden = recycle_into_cells(current, ctx.visual_hidden, cells, ctx.keep, room)
        return Selection(keep_index=keep_index, kept_hidden=kept_hidden, scores=current)

    def _select_multi_crop(self, ctx: StageContext) -> Selection:
        """The reference's anyres path: per-view maps packed onto the tokens, line breaks at importance 1."""
        assert ctx.pack_crop_values is not None and ctx.vision_crop_pixels is not None and ctx.geometry is not None
        attention = ctx.vision_crop_attention
        placed = ctx.pack_crop_values(torch.zeros(attention.shape[:2], device=attention.device), 0.0)
        _, t, m, alpha = self.settings(placed.shape[1], ctx.num_layers)
        importance = importance_map(attention, t)  # (crops, P)
        if alpha != 0:
            grid = math.isqrt(attention.shape[1])
            if grid * grid != attention.shape[1] or ctx.vision_crop_pixels.dim() != 4:
                raise VlpruneError(
                    f"the entropy term needs square views as images, got {attention.shape[1]} patches per view and "
                    f"pixels of shape {tuple(ctx.vision_crop_pixels.shape)}"
                )
            importance = importance + alpha * torch.softmax(patch_entropy(ctx.vision_crop_pixels, grid), dim=-1)
        packed = ctx.pack_crop_values(importance.float(), 1.0)  # (B, N0)
        current = gather_tokens(packed.to(ctx.visual_hidden.device), ctx.visual_origin.clamp(min=0))
        tiled = ctx.geometry.has_tiles
        if ctx.stage_index > 0 or not (self.recycle if self.recycle is not None else tiled):
            return Selection(keep_index=top_k_sorted(current, ctx.keep), scores=current)
        grid = int(ctx.geometry.row.max()) + 1  # the base view's side (the grid the reference's m is given on)
        side = m * grid / REFERENCE_GRID
        cells = cells_of_views(ctx.geometry, grid, side)
        room = min(int(ctx.num_visual / side**2), ctx.keep)
        keep_index, kept_hidden = recycle_into_cells(current, ctx.visual_hidden, cells, ctx.keep, room)
        return Selection(keep_index=keep_index, kept_hidden=kept_hidden, scores=current)


def solve_last_ratio(share: float, r1: float, r2: float, first: int, second: int, num_layers: int) -> float:
    """R3 from the layer-averaged budget ``share`` (reference Eq. 5), at most 1.

    Raises:
        VlpruneError: when R1 and R2 already spend more than the budget.
    """
    rest = (num_layers * share - first * r1 - (second - first) * r1 * r2) / (num_layers - second)
    ratio = min(1.0, rest / (r1 * r2))
    if ratio <= 0:
        raise VlpruneError(
            f"R1={r1:.3f}, R2={r2:.3f} spend more than the budget of {share:.3f} per layer; lower them or raise keep"
        )
    return ratio
