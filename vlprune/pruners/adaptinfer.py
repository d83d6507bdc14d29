"""AdaptInfer: text-guided progressive pruning inside the language model, the text tokens weighted by their own
text-to-text attention.

Reference: Zhang et al., "AdaptInfer: Adaptive Token Pruning for Vision-Language Model Inference with Dynamical Text
Guidance", arXiv 2508.06084; code github.com/weiczh02/AdaptInfer-base (by the paper's authors; its LLaVA code is a fork
of SparseVLM): ``llava/model/language_model/score.py`` (``attn_postprocess_topk_with_t2t_weighting``,
``sparse_token_dict``, ``pruning_loc``) and ``modelling_sparse_llama.py``. Reported: 61.3% lower CUDA latency at 92.9%
average accuracy on LLaVA-1.5-7B (abstract v1; v2 says 93.1%).

What the reference does and vlprune reproduces (LLaVA-1.5-7B, 32 layers):

1. **Stages** after decoder layers ``pruning_loc = [1, 10, 20]`` (0-indexed): that layer runs on every token, its own
   attention scores the visual tokens, and its output is cut. In vlprune's numbering these are stages at layers
   ``[2, 11, 21]`` scored with the attention of layers 1, 10 and 20.
2. **Scores**, per sample, from ``A``, each head's softmax attention (over all keys) of the text rows, every token
   after the image (the question and the template's tail; the system prompt is not among them: QueryRows.TEXT):
   each text token ``j`` gets the weight ``w_h[j] = sum_i A_h[i, j] + sum_k A_h[j, k] - A_h[j, j]`` (over text
   ``i, k``: the column sums of ``t2t + t2tᵀ - diag``, the attention it receives plus the attention it pays), and
   visual token ``v`` the score ``sum_h sum_j w_h[j] A_h[j, v]`` (heads summed, not averaged). No normalisation of
   ``w``: the reference's default ``lb = 1`` turns its uniform-mixing term off.
3. **Selection**: the top tokens by score stay, in their original order; the rest are dropped. The merging branch the
   code inherits from SparseVLM never runs (``s_flag = 0``), so nothing is recycled.
4. **Counts** per stage from ``sparse_token_dict`` for 576 visual tokens, keyed by the layer-averaged budget:
   32 -> [40, 12, 0], 48 -> [80, 24, 2], 64 -> [133, 27, 3], 128 -> [290, 72, 18] (no 192 row), each capped at
   ``N - 1`` as in the reference.

The layers were chosen offline (``prepocess.py``): for the 58 most-attended visual tokens of each of 1,000 MME
samples, ruptures' Binseg (l2 cost, one breakpoint) on the cumulative layer-wise text-to-visual attention gives a
change point, and the histogram of those picks the layers. vlprune does not re-run that analysis for other models;
it scales the reference's layers.

Choices and deviations, each with its reason:
- Budgets other than the table's interpolate it linearly on the budget (of 576 tokens): between two rows, each
  stage's count is linear between them; below 32 the 32 row scaled by ``budget / 32``; above 128 towards no pruning
  at 576 (``c + (budget - 128) / 448 · (576 - c)`` per stage). Other token counts convert the budget to 576 tokens
  (``keep · 576 / N``) and scale the counts back by ``N / 576``, rounded. ``keep`` is a count or a fraction of N.
- Every count from the table is clamped to at least 1 (and at most ``N - 1``): the engine needs at least one visual
  token, so the 32 row's last stage keeps 1 token where the reference keeps none.
- Layers scale with the model's depth: scoring layer ``round(l · L / 32)``, at least 1 and strictly increasing, the
  stage at the layer after it (a model too shallow for three stages is refused). ``layers=[...]`` sets the stage
  layers directly, in vlprune's numbering (the layer whose input is pruned, scored with the one before it), and
  ``schedule=[...]`` the tokens kept at each stage directly, as counts of the model's own visual tokens (not of 576);
  a schedule overrides ``keep``.
- The budget is the reference's layer-averaged count, which counts each pruning layer at its post-pruning size
  (64 -> (576 + 9·133 + 10·27 + 12·3) / 32 ≈ 65). The engine's statistics count the pruned layer at its input size,
  so they report more for the same schedule (≈ 83 for keep=64 on LLaVA-1.5-7B).
- The attention rows come from the engine's attention wrapper (any backend, no eager L x L map; the same softmax
  values), and batches of more than one sample work (the reference is batch 1): padded text rows get no weight and
  are left out of every sum, as rows and as columns.
- Positions: the reference renumbers RoPE positions contiguously after each cut (``position_ids[:, :kept]``), so
  ``default_positions`` is "reindex" and ``vlprune.attach(positions=None)`` follows it; ``positions="original"``
  keeps each kept token's position instead (the mode in which dropping equals masking).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

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
    check_layer,
    is_probe,
    resolve_keep,
    top_k_sorted,
)
from vlprune.pruners.schedules import interpolated_schedule

REFERENCE_TOKENS = 576
REFERENCE_DEPTH = 32
SCORE_LAYERS = (1, 10, 20)  # pruning_loc: the layers whose attention scores and whose output is cut (0-indexed)
SCHEDULES = {32: (40, 12, 0), 48: (80, 24, 2), 64: (133, 27, 3), 128: (290, 72, 18)}  # sparse_token_dict, 7B


def reference_schedule(budget: float) -> tuple[float, ...]:
    """Tokens kept per stage of a 576-token model for a layer-averaged ``budget``: the reference's table, linear
    between its rows, the 32 row scaled below 32, and towards no pruning (576) above 128."""
    return interpolated_schedule(SCHEDULES, budget, REFERENCE_TOKENS)


def default_stage_layers(num_layers: int) -> list[int]:
    """Stage layers for a ``num_layers``-deep model: the reference's scoring layers [1, 10, 20] of 32 scaled
    (``round(l · L / 32)``, at least 1, strictly increasing), each stage at the layer after its scoring layer."""
    stages, previous = [], 0
    for layer in SCORE_LAYERS:
        scoring = max(round(layer * num_layers / REFERENCE_DEPTH), previous + 1)
        stages.append(scoring + 1)
        previous = scoring
    if stages[-1] >= num_layers:
        raise VlpruneError(
            f"adaptinfer needs a deeper language model than {num_layers} layers for stages after layers "
            f"{list(SCORE_LAYERS)} of 32 (it would prune before layer {stages[-1]}); pass layers=[...]"
        )
    return stages


def text_guided_scores(
    visual_attention: torch.Tensor, text_attention: torch.Tensor, row_mask: torch.Tensor
) -> torch.Tensor:
    """(B, N) AdaptInfer's visual-token scores.

    visual_attention: (B, H, R, N) attention of the R text rows to the visual tokens; text_attention: (B, H, R, R)
    attention of the text rows to the text rows' tokens; row_mask: (B, R) real rows. Each text token j weighs
    ``sum_i A[i, j] + sum_k A[j, k] - A[j, j]`` per head (real rows and columns only), and a visual token scores the
    weighted sum of the text rows' attention to it, summed over heads.
    """
    real = row_mask.to(torch.float32)
    pair = real[:, None, :, None] * real[:, None, None, :]  # (B, 1, R, R): real row and real column
    t2t = text_attention.float() * pair
    received = t2t.sum(dim=2)  # (B, H, R): column sums, the attention token j receives
    paid = t2t.sum(dim=3)  # row sums, the attention row j pays to the text
    weight = (received + paid - t2t.diagonal(dim1=-2, dim2=-1)) * real[:, None, :]
    return (weight[..., None] * visual_attention.float()).sum(dim=(1, 2))


@register
@dataclass
class AdaptInfer(Pruner):
    """Options: ``layers`` (the stage layers, vlprune's numbering; default [2, 11, 21] of 32, scaled), ``schedule``
    (visual tokens kept at each stage, counts of the model's own tokens; overrides ``keep``); ``keep`` is the
    layer-averaged budget of the reference's table."""

    name = "adaptinfer"
    stage = Stage.IN_LLM
    reference = "AdaptInfer, arXiv 2508.06084 (weiczh02/AdaptInfer-base)"
    default_positions = "reindex"  # the reference renumbers contiguously after each cut: position_ids[:, :kept]

    layers: list[int] | None = None
    schedule: list[int] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and not self.layers:
            raise VlpruneError("layers=[] for adaptinfer must name at least one stage layer")
        if self.schedule is not None:
            if not self.schedule:
                raise VlpruneError("schedule=[] for adaptinfer must give at least one count")
            for count in self.schedule:
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise VlpruneError(
                        f"schedule={self.schedule} for adaptinfer must hold int counts of at least 1, got {count!r}"
                    )
            if any(b > a for a, b in itertools.pairwise(self.schedule)):
                raise VlpruneError(
                    f"schedule={self.schedule} for adaptinfer must not increase: a stage can only keep tokens the "
                    f"stage before it kept"
                )

    def stage_layers(self, num_layers: int) -> list[int]:
        """The layers whose input each stage prunes."""
        if self.layers is None:
            return default_stage_layers(num_layers)
        # Layer 0 has no earlier attention to score with, so stages start at layer 1.
        layers = [check_layer(layer, num_layers, minimum=1, method=self.name) for layer in self.layers]
        if any(b <= a for a, b in itertools.pairwise(layers)):
            raise VlpruneError(f"layers={self.layers} for adaptinfer must be strictly increasing")
        return layers

    def stage_counts(self, num_visual: int) -> list[int]:
        """Visual tokens kept at each stage for a model with ``num_visual`` of them."""
        if self.schedule is not None:
            if self.schedule[0] > num_visual:
                raise VlpruneError(
                    f"schedule={self.schedule} for adaptinfer keeps more than the model's {num_visual} visual tokens"
                )
            return list(self.schedule)
        budget = resolve_keep(self._required_keep(num_visual), num_visual) * REFERENCE_TOKENS / num_visual
        counts = [c * num_visual / REFERENCE_TOKENS for c in reference_schedule(budget)]
        return [max(1, min(num_visual - 1, round(c))) for c in counts]

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        layers = self.stage_layers(num_layers)
        if self.schedule is not None and len(self.schedule) != len(layers):
            raise VlpruneError(f"schedule={self.schedule} for adaptinfer needs one count per stage layer {layers}")
        if self.schedule is None and len(layers) != len(SCORE_LAYERS):
            raise VlpruneError(
                f"layers={self.layers} for adaptinfer: its budget table has {len(SCORE_LAYERS)} counts, one per "
                f"default stage; pass schedule=[...] with one count per layer"
            )
        counts = [num_visual] * len(layers) if is_probe(num_visual) else self.stage_counts(num_visual)
        return [
            StagePlan(
                layer=layer,
                keep=count,
                query_rows=QueryRows.TEXT,
                needs=frozenset({Need.PER_HEAD_ATTENTION, Need.QUERY_ROW_ATTENTION}),
            )
            for layer, count in zip(layers, counts, strict=True)
        ]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        assert ctx.query_attention is not None and ctx.query_row_attention is not None and ctx.query_mask is not None
        scores = text_guided_scores(ctx.query_attention, ctx.query_row_attention, ctx.query_mask)
        return Selection(keep_index=top_k_sorted(scores, ctx.keep), scores=scores)
