"""TOPS: greedy relevance + diversity + coverage selection, once after the projector and twice inside the LLM.

Reference: Wang et al., "TOPS: First-Principles Visual Token Pruning via Constructing Token Optimal Preservation Sets
for Efficient MLLM Inference", arXiv 2606.27161 (June 2026). **No public code**, and the paper's full text (its
Algorithms 1-2 and Tables 9-10) was not reachable from this repository's tools: only its abstract was. vlprune
follows the method as the project's reference notes transcribe those algorithms and tables
(``shared/reference/new-methods.md`` §1.5); every choice the notes leave open is named below as a deviation.

What the method does and vlprune reproduces, with T the paper's token budget:

1. **Greedy selection** (Algorithm 1). The seed is the token of highest relevance ``r``. Then, with ``S`` the
   chosen tokens and ``C`` the candidates (every other token), each candidate ``i`` scores
   ``r̃_i + α · d̃iv_i + λ · c̃ov_i``, where ``div_i = 1 - max_{j∈S} sim(i, j)`` (how far it is from the chosen ones),
   ``cov_i = Σ_{j∉S} max(0, sim(i, j) - max_{k∈S} sim(j, k))`` (how much closer it is to each unchosen token than
   that token's best cover so far, itself included), and each term divided by its mean over the candidates (a term
   whose mean is not positive counts 0). The best candidate (the first index on ties) joins ``S``, until the stage's
   count is reached. ``sim`` is the cosine similarity, computed in float32. The coverage term is SCOPE's gain
   (:mod:`vlprune.pruners.scope`) restricted to the unchosen tokens.
2. **Stage I** (Algorithm 2), after the projector, before the first decoder layer: ``r`` = the vision tower's [CLS]
   attention at the feature layer, ``sim`` over the projected tokens, (α, λ) = (0.5, 0.5); N -> 2T tokens.
3. **Stage II**, inside the language model at layers 12 and 24 of 32 (Table 9; Qwen2.5-VL: 12 and 16 of its 28,
   Table 10), scaled to the model's depth (``round(l · L / depth)``, kept increasing and after layer 0): ``r`` = the
   attention of a dynamic "text rater" set of instruction tokens to each visual token, ``sim`` over the visual
   tokens' hidden states entering that layer, (α, λ) = (0.5, 1.0) (the 7B models'); 2T -> T, then T -> T/4.
4. The kept tokens enter in their original order and the shortened prompt is numbered contiguously after each stage
   (default ``positions="reindex"``); on Qwen-VL the kept tokens keep their multimodal positions, the only numbering
   vlprune offers there.

**Budget.** ``keep`` is the **layer-averaged** number of visual tokens, the measure vlprune's sweep compares
multi-stage methods by (as PyramidDrop, SparseVLM and VFlowOpt): T is solved so that the stages 2T, T, T/4 (each at
most N) average ``keep`` over the layers, then each count is rounded (at least 1). On LLaVA-1.5-7B the paper's T = 64
(576 -> 128 -> 64 -> 16) averages (12 · 128 + 12 · 64 + 8 · 16) / 32 = 76 tokens per layer, so ``keep=76`` runs the
paper's 64-token setting there and ``keep=64`` runs T ≈ 53.9 (108, 54, 13). A fraction is of the N visual tokens.

Choices and deviations, each with its reason:
- **Text raters** (the paper's threshold is not in the notes): the rows of the text after the first visual token
  (``QueryRows.TEXT``; the instruction) whose attention mass on the visual tokens is at least the mean mass over
  those rows; where no row passes (float rounding of equal masses), the last one. ``r`` is the raters' mean
  attention to each visual token. The rows come from layer ``K - 1``'s attention, softmax over all keys, averaged
  over heads, computed by the engine from queries and keys (no eager attention needed).
- **Similarity features**: Stage I compares the projected tokens (the stage's input, "after the projector"),
  Stage II the hidden states entering its layer; the notes name no features.
- **Multi-crop inputs** (LLaVA-NeXT, OneVision): one selection over the whole visual span, base view, tiles and line
  breaks alike, as PyramidDrop ranks them (line breaks have relevance 0 at Stage I and, being copies of one vector,
  cover each other). The paper's multi-crop handling is not in the notes.
- **Towers without [CLS]** (SigLIP, the Qwen-VL ViTs): Stage I reads the attention each token receives at the
  feature layer instead (``cls_substitute = "received"``, as VisPruner's maintainer and HoloV's Qwen file do); the
  paper reports Qwen2.5-VL and InternVL3 without, in the notes, naming its Stage I score there.
- The Qwen-VL schedule (12 and 16 of 28) applies to every family with a packed tower (Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL), scaled to the depth; the paper gives it for Qwen2.5-VL.
- Cost: from :data:`STEPWISE_FROM` tokens the greedy updates each candidate's coverage gain from the columns a
  pick changed instead of recomputing it (N x N per pick): the same sums up to float rounding, so two candidates
  within about 1e-5 of each other may swap; a gain with no positive term left is exactly 0, as recomputed (19x
  cheaper at LLaVA-NeXT's 2,928 tokens on a CPU: docs/benchmarks.md).
- Batches (the paper reports batch 1): vectorised over the batch; each sample's raters come from its own real rows
  (``query_mask``); a ragged batch is selected sample by sample by the engine.

The selection is :func:`select_tops`, a function of plain tensors the pruner calls and another engine can call alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    first_true,
    is_probe,
    resolve_keep,
)
from vlprune.pruners.pyramiddrop import layer_average
from vlprune.pruners.scope import cosine_similarity

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder layers, which Table 9's layers are of
STAGE_LAYERS = (12, 24)  # Stage II, Table 9
QWEN_DEPTH = 28  # Qwen2.5-VL-7B's decoder layers
QWEN_STAGE_LAYERS = (12, 16)  # Stage II on Qwen2.5-VL, Table 10
STAGE_SHARES = (2.0, 1.0, 0.25)  # tokens after Stage I and the two Stage II steps, in units of T
PRE_DIVERSITY, PRE_COVERAGE = 0.5, 0.5  # (α₁, λ₁)
DIVERSITY, COVERAGE = 0.5, 1.0  # (α, λ) of Stage II on the 7B models


def check_weight(name: str, value: object, default: float) -> float:
    """``value`` as a float if it is a valid term weight: a finite number of at least 0.

    Raises:
        VlpruneError: another type, a negative number, NaN or infinity; the message names the option and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise VlpruneError(f"tops: {name}={value!r} must be a finite number >= 0 (the paper uses {default})")
    return float(value)


