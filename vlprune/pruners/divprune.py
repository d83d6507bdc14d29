"""DivPrune: keep the most diverse visual tokens, by greedy max-min selection on cosine distance, before the LLM.

Reference: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(arXiv 2503.02175); official code github.com/vbdi/divprune (``DivPrune`` in LLaVA's ``llava_arch.py``).

What the reference does and vlprune reproduces: on the projected visual tokens (the projector's output, the
embeddings that enter the language model) take the pairwise cosine distance ``1 - cos(z_i, z_j)``; the first token is
the most isolated one (largest distance to its nearest neighbour); each next token is the one whose distance to the
nearest already-chosen token is largest (max-min diversity); stop at ``keep`` tokens, which enter the language model
in their original order, the shortened prompt numbered contiguously (the reference rebuilds ``inputs_embeds``;
vlprune's default ``positions="reindex"``).

Deviations, each for a reason:
- The budget is the number of tokens kept (``keep``), not the reference's ``threshold_ratio``; ``keep=0.098`` is the
  ratio the reference's LLaVA-1.5 scripts use.
- Pruning happens at the input of decoder layer 0 rather than by shortening ``inputs_embeds``: every decoder layer
  sees exactly the kept tokens; ``positions="original"`` keeps the kept tokens' positions instead.
- The selection runs on all samples of a batch at once; each sample's choice depends only on its own tokens.
- Distances are computed in the features' dtype, as the reference does (float16 there): greedy max-min turns
  rounding into different choices at near-ties, so a float32 computation would select other tokens on a float16
  model. ``float32=True`` computes them in float32 instead.
- A token already chosen is never chosen again. The reference does not exclude them: it relies on a chosen token's
  own distance (the diagonal) being the smallest, which float16 rounding breaks at near-duplicates (``1 - cos(x, x)``
  rounds above a neighbour's distance), so it can choose the same token twice and keep fewer distinct tokens.

LLaVA-NeXT (the reference's ``llava_arch.py`` keeps the ``spatial_unpad`` path): one selection over the whole visual
span, the base view, the unpadded tiles and the ``image_newline`` line breaks alike, the budget a share of that
span's real length (``SUBSET_RATIO`` times it), as vlprune does for any family with a fractional ``keep``.

Qwen-VL: the reference has no Qwen path; the same rule runs on the language model's input embeddings of the image
(or video) tokens, and the kept tokens keep their multimodal positions (the only numbering vlprune offers there).

The selection is :func:`select_divprune`, a function of the projected tokens (re-exported by
:mod:`vlprune.pruners.selection`), which the pruner calls and another engine can call alike; on every family it
receives the language model's input embeddings of the visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan


def cosine_distance(features: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) ``1 - cos`` between every pair of tokens, computed in ``dtype`` (None: the features'
    own dtype, as DivPrune's reference computes it: ``x / ||x||``, one matrix product, ``1 - ...``)."""
    values = features if dtype is None else features.to(dtype)
    unit = values / values.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return 1.0 - unit @ unit.transpose(1, 2)


def greedy_max_min(
    distance: torch.Tensor, first: torch.Tensor, k: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy max-min diverse selection, optionally weighted.

    Args:
        distance: (B, N, N) pairwise distances, 0 on the diagonal.
        first: (B,) the first token of each sample.
        k: tokens to choose per sample.
        weights: (B, N) non-negative factors of each token's distance to the chosen set (ZOO-Prune's sensitivity),
            or None for plain max-min.

    Returns:
        (B, k) chosen token indices in the order they were chosen.
    """
    batch, count = distance.shape[:2]
    rows = torch.arange(batch, device=distance.device)
    chosen = torch.empty(batch, k, dtype=torch.long, device=distance.device)
    chosen[:, 0] = first
    taken = torch.zeros(batch, count, dtype=torch.bool, device=distance.device)
    taken[rows, first] = True
    to_chosen = distance[rows, first].clone()  # (B, N): distance to the nearest chosen token
    for step in range(1, k):
        gain = to_chosen if weights is None else weights * to_chosen
        pick = gain.masked_fill(taken, float("-inf")).argmax(dim=-1)
        chosen[:, step] = pick
        taken[rows, pick] = True
        to_chosen = torch.minimum(to_chosen, distance[rows, pick])
    return chosen


@register
@dataclass
class DivPrune(Pruner):
    name = "divprune"
    stage = Stage.PRE_LLM
    reference = "DivPrune, CVPR 2025 (vbdi/divprune)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    float32: bool = False

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual))]

    def select(self, ctx: StageContext) -> Selection:
        kept = select_divprune(ctx.visual_hidden, ctx.keep, float32=self.float32)
        return Selection(keep_index=kept.index, scores=kept.isolation)


class DiverseTokens(NamedTuple):
    """What :func:`select_divprune` returns."""

    index: torch.Tensor
    """(B, keep) long indices of the kept tokens, ascending."""
    isolation: torch.Tensor
    """(B, N) float32 each token's distance to its nearest other token (the first kept token has the largest)."""


def select_divprune(embeddings: torch.Tensor, keep: int, *, float32: bool = False) -> DiverseTokens:
    """DivPrune's kept tokens: greedy max-min diversity on the cosine distance between the projected tokens.

    Args:
        embeddings: (B, N, D) the visual tokens as they enter the language model (the projector's output).
        keep: tokens kept per sample (a count in [1, N]).
        float32: compute the distances in float32; False (the reference's choice) computes them in the embeddings'
            own dtype, where rounding decides near-ties as the reference's float16 run does.

    Returns:
        the kept indices and each token's isolation (:class:`DiverseTokens`).
    """
    distance = cosine_distance(embeddings, torch.float32 if float32 else None)
    # The first token is the one whose second-smallest distance (the smallest is its own, ~0) is largest: the
    # reference's topk(2, largest=False)[1], which also settles rounding of the diagonal as it does.
    isolation = torch.topk(distance, 2, dim=-2, largest=False).values[:, 1, :]
    chosen = greedy_max_min(distance, isolation.argmax(dim=-1), keep)
    return DiverseTokens(index=chosen.sort(dim=-1).values, isolation=isolation.float())
