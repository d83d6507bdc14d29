"""SCOPE: greedy saliency-weighted coverage of the visual tokens by the kept ones, before the LLM.

Reference: Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs", NeurIPS 2025
(arXiv 2510.24214); official code github.com/kinredon/SCOPE (``scope/clip_encoder.py``: ``CLIPVisionTower_SCOPE``
and the function ``SCOPE``; ``scope/llava_arch.py``: ``restore_image_features_sorted_scope``). The repository has no
LICENSE file: vlprune follows what the code does and shares none of its text.

What the reference does and vlprune reproduces, per vision-tower crop, at the vision feature layer (LLaVA: the output
of CLIP's second-to-last layer):

1. Features ``f``: the patches' hidden states there (``hidden_states[-2][:, 1:]``), the projector's input, not the
   projected tokens nor the keys. Similarity ``s(j, i) = cos(f_j, f_i)``.
2. Saliency ``a``: the [CLS] row of that layer's attention (softmax over all tokens), summed over heads in the code;
   vlprune's row is the head mean, a constant factor that changes no choice of the product below.
3. Greedy: with ``c_j`` the coverage of token ``j`` so far (0 at the start), each unchosen token ``i`` gains
   ``g_i = Σ_j max(0, s(j, i) - c_j)`` over all N tokens, scored ``g_i · a_i^α`` (``COMBINED=multi``, ``ALPHA=1.0``,
   the code's defaults and its run scripts' settings); the best one (first index on ties, ``argmax``) is chosen and
   ``c_j = max(c_j, s(j, best))``; ``keep`` times.
4. The kept tokens enter the language model in their original order (a ``masked_select``), the shortened prompt
   numbered contiguously (the reference rebuilds ``inputs_embeds``; default ``positions="reindex"``).

``alpha`` sets the exponent (0: coverage alone).

Several crops (LLaVA-NeXT's base view and tiles, or several images of one prompt): the reference runs the vision
tower on all crops as one batch and gives each crop ``int(keep / crops)`` tokens, chosen by the greedy above inside
that crop; on LLaVA-NeXT the tiles' kept tokens are then laid out in the stitched grid's raster order after the base
view's. vlprune gives each crop (``geometry.crop``) its share of the budget in proportion to its tokens, the remainder
to the largest crops (the reference's equal share when every crop is whole), and runs the greedy inside each crop.

Deviations, each for a reason:
- Exactly ``keep`` tokens per sample: the reference's ``int(keep / crops)`` per crop drops the remainder (159 of 160
  on three crops), and on LLaVA-1.5 divides the budget by the batch size too (it runs at batch 1).
- The reference forces the ``spatial`` layout on LLaVA-NeXT (no unpadding, no ``image_newline`` tokens); vlprune
  keeps the model's layout: tiles are unpadded, so a tile's coverage counts only its tokens that reach the language
  model, and the line breaks, which the reference never feeds, are dropped first (kept only when the budget exceeds
  every other token, the first ones then).
- Similarities, gains and the saliency are computed in float32; the reference computes them in the model's float16,
  where a gain (a sum of up to N terms) is rounded to a coarse step (0.25 near 500), and its saliency comes from eager
  ``output_attentions``, which the engine recomputes from the layer's queries and keys (the tower keeps SDPA), so a
  bit-exact float16 reproduction is out of reach either way.
- A token whose features are all zero (never a CLIP patch) has similarity 0 to every token instead of NaN.
- ``COMBINED=add`` (an additive variant the code allows and no run script uses) is not offered: it adds the
  head-summed attention, a scale the head-mean row does not carry.
- Towers without a [CLS] token (SigLIP, the Qwen-VL ViTs) are refused: the reference reads the [CLS] row only, and
  neither its code nor its maintainers name a substitute.

The selection is :func:`select_scope`, a function of the features, the saliency and, on multi-crop inputs, each
token's crop, which the pruner calls and another engine can call alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan
from vlprune.pruners.groups import crop_quotas

ALPHA = 1.0  # the code's default for the ALPHA variable, and its run scripts' setting


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float if it is a valid saliency exponent: a finite number of at least 0.

    Raises:
        VlpruneError: another type, a negative number, NaN or infinity.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha < 0:
        raise VlpruneError(
            f"alpha={alpha!r} must be a finite number >= 0 (the exponent on the [CLS] attention; the reference uses "
            f"{ALPHA}, 0 selects by coverage alone)"
        )
    return float(alpha)


def cosine_similarity(features: torch.Tensor) -> torch.Tensor:
    """(B, N, F) -> (B, N, N) float32 cosine similarity between every pair of tokens."""
    values = features.float()
    unit = values / values.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return unit @ unit.transpose(1, 2)


def greedy_coverage(similarity: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """SCOPE's greedy selection.

    Args:
        similarity: (B, N, N) pairwise similarity.
        weight: (B, N) each token's factor on its coverage gain (the saliency raised to ``alpha``).
        k: tokens to choose per sample, at most N.

    Returns:
        (B, k) chosen token indices in the order they were chosen.
    """
    batch, count = similarity.shape[:2]
    rows = torch.arange(batch, device=similarity.device)
    chosen = torch.empty(batch, k, dtype=torch.long, device=similarity.device)
    taken = torch.zeros(batch, count, dtype=torch.bool, device=similarity.device)
    covered = torch.zeros(batch, count, dtype=similarity.dtype, device=similarity.device)  # c_j, per row j
    for step in range(k):
        # Candidate i's gain sums, over every token j, how much closer i is to j than j's best cover so far.
        gain = (similarity - covered[:, :, None]).clamp(min=0).sum(dim=1)
        pick = (gain * weight).masked_fill(taken, float("-inf")).argmax(dim=-1)
        chosen[:, step] = pick
        taken[rows, pick] = True
        covered = torch.maximum(covered, similarity[rows, pick])
    return chosen


@torch.no_grad()
def select_scope(
    features: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    *,
    alpha: float = ALPHA,
    crops: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCOPE's kept tokens: greedy coverage of the tokens by the kept ones, each gain weighted by saliency.

    Args:
        features: (B, N, F) each token's features at the vision feature layer (on LLaVA the projector's input).
        saliency: (B, N) the vision [CLS] query's attention to each token at that layer (head mean; on multi-crop
            inputs each token's value comes from its own crop's [CLS] row). Non-negative.
        keep: tokens kept per sample (a count in [1, N]).
        alpha: exponent on the saliency (the reference's ``ALPHA``, 1.0).
        crops: (B, N) each token's vision-tower crop (``geometry.crop``: one per image, base view or tile, counted
            over the batch; -1 for a line break) when some sample has several crops or line breaks, else None (one
            selection over all N). With crops each crop takes its share of ``keep`` in proportion to its tokens (the
            remainder to the largest crops) and runs the greedy on its own tokens; line breaks take only what is left
            when every other token is kept.

    Returns:
        (B, keep) long indices into the N tokens, ascending.

    Raises:
        VlpruneError: ``keep`` outside [1, N], a bad ``alpha``, or inputs of mismatched shapes.
    """
    alpha = check_alpha(alpha)
    batch, count = saliency.shape
    if features.shape[:2] != (batch, count) or (crops is not None and crops.shape != (batch, count)):
        shapes = f"features {tuple(features.shape)}, saliency {tuple(saliency.shape)}"
        if crops is not None:
            shapes += f", crops {tuple(crops.shape)}"
        raise VlpruneError(f"select_scope needs (B, N, F) features and (B, N) saliency and crops; got {shapes}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= count:
        raise VlpruneError(f"keep={keep!r} must be an int count in [1, {count}] (the visual tokens per sample)")
    if crops is not None:
        return _select_per_crop(features, saliency, keep, alpha, crops)
    weight = saliency.float() ** alpha
    return greedy_coverage(cosine_similarity(features), weight, keep).sort(dim=-1).values


def _select_per_crop(
    features: torch.Tensor, saliency: torch.Tensor, keep: int, alpha: float, crops: torch.Tensor
) -> torch.Tensor:
    """(B, keep) ascending: each crop's share of ``keep`` chosen by the greedy inside the crop; line breaks last."""
    rows = []
    for sample in range(saliency.shape[0]):
        crop = crops[sample].to(saliency.device)
        real = crop >= 0
        labels = torch.unique(crop[real])  # sorted: the crops in the order the tower encodes them
        group = torch.where(real, torch.searchsorted(labels, crop.clamp(min=0)) + 1, 0)  # 0: line breaks
        capacity = torch.bincount(group, minlength=len(labels) + 1)
        weights = capacity.float()
        weights[0] = 0.0
        quota = crop_quotas((weights / weights.sum().clamp(min=1.0))[None], capacity, keep)[0].tolist()
        kept = [(group == 0).nonzero()[: quota[0], 0]]
        for index in range(1, len(quota)):
            if quota[index] == 0:
                continue
            members = (group == index).nonzero()[:, 0]
            weight = saliency[sample, members].float()[None] ** alpha
            order = greedy_coverage(cosine_similarity(features[sample, members][None]), weight, quota[index])
            kept.append(members[order[0]])
        rows.append(torch.cat(kept).sort().values)
    return torch.stack(rows)


@register
@dataclass
class Scope(Pruner):
    """Options: ``alpha`` (exponent on the [CLS] attention; 1.0 as the reference)."""

    name = "scope"
    stage = Stage.PRE_LLM
    reference = "SCOPE, NeurIPS 2025 (kinredon/SCOPE)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    alpha: float = ALPHA

    def __post_init__(self) -> None:
        self.alpha = check_alpha(self.alpha)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        needs = frozenset({Need.CLS_ATTENTION, Need.VISION_FEATURES})
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=needs)]

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.vision_cls_attention is not None, "the engine supplies the [CLS] attention for scope"
        assert ctx.vision_features is not None, "the engine supplies the vision features for scope"
        geometry = ctx.geometry
        # Known on the host: more crops than samples (tiles, several images) or line breaks need the per-crop path.
        several = geometry is not None and (geometry.num_crops > ctx.batch_size or geometry.has_newlines)
        crops = geometry.crop if several else None
        keep_index = select_scope(
            ctx.vision_features, ctx.vision_cls_attention, ctx.keep, alpha=self.alpha, crops=crops
        )
        return Selection(keep_index=keep_index, scores=ctx.vision_cls_attention)