def check_stage_layers(layers: object, depth: int) -> tuple[int, int]:
    """``layers`` as the two Stage II layers of a ``depth``-layer model: increasing ints in [1, depth - 1].

    Raises:
        VlpruneError: anything else; the message names the value.
    """
    valid = (
        isinstance(layers, list | tuple)
        and len(layers) == 2
        and all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
        and 1 <= layers[0] < layers[1] < depth
    )
    if not valid:
        raise VlpruneError(
            f"tops: layers={layers!r} must be two increasing layers in [1, {depth - 1}] of a {depth}-layer model "
            f"(Stage II; the paper uses {list(STAGE_LAYERS)} of {REFERENCE_DEPTH}, {list(QWEN_STAGE_LAYERS)} of "
            f"{QWEN_DEPTH} on Qwen2.5-VL)"
        )
    return int(layers[0]), int(layers[1])


def scaled_stage_layers(layers: tuple[int, ...], depth: int, num_layers: int) -> list[int]:
    """Layers of a ``depth``-layer model scaled to ``num_layers``, each after layer 0 and after the one before.

    Raises:
        VlpruneError: a model too shallow to hold them.
    """
    scaled, previous = [], 0
    for layer in layers:
        previous = max(round(layer * num_layers / depth), previous + 1)
        scaled.append(previous)
    if scaled[-1] >= num_layers:
        raise VlpruneError(
            f"tops: a {num_layers}-layer language model is too shallow for Stage II at {list(layers)} of {depth}: "
            f"it needs at least {len(layers) + 1} layers"
        )
    return scaled


def stage_counts(num_visual: int, keep: int, layers: list[int], num_layers: int) -> list[int]:
    """Tokens kept by Stage I (layer 0) and each Stage II layer: ``min(N, share · T)`` rounded (at least 1), with T
    solved so that they average ``keep`` visual tokens over the ``num_layers`` layers."""
    bounds = [0, *layers]

    def counts(budget: float) -> list[float]:
        return [min(float(num_visual), share * budget) for share in STAGE_SHARES]

    low, high = 0.0, num_visual / min(STAGE_SHARES)  # every count is N at the upper end: the average is N there
    for _ in range(60):
        middle = (low + high) / 2
        if layer_average(num_visual, bounds, counts(middle), num_layers) < keep:
            low = middle
        else:
            high = middle
    return [max(1, round(count)) for count in counts((low + high) / 2)]


