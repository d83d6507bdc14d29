"""PyramidDrop: drop visual tokens in stages inside the language model, by the last instruction token's attention.

Reference: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction", CVPR 2025 (arXiv 2410.17247); official code github.com/Cooperx521/PyramidDrop
(``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``, ``pdrop_rank_drop``).

What the reference does and vlprune reproduces: at the input of decoder layers ``[8, 16, 24]`` (of 32), with that
layer's own queries and keys computed from its input, take the attention row of the last prompt token (the last
instruction token at inference), softmax over all keys, average over heads, and keep the top visual tokens in their
original order. Stage ``s`` keeps ``int(N · ratio_s)`` of the N original visual tokens, ratios ``[0.5, 0.25, 0.125]``
(λ = 0.5): 576 -> 288 -> 144 -> 72, 270 tokens per layer on average.

Budgets: the repository's scripts all use the default above (``scripts/v1_5/pdrop_eval/*.sh``: ``--layer_list
'[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"``), whose layers cannot go below N/4 tokens on average (its
issue #10). The only published setting for a LLaVA-1.5 budget is the maintainer's answer in issue #29 for 64 tokens:
keep the λ, λ², λ³ structure and solve λ for the layer-averaged budget, with stages at layers ``[2, 8, 16]`` (λ = 0.19:
576 · (2 + 6λ + 8λ² + 16λ³) / 32 ≈ 64). With ``keep`` given, vlprune applies that recipe to every budget (λ = 0.192 /
0.420 / 0.560 for 64 / 128 / 192 of 576: stages of 110, 21, 4 / 241, 101, 42 / 322, 180, 100 tokens; no setting for 128
or 192 is published), with one floor: no stage keeps fewer than ``ceil(N / 144)`` tokens (4 of 576, the size of the last
stage of the maintainer's own 64-token recipe, 576 · 0.19³ ≈ 3.95), so a small budget never ends in a single token; λ is
solved with the floor counted. ``keep=None`` gives the reference's own default. ``layers`` and ``ratios`` set a schedule
explicitly. Layers scale with the model's depth (``round(l · L / 32)``).

Deviations, each for a reason:
- Kept tokens are renumbered contiguously after each stage by default, as the reference does (``pdrop_rank_drop``:
  ``position_ids = arange``); ``positions="original"`` keeps their positions, which makes pruning equal to masking.
- The attention row is computed by the engine from the layer's queries and keys (any attention backend), with
  grouped-query attention handled (the reference assumes as many key heads as query heads).
- Batches of more than one sample work; each sample is scored on its own last token.

LLaVA-NeXT (the reference's ``scripts/v1_6`` use the same layers and ratios): each stage ranks the whole visual span,
base view, tiles and line breaks alike, and keeps ``int(N · ratio)`` of it, as on LLaVA-1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

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

REFERENCE_DEPTH = 32
DEFAULT_LAYERS = (8, 16, 24)
DEFAULT_RATIOS = (0.5, 0.25, 0.125)
BUDGET_LAYERS = (2, 8, 16)  # the maintainer's 64-token recipe (issue #29)
FLOOR_DIVISOR = 144  # no stage below ceil(N / 144): 4 of 576, the last stage of that recipe (576 · 0.19³ ≈ 3.95)


def stage_floor(num_visual: int) -> int:
    """The fewest tokens a budgeted stage keeps: ``ceil(N / 144)``."""
    return max(1, -(-num_visual // FLOOR_DIVISOR))


def scaled_layers(layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Reference layer indices (of a 32-layer model) scaled to ``num_layers``, kept strictly increasing."""
    scaled, previous = [], -1
    for layer in layers:
        value = max(round(layer * num_layers / REFERENCE_DEPTH), previous + 1)
        scaled.append(value)
        previous = value
    if scaled[-1] >= num_layers:
        raise VlpruneError(f"a {num_layers}-layer language model is too shallow for stages at {list(layers)} of 32")
    return scaled


