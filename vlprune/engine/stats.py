"""Statistics of one pruned prefill: token counts per stage and layer, theoretical FLOPs, time and KV-cache size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlprune.adapters import LanguageModelShape
from vlprune.geometry import BASE, NEWLINE


@dataclass
class StageStats:
    """One pruning stage. Counts are per sample.

    Attributes:
        layer: decoder layer whose input was pruned (0 = pre-LLM).
        visual_in: visual tokens entering the stage.
        visual_out: visual tokens leaving it (kept + recycled).
        recycled: merged tokens the pruner added.
        kept_indices: per sample, the original indices (0..N0-1) of the visual tokens kept, ascending (in the
            pruner's order when it orders them and positions are re-indexed: see ``Selection.ordered``).
        views_out: per sample, the tokens leaving the stage by view: ``base`` (the base view; LLaVA-1.5's only
            one), ``tiles``, ``newlines`` (LLaVA-NeXT's ``image_newline`` line breaks) and ``recycled``.
        visual_in_per_sample, visual_out_per_sample: the counts per sample; in a ragged batch (samples with
            different numbers of visual tokens) ``visual_in``, ``visual_out`` and ``recycled`` are the largest.
    """

    layer: int
    visual_in: int
    visual_out: int
    recycled: int
    kept_indices: list[list[int]]
    views_out: list[dict[str, int]] = field(default_factory=list)
    visual_in_per_sample: list[int] = field(default_factory=list)
    visual_out_per_sample: list[int] = field(default_factory=list)


@dataclass
class PrefillStats:
    """Everything measured about one prefill (one call of the model with image tokens).

    Token counts are per sample; FLOPs are summed over the batch's real (non-padding) tokens. ``prefill_seconds`` is
    the wall time of the base model's forward call (CUDA-synchronised): it includes the vision tower when the call runs
    it, which ``generate`` of transformers >= 5.18 does not (it encodes images before the first forward).
    ``positions`` is the RoPE numbering that ran after pruning ("original" or "reindex").
    """

    batch_size: int
    visual_tokens: int
    visual_tokens_per_sample: list[int] = field(default_factory=list)  # visual_tokens is the largest of them
    visual_views: list[dict[str, int]] = field(default_factory=list)  # per sample, the prompt's tokens by view
    stages: list[StageStats] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    equivalent_visual_tokens: float = 0.0
    prefill_flops: float = 0.0
    unpruned_prefill_flops: float = 0.0
    flops_ratio: float = 1.0
    prefill_seconds: float = 0.0
    kv_cache_lengths: list[int] = field(default_factory=list)
    kv_cache_bytes: int = 0
    positions: str = "original"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_flops(tokens: int, shape: LanguageModelShape) -> float:
    """Theoretical FLOPs (2 per multiply-add) of one decoder layer over ``tokens`` tokens in prefill.

    FastV's per-layer count (4nd^2 + 2n^2d + 2ndm, arXiv 2403.06764) made exact for grouped-query attention and gated
    MLPs: q and o projections 2·n·d·(H·dh) each, k and v 2·n·d·(Hkv·dh) each, scores and weighted sum 2·n²·H·dh each
    (the full n x n, as FastV counts), MLP 2·n·d·m per matrix (3 matrices when gated, else 2).
    """
    n, d = tokens, shape.hidden_size
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    projections = 2 * n * d * (2 * q_width + 2 * kv_width)
    attention = 2 * 2 * n * n * q_width
    mlp = 2 * n * d * shape.intermediate_size * (3 if shape.gated_mlp else 2)
    return float(projections + attention + mlp)


def prefill_flops(tokens_per_layer: list[list[int]], shape: LanguageModelShape) -> float:
    """Sum of :func:`layer_flops` over layers and samples; tokens_per_layer[l][b]: real tokens of sample b, layer l."""
    return sum(layer_flops(n, shape) for layer in tokens_per_layer for n in layer)


def view_counts(views: list[int], origins: list[int], recycled: int) -> dict[str, int]:
    """How many of a sample's tokens ``origins`` (original indices, -1 for recycled ones) are base-view, tile and
    line-break tokens by their view ``views[i]`` (:mod:`vlprune.geometry`), and how many are recycled (plus
    ``recycled`` new ones)."""
    kinds = [views[i] if i >= 0 else None for i in origins]
    return {
        "base": sum(kind == BASE for kind in kinds),
        "tiles": sum(kind is not None and kind > BASE for kind in kinds),
        "newlines": sum(kind == NEWLINE for kind in kinds),
        "recycled": sum(kind is None for kind in kinds) + recycled,
    }


def stage_stats(
    layer: int,
    visual_in: list[int],
    kept_origin: list[list[int]],
    recycled: list[int],
    visual_out: list[int],
    views: list[list[int]],
) -> StageStats:
    """One stage's statistics from each sample's counts before it (``visual_in``), its kept tokens (their original
    indices, -1 for earlier recycled ones), its recycled count and its count after (``visual_out``); ``views`` are
    each sample's original tokens' views."""
    return StageStats(
        layer=layer,
        visual_in=max(visual_in),
        visual_out=max(visual_out),
        recycled=max(recycled),
        kept_indices=[[i for i in row if i >= 0] for row in kept_origin],
        views_out=[
            view_counts(views[sample], row, extra)
            for sample, (row, extra) in enumerate(zip(kept_origin, recycled, strict=True))
        ],
        visual_in_per_sample=list(visual_in),
        visual_out_per_sample=list(visual_out),
    )


def sample_mean(counts: list[int]) -> int | float:
    """The samples' count: the count itself when they agree (an int, as before ragged batches), else their mean."""
    return counts[0] if len(set(counts)) == 1 else sum(counts) / len(counts)


def layer_counts(
    layer_stages: list[int | None],
    dropped: list[list[int]],
    stages: list[StageStats],
    real_counts: list[int],
    visual_counts: list[int],
) -> tuple[list[list[int]], list[int | float]]:
    """Per decoder layer, each sample's real tokens and the samples' visual tokens (:func:`sample_mean`).

    Args:
        layer_stages: per layer, the index of the last stage before it, None before the first stage.
        dropped: per stage, the tokens each sample had lost in all after it.
        stages: the stages' statistics.
        real_counts, visual_counts: each sample's real and visual tokens in the prompt.
    """
    real_per_layer, visual_per_layer = [], []
    for stage in layer_stages:
        if stage is None:
            real_per_layer.append(list(real_counts))
            visual_per_layer.append(sample_mean(visual_counts))
        else:
            real_per_layer.append([real - d for real, d in zip(real_counts, dropped[stage], strict=True)])
            visual_per_layer.append(sample_mean(stages[stage].visual_out_per_sample))
    return real_per_layer, visual_per_layer