def mean_normalised(values: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, N) ``values`` divided by their mean over each row's ``candidates``; 0 where that mean is not positive."""
    mask = candidates.to(values.dtype)
    mean = (values * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(mean > 0, values / torch.where(mean > 0, mean, 1.0), torch.zeros_like(values))


STEPWISE_FROM = 512
"""Tokens from which :func:`greedy_tops` updates its coverage gains step by step: below, recomputing them is cheaper
(on the CPU, 2026-12-07: 8.0 against 13.6 ms for 48 picks of 256 tokens; 57 against 42 ms for 128 of 576, 22.4 s
against 0.53 s for 539 of 2,928)."""


def coverage_gain(
    similarity: torch.Tensor, closest: torch.Tensor, open_columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) each token's coverage gain: the sum, over the open (unchosen) tokens j, of ``max(0, sim(i, j) -
    closest_j)``, where ``closest_j`` is j's highest similarity to a chosen token; and (B, N) how many of those terms
    are positive."""
    excess = (similarity - closest[:, None, :]).clamp(min=0) * open_columns.to(similarity.dtype)[:, None, :]
    return excess.sum(dim=-1), (excess > 0).sum(dim=-1)


def coverage_change(
    similarity: torch.Tensor, before: torch.Tensor, after: torch.Tensor, columns: torch.Tensor, pick: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) how much each token's coverage gain falls when ``pick`` is chosen, and by how many positive terms: the
    difference over the ``columns`` whose term changed (those whose closest similarity rose from ``before`` to
    ``after``, and ``pick``'s, which leaves the sum). Only those columns are read, so a step costs N x (changed
    columns), not N x N."""
    width = max(int(columns.sum(dim=-1).max()), 1)
    index, valid = first_true(columns, width)  # (B, w)
    expanded = index[:, None, :].expand(-1, similarity.shape[1], -1)
    picked = torch.gather(similarity, 2, expanded)  # (B, N, w)
    real = valid.to(picked.dtype)[:, None, :]
    old = (picked - torch.gather(before, 1, index)[:, None, :]).clamp(min=0) * real
    new = (picked - torch.gather(after, 1, index)[:, None, :]).clamp(min=0) * real
    new = new * (index != pick[:, None]).to(new.dtype)[:, None, :]  # the pick's own column leaves the sum
    return (old - new).sum(dim=-1), (old > 0).sum(dim=-1) - (new > 0).sum(dim=-1)


def greedy_tops(
    similarity: torch.Tensor, relevance: torch.Tensor, k: int, diversity: float, coverage: float
) -> torch.Tensor:
    """TOPS's greedy selection (Algorithm 1).

    From :data:`STEPWISE_FROM` tokens the coverage gains are computed once and then updated step by step from the
    columns whose term changed (:func:`coverage_change`), the same sums as recomputing them (up to float rounding) at
    a fraction of the cost once most tokens are covered; under ``torch.compile`` (whose graphs need shapes that do not
    depend on the data) and on fewer tokens they are recomputed in full each step.

    Args:
        similarity: (B, N, N) symmetric pairwise similarity.
        relevance: (B, N) each token's relevance r.
        k: tokens to choose per sample, in [1, N].
        diversity, coverage: the weights α and λ.

    Returns:
        (B, k) chosen token indices in the order they were chosen.
    """
    batch, count = relevance.shape
    rows = torch.arange(batch, device=relevance.device)
    relevance = relevance.float()
    chosen = torch.empty(batch, k, dtype=torch.long, device=relevance.device)
    chosen[:, 0] = relevance.argmax(dim=-1)
    taken = torch.zeros(batch, count, dtype=torch.bool, device=relevance.device)
    taken[rows, chosen[:, 0]] = True
    closest = similarity[rows, chosen[:, 0]]  # (B, N): each token's highest similarity to a chosen one
    incremental = coverage != 0 and count >= STEPWISE_FROM and not torch.compiler.is_compiling()
    if coverage != 0:
        gain, positive = coverage_gain(similarity, closest, ~taken)
    else:  # the term is weighted out: no N x N pass for it
        gain, positive = torch.zeros_like(relevance), torch.zeros_like(relevance, dtype=torch.long)
    for step in range(1, k):
        candidates = ~taken
        # A gain with no positive term left is exactly 0 (what a recomputation gives), not the rounding the
        # step-by-step sums leave: the mean normalisation would blow such residues up.
        exact = torch.where(positive > 0, gain, 0.0)
        score = (
            mean_normalised(relevance, candidates)
            + diversity * mean_normalised(1.0 - closest, candidates)
            + coverage * mean_normalised(exact, candidates)
        )
        pick = score.masked_fill(taken, float("-inf")).argmax(dim=-1)
        chosen[:, step] = pick
        before = closest
        closest = torch.maximum(closest, similarity[rows, pick])
        if incremental:
            columns = (closest > before) & candidates
            columns[rows, pick] = True
            gain_drop, positive_drop = coverage_change(similarity, before, closest, columns, pick)
            gain, positive = gain - gain_drop, positive - positive_drop
        taken[rows, pick] = True
        if coverage != 0 and not incremental:
            gain, positive = coverage_gain(similarity, closest, ~taken)
    return chosen


