"""SparseVLM: text-guided progressive pruning inside the language model, with recycling of pruned tokens.

Reference: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
ICML 2025 (arXiv 2410.04417); official code github.com/Gumpest/SparseVLMs (v1.5 code on ``main``:
``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``).

What the reference does and vlprune reproduces (LLaVA-1.5-7B, 32 layers):

1. **Raters**, chosen once from the language model's input embeddings: with ``V`` the visual embeddings and ``T``
   those of the text after the image, ``r = mean_visual(softmax_text(V Tᵀ))`` (no 1/√d); the raters are the text
   tokens with ``r`` above its mean.
2. **Stages** after layers ``[2, 6, 15]``: that layer runs on every token, its attention (softmax over all keys,
   averaged over heads) from the raters to the visual tokens is averaged over the raters, and the top visual tokens
   stay, in their original order, for the layers after it. Tokens kept per stage follow the reference's v1.5 tables:
   192 -> [300, 200, 110], 128 -> [303, 110, 36], 96 -> [238, 48, 26], 64 -> [66, 30, 17], where ``keep`` is the
   layer-averaged budget (``RETAIN_TOKN``).
3. **Recycling**: of the pruned tokens, the ``int(0.3 · n) + 1`` with the highest relevance are clustered by
   density-peak clustering (DPC-KNN: distances ``||x_i - x_j|| / √D``, density ``exp(-mean of squared distances to
   the k nearest, k = clusters)``, ``δ`` = distance to the nearest denser token, centres = top ``δ · density``, each
   token to its nearest centre) into ``int(m / 10) + 1`` tokens, each the mean of its cluster; they enter right after
   the kept visual tokens and are visual tokens for the next stage.

Choices and deviations, each with its reason:
- Budgets other than 64/96/128/192 of 576 interpolate the tables linearly (below 64 the 64 row scaled, above 192
  towards no pruning at 576); other token counts scale the tables by ``N / 576``. Layers scale with the depth
  (``round(l · L / 32)``). ``schedule=[...]`` and ``layers=[...]`` set them directly.
- Positions follow the reference by default: v1.5 renumbers the shortened sequence contiguously after each stage
  (``position_ids[:, :len(kept)]``), SparseVLM+ keeps the kept tokens' ids; ``positions="original"`` keeps every
  kept token's position (a merged token then takes its cluster centre's), which makes pruning equal to masking.
- The rater relevance is computed in float32 (the reference uses float16), and tokens of equal density are ordered by
  index where the reference adds unseeded noise of 1e-6 (which makes its runs irreproducible).
- The attention rows come from the layer's queries and keys (any attention backend; the reference materialises
  every layer's full attention map). Batches of more than one sample work (the reference is batch 1).
- SparseVLM+ (``version=2``, the reference's ``USE_VERSION=2_0``): attention divided by the RoPE "gravity" of
  all-ones queries and keys at the true positions (no guard against small values, as in the reference), the 14
  priority heads of 32 (scaled to the model's head count: ``round(14 · H / 32)``), its own budget tables, no
  recycling, original positions.
- ``rule="rank"``: the first version's count per stage, ``min(int(rank(P) · scale + bias), N - 1)`` with ``P`` the
  raters' attention to the visual tokens and (scale, bias) = (0.8, 0), (9, 6), (13.5, 0) for 64, 128, 192 (the
  nearest of them for other budgets), at its layers [2, 6, 15, 19]. Each sample of a batch gets its own count, as
  in the reference's one-sample-at-a-time runs (the engine runs a stage whose count the data decides per sample).
- LLaVA-NeXT, OneVision and Qwen-VL: the LLaVA-1.5 rules and budget tables run over the whole visual sequence. The
  official code has no path for them: every branch (main, v1.5, v2.0, video at 26a5f48) holds LLaVA-1.5 and
  Video-LLaVA only, with 576 tokens hard-coded, and the repository's requests for Qwen code are unanswered (its
  issues 20 and 27). On Qwen-VL the raters are the text after the first visual token, kept tokens keep their
  multimodal positions (as SparseVLM+ keeps position ids) and recycled ones get text-like ones; SparseVLM+'s
  priority heads scale to the model's head count and its RoPE gravity is that of 1-D RoPE over the positions' text
  row (the sequence index), not of the multimodal (t, h, w) rotation: no reference defines it there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlprune.errors import VlpruneError
from vlprune.kernels import gather_tokens, merge_tokens
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import (
    Pruner,
    QueryRows,
    RecycledTokens,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    first_true,
    is_probe,
    resolve_keep,
    top_k_sorted,
)
from vlprune.pruners.pyramiddrop import scaled_layers
from vlprune.pruners.schedules import interpolated_schedule

REFERENCE_TOKENS = 576
PRUNE_AFTER = (2, 6, 15)
SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
SCHEDULES_V2 = {64: (66, 34, 20), 96: (246, 54, 28), 128: (238, 108, 60), 192: (300, 200, 118)}
PRIORITY_HEADS = 14  # of LLaVA-1.5-7B's 32 heads, hard-coded in the reference
PRUNE_AFTER_V1 = (2, 6, 15, 19)
RANK_RULE = {64: (0.8, 0), 128: (9.0, 6), 192: (13.5, 0)}  # budget -> (scale, bias) of the first version's rule
RECYCLED_SHARE = 0.3
TOKENS_PER_CLUSTER = 10


def reference_schedule(budget: float, version: int = 1) -> tuple[float, ...]:
    """Tokens kept per stage for a layer-averaged ``budget`` of 576, from the reference's tables."""
    return interpolated_schedule(SCHEDULES if version == 1 else SCHEDULES_V2, budget, REFERENCE_TOKENS)


