"""VScan: a global and a local scan of the vision tower's attention before the language model, merging the pruned
tokens into the kept ones, then a drop in the middle of the language model by the last instruction token's attention.

Reference: Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models", TMLR
2026 (arXiv 2505.22654); official code github.com/Tencent/SelfEvolvingAgent, ``VScan/`` (MIT):
``llava/model/llava_arch.py`` (``encode_images``, ``window_cls_selection``, ``token_merging``),
``llava/model/modeling_llama_x.py`` (``layer_prune``), ``llava/model/multimodal_encoder/clip_encoder.py``, and for
Qwen2.5-VL ``qwen/model/qwen2_5_vl_custom.py`` and ``qwen/model/qwen2_5_vl_utils.py`` (``window_selection``).

Stage 1 (before the language model), with a budget of T tokens:
- local scan: the [CLS] attention (head mean) at vision layer 5 (of CLIP-L's 24) on the 24 x 24 grid, cut into 4 x 4
  non-overlapping 6 x 6 windows; each window keeps its top ``(T // 2) // 16`` tokens;
- global scan: the [CLS] attention at the feature layer (-2), the locally chosen tokens zeroed, top ``T - T // 2``;
- merge: each pruned token joins its most cosine-similar kept token on the projected features, and every kept token
  becomes ``(kept + sum of its joiners) / (1 + their count)``.
Stage 2 (``rank_layer = 16`` of 32): the input of decoder layer 16 through that layer's own queries and keys, the last
instruction token's softmax row averaged over heads; the top 32 image tokens stay in their original order, and the
positions are numbered contiguously again (``reindex``). Defaults T = 96 then 32: 64 tokens per layer on average.

Qwen2.5-VL: local scan = the attention each patch receives (mean over the queries, heads summed) at the first
full-attention block (``fullatt_block_indexes[0]`` = 7 of 32), global scan = the same at the last block, both pooled
over the 2 x 2 merge unit and put back in raster order. The local pick walks the tokens by descending score, each
4 x 4 window of the merged grid (the remainder rows and columns join the last window) taking at most
``ceil(k / windows)``, until ``k = T // 2``; the global scan takes ``T - T // 2``. Defaults: T = int(0.167 · N) in
the encoder, then ``int(0.333 · T)`` before layer 14 of 28; the kept tokens keep their 3-D positions (original).

Budgets. ``keep=None`` gives the reference's defaults (LLaVA: 96 then 32, clamped to the tokens there are; Qwen-VL:
the two ratios). ``keep=K`` is the number of visual tokens per decoder layer on average, as PyramidDrop's ``keep``
is, so that a sweep compares the two at equal cost: stage 2 keeps a third of stage 1 (32/96, Qwen's 0.333) and the
two average K over the depth: ``T2 = round(K · L / (3 · L2 + L - L2))``, ``T1 = 3 · T2`` (K = 64 on 32 layers: 96 and
32, the reference's setting). ``layer`` moves stage 2 (a layer of a 32-layer model, scaled to the depth like
PyramidDrop's: 16 of 32 is 14 of 28).

Vision layers: the engine reads the early layer's [CLS] row (or received attention) from the layer's queries and
keys (``Need.EARLY_ATTENTION``, any attention backend) at ``round(5/24 · L)`` of the tower's L layers, or the first
full-attention block at or after it: CLIP-L's layer 5 and Qwen2.5-VL's block 7, as the references read.

Deviations, each for a reason:
- LLaVA's windows are 4 x 4 windows over whatever grid the view has (``row · 4 // H``), which is the reference's
  6 x 6 windows on 24 x 24; the reference asserts 576 tokens.
- When ``T // 2`` is not a multiple of 16 the reference keeps fewer than T (16 · floor(T/32) local + T - T // 2
  global); vlprune's global scan takes what the windows left of T, so every stage keeps exactly its count. For T =
  64, 96, 128, 192 the two agree. A window with fewer tokens than its quota (small grids) gives what it has.
- LLaVA-NeXT: the reference prunes every crop (base view and tiles) to T on its full 24 x 24 grid before unpadding,
  and keeps the ``image_newline`` tokens. vlprune works on the unpadded tokens: the line breaks are kept, the rest of
  the sample's budget is shared among the crops in proportion to their tokens (the reference's total grows with the
  tile grid), and each crop runs the scans and the merge on its own tokens, windows on its own patch grid.
- Qwen-VL: the reference's window walk reads the first image's grid only (batch 1); vlprune walks each sample's tokens
  with windows per image. The reference's stage-2 score on Qwen uses queries and keys without RoPE and no mask; the
  engine's rows are computed with them (as on LLaVA). The tower's received attention is averaged over each image's
  own queries (the reference averages over the packed queries of every image: a constant factor per image).
- Towers without [CLS] outside Qwen-VL read the received attention in both scans (``cls_substitute``); a single
  view then takes the Qwen-VL walk, tiled views (OneVision) the per-crop path.
- Batches of any size; the reference runs batch 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F  # noqa: N812

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import (
    Pruner,
    QueryRows,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    is_probe,
    resolve_keep,
    top_k_sorted,
)
from vlprune.pruners.groups import line_breaks_first, proportional_crop_shares
from vlprune.pruners.pyramiddrop import scaled_layers

if TYPE_CHECKING:
    from vlprune.adapters.traits import AdapterTraits

REFERENCE_LAYER = 16  # rank_layer of 32
EARLY_DEPTH = 5 / 24  # CLIP-L's layer 5; Qwen2.5-VL's first full-attention block (7 of 32) is the first at or after it
LLAVA_DEFAULT = (96, 32)
QWEN_RATIOS = (0.167, 0.333)
SECOND_SHARE = 3  # stage 1 keeps three times stage 2 (96/32; Qwen 1/0.333)
WINDOWS = 4  # windows per side on LLaVA (6 x 6 windows on 24 x 24)
QWEN_WINDOW = 4  # window side in merged tokens on Qwen-VL


def merge_into_kept(features: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """(B, K, D) each kept token averaged with the pruned tokens most cosine-similar to it (``token_merging``).

    features: (B, N, D); keep_index: (B, K) ascending, distinct. Ties go to the first kept token, as ``argmax`` does.
    """
    batch, count, dim = features.shape
    kept_mask = torch.zeros(batch, count, dtype=torch.bool, device=features.device)
    kept_mask.scatter_(1, keep_index, True)
    kept = torch.gather(features, 1, keep_index[..., None].expand(-1, -1, dim)).float()
    unit_kept = F.normalize(kept, dim=-1, eps=1e-8)
    unit_all = F.normalize(features.float(), dim=-1, eps=1e-8)
    nearest = (unit_all @ unit_kept.transpose(1, 2)).argmax(dim=-1)  # (B, N)
    pruned = (~kept_mask).float()
    sums = kept.scatter_add(1, nearest[..., None].expand(-1, -1, dim), features.float() * pruned[..., None])
    counts = torch.ones(batch, keep_index.shape[1], device=features.device).scatter_add(1, nearest, pruned)
    return (sums / counts[..., None]).to(features.dtype)


def window_of_llava(rows: torch.Tensor, cols: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Window id of each token on a ``height`` x ``width`` grid cut into 4 x 4 windows (6 x 6 on 24 x 24)."""
    return (rows * WINDOWS // height) * WINDOWS + cols * WINDOWS // width


def local_global_llava(
    local: torch.Tensor, global_: torch.Tensor, windows: torch.Tensor, keep: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, keep) ascending: each of the 16 windows' top ``(keep // 2) // 16`` by ``local``, then the top of the rest by
    ``global_`` to ``keep`` in all (``window_cls_selection``, then the global scan).

    local, global_: (B, N); windows: (N,) window id 0..15 per token (-1: never picked); valid: (B, N) or None.
    """
    per_window = (keep // 2) // (WINDOWS * WINDOWS)
    chosen = torch.zeros_like(local, dtype=torch.bool)
    if valid is None:
        valid = torch.ones_like(chosen)
    for window in range(WINDOWS * WINDOWS):
        members = (windows == window)[None] & valid
        take = min(per_window, int(members.sum(dim=1).min()))
        if take > 0:
            picked = local.masked_fill(~members, -math.inf).topk(take, dim=1).indices
            chosen.scatter_(1, picked, True)
    remaining = keep - int(chosen.sum(dim=1).max())
    # The reference zeroes the chosen tokens' global scores; -inf keeps them from being picked twice on ties with 0.
    scores = global_.masked_fill(chosen | ~valid, -math.inf)
    if remaining > 0:
        chosen.scatter_(1, scores.topk(remaining, dim=1).indices, True)
    return chosen.nonzero()[:, 1].view(local.shape[0], keep)


def local_walk_qwen(scores: torch.Tensor, windows: torch.Tensor, count: int, num_windows: int) -> torch.Tensor:
    """(count,) the tokens ``window_selection`` picks: by descending score, at most ``ceil(count / num_windows)`` per
    window. scores: (N,); windows: (N,) window id per token."""
    limit = math.ceil(count / max(num_windows, 1))
    order = torch.argsort(scores, descending=True)
    ordered = windows[order]
    # The rank of each token within its window, in score order; a window's first ``limit`` pass.
    one_hot = F.one_hot(ordered, num_classes=int(windows.max()) + 1)
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1
    passing = order[rank < limit]
    return passing[:count]


def qwen_windows(rows: torch.Tensor, cols: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Window id of each token of one sample (4 x 4 windows of the merged grid per image; the remainder rows and
    columns join the last window) and the number of windows."""
    ids = torch.empty_like(rows)
    total = 0
    for image in torch.unique(images).tolist():
        members = images == image
        height, width = int(rows[members].max()) + 1, int(cols[members].max()) + 1
        across, down = max(width // QWEN_WINDOW, 1), max(height // QWEN_WINDOW, 1)
        row = (rows[members] // QWEN_WINDOW).clamp(max=down - 1)
        col = (cols[members] // QWEN_WINDOW).clamp(max=across - 1)
        ids[members] = total + row * across + col
        total += down * across
    return ids, total


def select_vscan(
    local: torch.Tensor,
    global_: torch.Tensor,
    features: torch.Tensor,
    keep: int,
    windows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA's stage 1 on one view per sample: (B, keep) ascending kept indices and their (B, keep, D) merged features.

    local, global_: (B, N) the early and the feature layer's [CLS] attention; features: (B, N, D) projected features;
    windows: (N,) window id 0..15 of each token (:func:`window_of_llava`).
    """
    keep_index = local_global_llava(local, global_, windows, keep)
    return keep_index, merge_into_kept(features, keep_index)


def select_vscan_qwen(
    local: torch.Tensor,
    global_: torch.Tensor,
    features: torch.Tensor,
    keep: int,
    windows: torch.Tensor,
    num_windows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL's stage 1 for one sample: (1, keep) ascending indices and (1, keep, D) merged features. local,
    global_: (N,) received attention at the first full-attention and the last block; features: (N, D)."""
    local_count = keep // 2
    picked = local_walk_qwen(local, windows, local_count, num_windows)
    scores = global_.clone()
    scores[picked] = -math.inf
    rest = scores.topk(keep - len(picked)).indices
    keep_index = torch.cat([picked, rest]).sort().values[None]
    return keep_index, merge_into_kept(features[None], keep_index)


@register
@dataclass
class VScan(Pruner):
    """Options: ``layer`` (stage 2's decoder layer in a 32-layer model, scaled to the depth); ``keep`` is the number
    of visual tokens per decoder layer on average (see the module docstring)."""

    name = "vscan"
    stage = Stage.PRE_LLM
    reference = "VScan, TMLR 2026 (Tencent/SelfEvolvingAgent VScan/)"
    default_positions = "reindex"  # layer_prune renumbers the shortened prompt; Qwen-VL keeps its 3-D positions
    cls_substitute = "received"  # its Qwen2.5-VL code: the attention each token receives

    layer: int = REFERENCE_LAYER

    def _second_layer(self, num_layers: int) -> int:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 1 <= self.layer < 32:
            raise VlpruneError(f"layer={self.layer!r} for vscan must be an int in 1..31 (a layer of a 32-layer model)")
        return scaled_layers((self.layer,), num_layers)[0]

    def counts(self, num_visual: int, num_layers: int, packed: bool) -> tuple[int, int]:
        """(tokens kept before the language model, tokens kept from stage 2 on)."""
        second = self._second_layer(num_layers)
        if self.keep is None:
            if packed:
                first = max(1, int(QWEN_RATIOS[0] * num_visual))
                return first, max(1, int(QWEN_RATIOS[1] * first))
            first = min(LLAVA_DEFAULT[0], num_visual)
            return first, min(LLAVA_DEFAULT[1], first)
        keep = resolve_keep(self.keep, num_visual)
        after = round(keep * num_layers / (SECOND_SHARE * second + num_layers - second))
        first = SECOND_SHARE * after
        if first > num_visual:  # stage 1 keeps everything; stage 2 makes up the average
            first = num_visual
            after = round((keep * num_layers - num_visual * second) / (num_layers - second))
        if after < 1:
            raise VlpruneError(
                f"keep={self.keep} is too small for vscan: stage 2 at layer {second} would keep {after} tokens; "
                f"pass keep of at least {math.ceil((SECOND_SHARE * second + num_layers - second) / num_layers / 2)}"
            )
        return first, min(after, first)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return self._plan(num_visual, num_layers, packed=False)

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        return self._plan(num_visual, num_layers, packed=traits.packed_tower)

    def _plan(self, num_visual: int, num_layers: int, packed: bool) -> list[StagePlan]:
        second = self._second_layer(num_layers)
        first, after = (num_visual, num_visual) if is_probe(num_visual) else self.counts(num_visual, num_layers, packed)
        scan = {Need.RECEIVED_ATTENTION if packed else Need.CLS_ATTENTION, Need.EARLY_ATTENTION}
        return [
            StagePlan(layer=0, keep=first, needs=frozenset(scan), early_vision_depth=EARLY_DEPTH),
            StagePlan(layer=second, keep=after, query_rows=QueryRows.LAST, needs=frozenset({Need.OWN_LAYER_ATTENTION})),
        ]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        if ctx.layer > 0:
            assert ctx.query_attention is not None, "the engine supplies the last token's attention for vscan"
            scores = ctx.query_attention[:, -1, :]
            return Selection(keep_index=top_k_sorted(scores, ctx.keep), scores=scores)
        local = ctx.vision_early_attention
        packed = ctx.vision_cls_attention is None
        global_ = ctx.vision_received_attention if packed else ctx.vision_cls_attention
        assert local is not None and global_ is not None, "the engine supplies both scans' attention for vscan"
        geometry = ctx.geometry
        if geometry is not None and geometry.has_tiles:
            return self._select_per_crop(ctx, local, global_)
        if packed:
            return self._select_packed(ctx, local, global_)
        height, width = _grid(ctx)
        index = torch.arange(ctx.num_visual, device=local.device)
        rows, cols = index // width, index % width
        keep_index, kept = select_vscan(
            local.float(), global_.float(), ctx.visual_hidden, ctx.keep, window_of_llava(rows, cols, height, width)
        )
        return Selection(keep_index=keep_index, kept_hidden=kept, scores=global_)

    def _select_packed(self, ctx: StageContext, local: torch.Tensor, global_: torch.Tensor) -> Selection:
        geometry = ctx.geometry
        assert geometry is not None, "the engine supplies the geometry on Qwen-VL"
        indices, merged = [], []
        for sample in range(ctx.batch_size):
            windows, total = qwen_windows(geometry.row[sample], geometry.col[sample], geometry.image[sample])
            keep_index, kept = select_vscan_qwen(
                local[sample].float(), global_[sample].float(), ctx.visual_hidden[sample], ctx.keep, windows, total
            )
            indices.append(keep_index)
            merged.append(kept)
        return Selection(keep_index=torch.cat(indices), kept_hidden=torch.cat(merged), scores=global_)

    def _select_per_crop(self, ctx: StageContext, local: torch.Tensor, global_: torch.Tensor) -> Selection:
        """LLaVA-NeXT: the line breaks kept, each crop its proportional share, scanned and merged on its own."""
        geometry = ctx.geometry
        assert geometry is not None
        indices, merged = [], []
        for sample in range(ctx.batch_size):
            kept, budget = line_breaks_first(geometry.crop[sample], ctx.keep)
            hidden = ctx.visual_hidden[sample]
            new_hidden = hidden.clone()
            # Every crop has the base view's square patch grid; unpadding only removes some of a tile's patches.
            side = math.isqrt(int(geometry.crop_token[sample].max()))
            side = side + 1 if side * side <= int(geometry.crop_token[sample].max()) else side
            for tokens, share in proportional_crop_shares(geometry.crop[sample], budget):
                if share == 0:
                    continue
                patch = geometry.crop_token[sample, tokens]
                windows = window_of_llava(patch // side, patch % side, side, side)
                index, crop_kept = select_vscan(
                    local[sample, tokens][None].float(),
                    global_[sample, tokens][None].float(),
                    hidden[tokens][None],
                    share,
                    windows,
                )
                chosen = tokens[index[0]]
                new_hidden[chosen] = crop_kept[0]
                kept.append(chosen)
            keep_index = torch.cat(kept).sort().values
            indices.append(keep_index)
            merged.append(new_hidden[keep_index])
        return Selection(keep_index=torch.stack(indices), kept_hidden=torch.stack(merged), scores=global_)


def _grid(ctx: StageContext) -> tuple[int, int]:
    """(height, width) of the single view's token grid: the geometry's extents, else a square."""
    geometry = ctx.geometry
    if geometry is not None and geometry.extents and geometry.extents[0][0] * geometry.extents[0][1] == ctx.num_visual:
        return geometry.extents[0]
    side = math.isqrt(ctx.num_visual)
    if side * side != ctx.num_visual:
        return 1, ctx.num_visual
    return side, side


__all__ = [
    "VScan",
    "local_global_llava",
    "local_walk_qwen",
    "merge_into_kept",
    "qwen_windows",
    "select_vscan",
    "select_vscan_qwen",
    "window_of_llava",
]
