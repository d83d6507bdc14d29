"""DivPrune: keep the most diverse visual tokens, by greedy max-min selection on cosine distance, before the LLM.

Reference: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(arXiv 2503.02175); official code github.com/vbdi/divprune (``DivPrune`` in LLaVA's ``llava_arch.py``).

What the reference does and vlprune reproduces: on the projected visual tokens (the projector's output, the
embeddings that enter the language model) take the pairwise cosine distance ``1 - cos(z_i, z_j)``; the first token is
the most isolated one (largest distance to its nearest neighbour); each next token is the one whose distance to the
nearest already-chosen token is largest (max-min diversity); stop at ``keep`` tokens, which enter the language model
in their original order at their original positions.

Deviations, each for a reason:
- The budget is the number of tokens kept (``keep``), not the reference's ``threshold_ratio``; ``keep=0.098`` is the
  ratio the reference's LLaVA-1.5 scripts use.
- Pruning happens at the input of decoder layer 0 rather than by shortening ``inputs_embeds``: every decoder layer
  sees exactly the kept tokens; positions stay the original ones unless ``positions="reindex"`` is asked for.
- The selection runs on all samples of a batch at once; each sample's choice depends only on its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) ``1 - cos`` between every pair of tokens, in float32."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def nearest_neighbour_distance(distance: torch.Tensor) -> torch.Tensor:
    """(B, N, N) -> (B, N) each token's distance to its nearest other token."""
    eye = torch.eye(distance.shape[-1], dtype=torch.bool, device=distance.device)
    return distance.masked_fill(eye, float("inf")).amin(dim=-1)


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

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual))]

    def select(self, ctx: StageContext) -> Selection:
        distance = cosine_distance(ctx.visual_hidden)
        isolation = nearest_neighbour_distance(distance)
        chosen = greedy_max_min(distance, isolation.argmax(dim=-1), ctx.keep)
        return Selection(keep_index=chosen.sort(dim=-1).values, scores=isolation)