def rope_gravity(
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """(B, R, N) SparseVLM+'s RoPE "gravity": the attention logit that all-ones queries and keys get at these
    positions, ``RoPE(1)_i · RoPE(1)_j / √d``, a function of the relative position only."""
    cos_q, sin_q = rotary(query_positions)
    cos_k, sin_k = rotary(key_positions)
    dim = cos_q.shape[-1]
    half = torch.cat([-torch.ones(dim // 2), torch.ones(dim - dim // 2)]).to(cos_q.device)  # rotate_half(ones)
    query = cos_q.float() + half * sin_q.float()
    key = cos_k.float() + half * sin_k.float()
    return query @ key.transpose(1, 2) / math.sqrt(dim)


def priority_head_relevance(
    attention: torch.Tensor, raters: torch.Tensor, gravity: torch.Tensor, heads: int
) -> torch.Tensor:
    """(B, N) SparseVLM+'s relevance: per-head attention (B, H, T, N) divided by the RoPE gravity (B, T, N), the
    ``heads`` heads with the most rater-to-visual attention, averaged, then averaged over the raters."""
    corrected = attention / gravity[:, None]
    weights = raters.float()[:, None, :, None]
    per_head = (corrected * weights).sum(dim=(2, 3))  # (B, H)
    chosen = per_head.topk(min(heads, per_head.shape[1]), dim=-1).indices
    picked = torch.gather(corrected, 1, chosen[:, :, None, None].expand(-1, -1, *corrected.shape[2:]))
    return rater_relevance(picked.mean(dim=1), raters)


def select_raters(visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) the text tokens whose relevance to the image is above the mean (SparseVLM's raters).

    visual: (B, N, D) input embeddings of the visual tokens; text: (B, T, D) of the text; text_mask: (B, T).
    """
    logits = visual.float() @ text.float().transpose(1, 2)  # (B, N, T), no 1/sqrt(d) as in the reference
    logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
    relevance = torch.softmax(logits, dim=-1).mean(dim=1)  # (B, T)
    mean = (relevance * text_mask).sum(dim=-1, keepdim=True) / text_mask.sum(dim=-1, keepdim=True)
    return (relevance > mean) & text_mask


def rater_relevance(attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """(B, N) attention of the raters (B, T) to the visual tokens, averaged over raters. attention: (B, T, N)."""
    weights = raters.float()[..., None]
    return (attention * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def pairwise_distance(values: torch.Tensor) -> torch.Tensor:
    """(B, M, D) -> (B, M, M) Euclidean distances from the differences themselves, as the reference computes them
    (``(x1 - x2).norm(dim=-1)``): exactly 0 on the diagonal, where ``cdist``'s matrix-product shortcut leaves rounding
    errors (4e-4 on a 154-token input) that move the density peaks. Unlike the reference's broadcast it never holds
    the (B, M, M, D) differences."""
    return torch.cdist(values, values, compute_mode="donot_use_mm_for_euclid_dist")


def density_peak_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of (B, M, D) tokens into ``clusters`` groups, each replaced by its mean.

    Returns (B, C, D) merged tokens and (B, C) the index of each cluster's centre among the M tokens.
    """
    values = tokens.float()
    count = values.shape[1]
    distance = pairwise_distance(values) / math.sqrt(values.shape[-1])  # (B, M, M)
    neighbours = distance.topk(min(clusters, count), dim=-1, largest=False).values
    density = (-(neighbours**2).mean(dim=-1)).exp()  # (B, M)
    # [b, i, j]: token j is denser than token i. Equal densities (identical neighbourhoods) are ordered by index, as
    # the reference orders them by random noise: otherwise tied tokens are all "peaks" and take every centre.
    index = torch.arange(count, device=tokens.device)
    tie = (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None])
    denser = (density[:, None, :] > density[:, :, None]) | tie
    farthest = distance.flatten(1).amax(dim=-1)[:, None, None]
    delta = torch.where(denser, distance, farthest).amin(dim=-1)
    centres = (delta * density).topk(clusters, dim=-1).indices  # (B, C)
    to_centres = torch.gather(distance, 1, centres[..., None].expand(-1, -1, count))  # (B, C, M)
    assignment = to_centres.argmin(dim=1)
    assignment.scatter_(1, centres, torch.arange(clusters, device=tokens.device).expand_as(centres))
    return merge_tokens(values, assignment, clusters), centres


@register
@dataclass
class SparseVLM(Pruner):
    """Options: ``version`` (1: SparseVLM v1.5, the default; 2: SparseVLM+), ``rule`` ("table", or "rank" for the
    first version's rank-based counts), ``recycle`` (merge pruned tokens; v1.5
    only, default true), ``schedule`` (tokens kept per stage of a 576-token model), ``layers`` (layers after which it
    prunes, of a 32-layer model), ``heads`` (SparseVLM+'s priority heads; default 14 of 32, scaled to the model);
    ``keep`` is the layer-averaged budget."""

    name = "sparsevlm"
    stage = Stage.IN_LLM
    reference = "SparseVLM, ICML 2025 (Gumpest/SparseVLMs)"
    default_positions = "reindex"  # of v1.5; see reference_positions

    version: int = 1
    rule: str = "table"
    recycle: bool | None = None
    schedule: list[int] | None = None
    layers: list[int] | None = None
    heads: int | None = None

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise VlpruneError(f"version={self.version!r} must be 1 (SparseVLM v1.5) or 2 (SparseVLM+)")
        if self.version == 2 and self.recycle:
            raise VlpruneError("SparseVLM+ (version=2) does not recycle pruned tokens; drop recycle=true")
        if self.rule not in ("table", "rank"):
            raise VlpruneError(f"rule={self.rule!r} must be 'table' (v1.5) or 'rank' (the first version's rank rule)")
        if self.rule == "rank" and self.version != 1:
            raise VlpruneError("the rank rule belongs to the first version; use it with version=1")

    def reference_positions(self) -> str:
        # v1.5 slices position_ids to a prefix of arange after each stage; SparseVLM+ keeps the kept tokens' ids.
        return "original" if self.version == 2 else "reindex"

    @property
    def recycles(self) -> bool:
        return self.version == 1 and self.recycle is not False

    def stage_counts(self, num_visual: int) -> list[int]:
        if self.schedule is not None:
            counts = [c * num_visual / REFERENCE_TOKENS for c in self.schedule]
        else:
            budget = resolve_keep(self._required_keep(num_visual), num_visual) * REFERENCE_TOKENS / num_visual
            counts = [c * num_visual / REFERENCE_TOKENS for c in reference_schedule(budget, self.version)]
        return [min(num_visual - 1, max(1, round(c))) for c in counts]

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        after = tuple(self.layers or (PRUNE_AFTER_V1 if self.rule == "rank" else PRUNE_AFTER))
        stage_layers = [layer + 1 for layer in scaled_layers(after, num_layers)]
        if stage_layers[-1] >= num_layers:
            raise VlpruneError(f"sparsevlm needs a deeper language model than {num_layers} layers for {list(after)}")
        if self.rule == "rank":
            counts: list[int | None] = [None] * len(stage_layers)  # decided from the data at each stage
        elif is_probe(num_visual):
            counts = [num_visual] * len(stage_layers)
        else:
            counts = self.stage_counts(num_visual)
        if len(counts) != len(stage_layers):
            raise VlpruneError(f"schedule={self.schedule} needs one count per pruning layer {list(after)}")
        return [
            StagePlan(
                layer=layer,
                keep=count,
                query_rows=QueryRows.TEXT,
                needs=frozenset({Need.INITIAL_EMBEDDINGS, *([Need.PER_HEAD_ATTENTION] if self.version == 2 else [])}),
            )
            for layer, count in zip(stage_layers, counts, strict=True)
        ]

    def rank_count(self, ctx: StageContext, raters: torch.Tensor) -> int:
        """The first version's count: ``min(int(rank(P) · scale + bias), N - 1)`` with P the raters' attention rows
        to the visual tokens, per sample (the engine hands such stages one sample at a time)."""
        # The budget is relative to the image's original tokens, not to those left after earlier stages.
        original = ctx.initial_visual_hidden.shape[1] if ctx.initial_visual_hidden is not None else ctx.num_visual
        budget = self._required_keep(original) * REFERENCE_TOKENS / original
        scale, bias = RANK_RULE[min(RANK_RULE, key=lambda b: abs(b - budget))]
        counts = []
        for sample in range(ctx.batch_size):
            rows = ctx.query_attention[sample][raters[sample]].float()
            rank = int(torch.linalg.matrix_rank(rows)) if rows.numel() else 0
            counts.append(min(int(rank * scale + bias), ctx.num_visual - 1))
        return max(1, max(counts))

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        assert ctx.query_attention is not None and ctx.initial_text_hidden is not None
        raters = select_raters(ctx.initial_visual_hidden, ctx.initial_text_hidden, ctx.initial_text_mask)
        raters = raters & ctx.query_mask
        if self.version == 2:
            gravity = rope_gravity(ctx.rotary, ctx.query_positions, ctx.visual_positions)
            heads = self.heads or max(1, round(PRIORITY_HEADS * ctx.query_attention.shape[1] / 32))
            relevance = priority_head_relevance(ctx.query_attention, raters, gravity, heads)
        else:
            relevance = rater_relevance(ctx.query_attention, raters)
        keep = self.rank_count(ctx, raters) if self.rule == "rank" else ctx.keep
        keep_index = top_k_sorted(relevance, keep)
        pruned_count = ctx.num_visual - keep
        if not self.recycles or pruned_count == 0:
            return Selection(keep_index=keep_index, scores=relevance)
        pruned = torch.ones_like(relevance, dtype=torch.bool).scatter(1, keep_index, False)
        pruned_index, _ = first_true(pruned, pruned_count)
        recycled_count = min(int(RECYCLED_SHARE * pruned_count) + 1, pruned_count)
        best = torch.gather(relevance, 1, pruned_index).topk(recycled_count, dim=-1).indices
        recycled_index = torch.gather(pruned_index, 1, best)  # (B, m) among the N visual tokens, by relevance
        clusters = int(recycled_count / TOKENS_PER_CLUSTER) + 1
        merged, centres = density_peak_merge(gather_tokens(ctx.visual_hidden, recycled_index), clusters)
        positions = gather_tokens(ctx.visual_positions, torch.gather(recycled_index, 1, centres))
        return Selection(
            keep_index=keep_index,
            recycled=RecycledTokens(hidden=merged.to(ctx.visual_hidden.dtype), positions=positions),
            scores=relevance,
        )
