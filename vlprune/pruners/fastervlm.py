"""FasterVLM: keep the visual tokens that the vision tower's [CLS] token attends to most, before the language model.

Reference: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster" (arXiv 2412.01818); official code github.com/Theia-4869/FasterVLM (LLaVA's ``clip_encoder.py``: the [CLS]
row of the attention at the feature-select layer, averaged over heads, top ``keep`` patches).

vlprune reproduces the selection: the attention row of [CLS] at the vision layer whose output LLaVA feeds to the
projector (``vision_feature_layer``, -2 for LLaVA-1.5), softmax over all tokens, averaged over heads, restricted to
the tokens that reach the language model, top ``keep`` in original order, the shortened prompt numbered
contiguously as the reference's rebuilt ``inputs_embeds`` are (default ``positions="reindex"``).

Deviations, each for a reason:
- The [CLS] row is computed by the engine from the layer's query and keys (one row), so the vision tower keeps SDPA
  instead of running with ``output_attentions=True``.
- Pruning happens at the input of decoder layer 0 rather than by shortening the prompt before the language model:
  every decoder layer sees exactly the kept tokens, the same computation; ``positions="original"`` keeps the kept
  tokens' positions instead.
- Towers without a [CLS] token (SigLIP) are refused with a clear error: the method is defined by that token.

LLaVA-NeXT (``encode_images`` in the reference's ``llava_arch.py``): each view (the base image and every tile) is
scored by its own [CLS] and keeps the same number of tokens (``--visual-token-num`` per view: 640/320/160 of 2,880
are 128/64/32 per view of a 2 x 2 grid). vlprune keeps the budget per sample and shares it among the views in
proportion to their tokens (the remainder to the largest views), which is the reference's equal share when every
view is whole.
Deviations: the reference forces the ``spatial`` merge (no unpadding, no ``image_newline`` tokens) although the
LLaVA-NeXT checkpoints are trained with ``spatial_unpad``; vlprune keeps the model's own layout, so tiles are
unpadded (their shares follow their real sizes) and the line breaks, which the reference never feeds, are dropped
first (kept only if the budget exceeds every other token).

The selection is :func:`select_fastervlm`, a function of the [CLS] attention row and, on tiled inputs, each token's
view (re-exported by :mod:`vlprune.pruners.selection`), which the pruner calls and another engine can call alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan, top_k_sorted
from vlprune.pruners.groups import crop_quotas, keep_by_quota


@register
@dataclass
class FasterVLM(Pruner):
    name = "fastervlm"
    stage = Stage.PRE_LLM
    reference = "FasterVLM, arXiv 2412.01818 (Theia-4869/FasterVLM)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=frozenset({Need.CLS_ATTENTION}))]

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.vision_cls_attention is not None, "the engine supplies the [CLS] attention for fastervlm"
        scores = ctx.vision_cls_attention
        geometry = ctx.geometry
        # Whether any token comes from a tile is known on the host; only then does the per-view path run.
        views = geometry.view if geometry is not None and geometry.has_tiles else None
        return Selection(keep_index=select_fastervlm(scores, ctx.keep, views=views), scores=scores)


def select_fastervlm(cls_attention: torch.Tensor, keep: int, *, views: torch.Tensor | None = None) -> torch.Tensor:
    """FasterVLM's kept tokens: the ``keep`` tokens the vision [CLS] token attends to most.

    Args:
        cls_attention: (B, N) attention of the [CLS] query to each visual token at the vision feature layer
            (softmax over all the tower's tokens, averaged over heads), for the N tokens that reach the language
            model (on tiled inputs each token's value comes from its own view's [CLS] row).
        keep: tokens kept per sample (a count in [1, N]).
        views: (B, N) each token's view when some token comes from a tile (LLaVA-NeXT: 0 the base view, 1.. the
            tiles, -1 a line break), else None (LLaVA-1.5, an untiled anyres image, Qwen-VL): one top-k over all N.
            With views each view takes its share of ``keep`` in proportion to its tokens (the reference's equal
            share per view when every view is whole) and line breaks only what is left when every other is kept.

    Returns:
        (B, keep) long indices into the N tokens, ascending.
    """
    if views is None:
        return top_k_sorted(cls_attention, keep)
    return top_k_per_view(cls_attention, views, keep)


def top_k_per_view(scores: torch.Tensor, views: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) ascending: each view's share of ``keep`` (in proportion to its tokens, the remainder to the largest
    views) of its highest-scoring
    tokens; line breaks (view -1) take budget only when every other token is kept."""
    rows = []
    for sample in range(scores.shape[0]):
        group = views[sample].clamp(min=-1) + 1  # 0: line breaks, 1: base view, 2..: tiles
        capacity = torch.bincount(group)
        weights = capacity.float()
        weights[0] = 0.0
        quota = crop_quotas((weights / weights.sum())[None], capacity, keep)
        rows.append(keep_by_quota(scores[sample : sample + 1], group, quota)[0])
    return torch.stack(rows)