def text_raters(rows: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """(B, R) the text rater set: the real rows whose attention mass on the visual tokens is at least the mean mass
    of the sample's real rows, or, where none is (float rounding of equal masses), the last real row.

    Args:
        rows: (B, R, N) attention of the instruction's rows to the visual tokens (normalised over all keys).
        row_mask: (B, R) which rows are real.
    """
    mass = rows.float().sum(dim=-1)  # (B, R)
    real = row_mask.to(mass.dtype)
    mean = (mass * real).sum(dim=-1, keepdim=True) / real.sum(dim=-1, keepdim=True).clamp(min=1)
    raters = (mass >= mean) & row_mask
    index = torch.arange(row_mask.shape[1], device=row_mask.device).expand_as(row_mask)
    last = index.masked_fill(~row_mask, -1).amax(dim=-1, keepdim=True)  # -1: a sample without real rows
    fallback = (index == last) & ~raters.any(dim=-1, keepdim=True)
    return raters | fallback


def rater_relevance(rows: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) the text raters' (:func:`text_raters`) mean attention to each visual token; 0 for a sample without
    real rows (a prompt with no text after its image), whose selection then rests on diversity and coverage.

    Args:
        rows: (B, R, N) attention of the instruction's rows to the visual tokens; row_mask: (B, R) the real rows.
    """
    if rows.shape[1] == 0:
        return rows.new_zeros(rows.shape[0], rows.shape[2], dtype=torch.float32)
    weights = text_raters(rows, row_mask.bool()).float()[..., None]
    return (rows.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


@torch.no_grad()
def select_tops(
    features: torch.Tensor,
    keep: int,
    *,
    relevance: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    diversity: float = DIVERSITY,
    coverage: float = COVERAGE,
) -> torch.Tensor:
    """TOPS's kept tokens at one stage.

    Args:
        features: (B, N, D) what the similarities are computed on (Stage I: the projected tokens; Stage II: the
            hidden states entering the stage's layer).
        keep: tokens kept per sample (a count in [1, N]).
        relevance: (B, N) each token's relevance (Stage I: the [CLS] attention, or the received attention on towers
            without [CLS]); or, for Stage II, None with ``rows`` given.
        rows: (B, R, N) attention of the instruction's rows to the visual tokens (Stage II); the text raters among
            them (:func:`text_raters`) give the relevance.
        row_mask: (B, R) which of ``rows`` are real (padding rows repeat a real one); None: all.
        diversity, coverage: the weights α and λ (defaults: Stage II's 0.5 and 1.0; Stage I uses 0.5 and 0.5).

    Returns:
        (B, keep) long indices into the N tokens, ascending.

    Raises:
        VlpruneError: ``keep`` outside [1, N], not exactly one of ``relevance`` and ``rows``, bad weights, or inputs
            of mismatched shapes.
    """
    diversity = check_weight("diversity", diversity, DIVERSITY)
    coverage = check_weight("coverage", coverage, COVERAGE)
    batch, count = features.shape[:2]
    if (relevance is None) == (rows is None):
        raise VlpruneError("select_tops needs exactly one of relevance (B, N) and rows (B, R, N)")
    if rows is not None:
        if row_mask is None:
            row_mask = torch.ones(rows.shape[:2], dtype=torch.bool, device=rows.device)
        if rows.dim() != 3 or rows.shape[0] != batch or rows.shape[2] != count or row_mask.shape != rows.shape[:2]:
            raise VlpruneError(
                f"select_tops needs (B, N, D) features, (B, R, N) rows and a (B, R) row mask; got features "
                f"{tuple(features.shape)}, rows {tuple(rows.shape)}, row mask {tuple(row_mask.shape)}"
            )
        relevance = rater_relevance(rows, row_mask)
    elif relevance.shape != (batch, count):
        raise VlpruneError(
            f"select_tops needs (B, N, D) features and (B, N) relevance; got features {tuple(features.shape)}, "
            f"relevance {tuple(relevance.shape)}"
        )
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= count:
        raise VlpruneError(f"keep={keep!r} must be an int count in [1, {count}] (the visual tokens per sample)")
    if keep == count:
        return torch.arange(count, device=features.device).expand(batch, -1)
    chosen = greedy_tops(cosine_similarity(features), relevance.to(features.device), keep, diversity, coverage)
    return chosen.sort(dim=-1).values


@register
@dataclass
class TOPS(Pruner):
    """Options: ``diversity`` and ``coverage`` (Stage II's α and λ, 0.5 and 1.0), ``pre_diversity`` and
    ``pre_coverage`` (Stage I's, 0.5 and 0.5), ``layers`` (the two Stage II layers of a 32-layer model, or of a
    28-layer one on Qwen-VL); ``keep`` is the layer-averaged number of visual tokens."""

    name = "tops"
    stage = Stage.PRE_LLM
    reference = "TOPS, arXiv 2606.27161 (from the paper; no public code)"
    default_positions = "reindex"  # the paper re-indexes the kept tokens' positions contiguously from 0
    cls_substitute = "received"  # towers without [CLS]: the attention each token receives

    diversity: float = DIVERSITY
    coverage: float = COVERAGE
    pre_diversity: float = PRE_DIVERSITY
    pre_coverage: float = PRE_COVERAGE
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        self.diversity = check_weight("diversity", self.diversity, DIVERSITY)
        self.coverage = check_weight("coverage", self.coverage, COVERAGE)
        self.pre_diversity = check_weight("pre_diversity", self.pre_diversity, PRE_DIVERSITY)
        self.pre_coverage = check_weight("pre_coverage", self.pre_coverage, PRE_COVERAGE)
        if self.layers is not None:  # checked against the larger reference depth; plan checks the family's
            check_stage_layers(self.layers, REFERENCE_DEPTH)

    def schedule(self, num_visual: int, num_layers: int, qwen: bool = False) -> tuple[list[int], list[int]]:
        """(Stage II layers, tokens kept by Stage I and each Stage II layer) for this model; ``qwen``: Table 10's
        layers (of 28) instead of Table 9's (of 32)."""
        depth = QWEN_DEPTH if qwen else REFERENCE_DEPTH
        layers = QWEN_STAGE_LAYERS if qwen else STAGE_LAYERS
        if self.layers:
            layers = check_stage_layers(self.layers, depth)
        scaled = scaled_stage_layers(layers, depth, num_layers)
        if is_probe(num_visual):
            return scaled, [num_visual] * (len(scaled) + 1)
        keep = resolve_keep(self._required_keep(num_visual), num_visual)
        return scaled, stage_counts(num_visual, keep, scaled, num_layers)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return self._plan(num_visual, num_layers, qwen=False)

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        return self._plan(num_visual, num_layers, qwen=traits.packed_tower)

    def _plan(self, num_visual: int, num_layers: int, qwen: bool) -> list[StagePlan]:
        layers, counts = self.schedule(num_visual, num_layers, qwen)
        first = StagePlan(layer=0, keep=counts[0], needs=frozenset({Need.CLS_ATTENTION}))
        return [first] + [
            StagePlan(layer=layer, keep=count, query_rows=QueryRows.TEXT)
            for layer, count in zip(layers, counts[1:], strict=True)
        ]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        if ctx.layer == 0:
            relevance = ctx.vision_cls_attention
            if relevance is None:
                relevance = ctx.vision_received_attention
            assert relevance is not None, "the engine supplies the [CLS] attention (or its substitute) for tops"
            keep_index = select_tops(
                ctx.visual_hidden,
                ctx.keep,
                relevance=relevance,
                diversity=self.pre_diversity,
                coverage=self.pre_coverage,
            )
            return Selection(keep_index=keep_index, scores=relevance)
        assert ctx.query_attention is not None and ctx.query_mask is not None, "the engine supplies the text rows"
        relevance = rater_relevance(ctx.query_attention, ctx.query_mask)
        keep_index = select_tops(
            ctx.visual_hidden, ctx.keep, relevance=relevance, diversity=self.diversity, coverage=self.coverage
        )
        return Selection(keep_index=keep_index, scores=relevance)