def layer_average(num_visual: int, layers: list[int], counts: list[int], num_layers: int) -> float:
    """Visual tokens per decoder layer on average when stage s keeps ``counts[s]`` from ``layers[s]`` on."""
    bounds = [0, *layers, num_layers]
    per_stage = [num_visual, *counts]
    return sum(n * (bounds[i + 1] - bounds[i]) for i, n in enumerate(per_stage)) / num_layers


def geometric_ratio(num_visual: int, keep: int, layers: list[int], num_layers: int, floor: int = 0) -> float:
    """λ such that stages keeping ``max(floor, N · λ^s)`` (s = 1, 2, ...) average ``keep`` visual tokens per layer."""

    def average(ratio: float) -> float:
        counts = [max(floor, num_visual * ratio ** (s + 1)) for s in range(len(layers))]
        return layer_average(num_visual, layers, counts, num_layers)

    low, high = 0.0, 1.0
    if not average(low) <= keep <= num_visual:
        raise VlpruneError(
            f"keep={keep} is below the {average(low):.0f} tokens per layer that stages at layers {layers} allow; "
            "pass layers=[...] with an earlier first stage"
        )
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < keep else (low, middle)
    return (low + high) / 2


@register
@dataclass
class PyramidDrop(Pruner):
    """Options: ``layers`` (stage layers of a 32-layer model) and ``ratios`` (share of the N original tokens each
    stage keeps); ``keep`` is the layer-averaged number of visual tokens."""

    name = "pyramiddrop"
    stage = Stage.IN_LLM
    reference = "PyramidDrop, CVPR 2025 (Cooperx521/PyramidDrop)"
    default_positions = "reindex"  # pdrop_rank_drop renumbers with arange after each stage

    layers: list[int] | None = None
    ratios: list[float] | None = None

    def reference_layers(self) -> tuple[int, ...]:
        """Stage layers of a 32-layer model: ``layers``, else the budget schedule's or the reference default's."""
        if self.layers:
            return tuple(self.layers)
        return BUDGET_LAYERS if self.keep is not None and self.ratios is None else DEFAULT_LAYERS

    def schedule(self, num_visual: int, num_layers: int) -> tuple[list[int], list[int]]:
        """(stage layers, tokens kept at each) for this model."""
        layers = scaled_layers(self.reference_layers(), num_layers)
        if self.ratios is not None:
            if len(self.ratios) != len(layers) or not all(0 < r <= 1 for r in self.ratios):
                raise VlpruneError(f"ratios={self.ratios} must hold one value in (0, 1] per stage layer {layers}")
            return layers, [max(1, int(num_visual * r)) for r in self.ratios]
        if self.keep is None:
            if len(layers) != len(DEFAULT_RATIOS):
                raise VlpruneError(f"layers={self.layers} needs ratios=[...] (the default ratios are for 3 stages)")
            return layers, [max(1, int(num_visual * r)) for r in DEFAULT_RATIOS]
        keep = resolve_keep(self.keep, num_visual)
        floor = stage_floor(num_visual)
        ratio = geometric_ratio(num_visual, keep, layers, num_layers, floor)
        return layers, [max(floor, int(num_visual * ratio ** (s + 1))) for s in range(len(layers))]

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        if is_probe(num_visual):
            layers = scaled_layers(self.reference_layers(), num_layers)
            counts = [num_visual] * len(layers)
        else:
            layers, counts = self.schedule(num_visual, num_layers)
        return [
            StagePlan(layer=layer, keep=count, query_rows=QueryRows.LAST, needs=frozenset({Need.OWN_LAYER_ATTENTION}))
            for layer, count in zip(layers, counts, strict=True)
        ]

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.query_attention is not None, "the engine supplies the last token's attention for pyramiddrop"
        scores = ctx.query_attention[:, -1, :]
        return Selection(keep_index=top_k_sorted(scores, ctx.keep), scores=scores)
