"""Statistics of one pruned prefill: token counts per stage and layer, theoretical FLOPs, time and KV-cache size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlprune.adapters import LanguageModelShape


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
