"""DART: keep the visual tokens least duplicated by a few pivot tokens, inside the language model at layer K.

Reference: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
EMNLP 2025 (arXiv 2502.11494); official code github.com/ZichenWen1/DART (LLaVA ``modeling_llama.py``:
``get_retained_image_token``), and its port in ModelTC/LightCompress (``llmc/compression/token_reduction/dart.py``,
defaults of PR #403: ``pruning_loc: 2, max_num_trunction: 128, pivot_image_token: 4, pivot_text_token: 4``).

What the reference does and vlprune reproduces, before decoder layer ``K`` (default 2) during the prefill:
- ``h`` = the hidden states entering layer K passed through the language model's **final** norm;
- pivots: the ``pivot_image_tokens`` (4) visual tokens and the ``pivot_text_tokens`` (4) tokens of the text after the
  image whose **key states of layer K - 1** (post-RoPE, all heads flattened) have the largest L1 norm;
- for each pivot in turn, the ``budget // (pivots)`` visual tokens not chosen yet (image pivots excluded) with the
  **lowest** cosine similarity to the pivot on ``h`` join the kept set; text pivots are not visual and are not kept;
- the kept tokens keep their **original** RoPE positions (the reference sets ``position_ids = keep_indexs``).

The count rule is the reference's: with a budget M (its ``max_num_trunction``), each of the 8 pivots adds
``M // 8`` tokens and the 4 image pivots stay, so ``keep=128`` keeps 4 + 8 * 16 = **132** visual tokens, and
``keep=64`` keeps 68 (:func:`dart_count`). A fraction ``keep`` is first resolved against the visual tokens present
(the reference's ``image_token_length * (1 - reduction_ratio)`` when ``max_num_trunction`` is None).

Deviations, each for a reason:
- Pivot order: the reference iterates a Python ``set`` of sequence indices, whose order is CPython's hash-table slot
  order (an implementation detail that depends on where the image sits in the prompt). vlprune takes the pivots in
  ascending sequence order (image pivots, then text pivots), which is deterministic and independent of the prompt's
  length; the order only matters where two pivots would pick the same token.
- Keys: the engine reads the keys of layer K - 1 as the attention received them, on the key-value heads before the
  grouped-query repetition. The repetition multiplies every L1 norm by the group size, so the pivots are the same.
- Batches (the reference is batch 1): the selection is vectorised over the batch; each sample's text pivots are
  chosen among its own real text tokens. A sample with fewer real text tokens than ``pivot_text_tokens`` (the
  reference's ``topk`` fails there) reuses its last text token as the missing pivots, so every sample keeps the same
  count.
- A count above the visual tokens present keeps them all (the reference's ``topk`` fails there); the last pivots
  then take what is left.
- Post-RoPE keys depend on absolute positions, so a left-padded sample picks the pivots it picks alone only when
  the call passes mask-aware ``position_ids`` (``generate`` does; a bare ``model(**batch)`` call shifts them).
- "The text after the image" is every non-visual token after the first visual token (``QueryRows.TEXT``), which
  for several images per sample includes the text between them.
- LLaVA-NeXT: the reference's ``retain_token_num_for_llava_next`` count rule is not reproduced; every family uses
  the single-image rule over all its visual tokens (tiles and line breaks included) as one span.
"""

from __future__ import annotations

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
    resolve_keep,
)


def dart_count(budget: int, num_visual: int, pivot_image_tokens: int = 4, pivot_text_tokens: int = 4) -> int:
    """Visual tokens DART keeps for a budget of ``budget`` (the reference's ``max_num_trunction``): the image pivots
    plus ``budget // pivots`` per pivot, at most ``num_visual``."""
    pivots = min(pivot_image_tokens, num_visual) + pivot_text_tokens
    return min(num_visual, min(pivot_image_tokens, num_visual) + pivots * (budget // pivots))


def key_l1(keys: torch.Tensor) -> torch.Tensor:
    """(B, K) L1 norm of per-head keys (B, H, K, d) flattened over the heads, as the reference's
    ``any_states.reshape(seq, heads * head_dim)``."""
    return keys.abs().sum(dim=(1, 3), dtype=torch.float32)


def select_dart(
    visual_normed: torch.Tensor,
    text_normed: torch.Tensor,
    visual_norms: torch.Tensor,
    text_norms: torch.Tensor,
    text_mask: torch.Tensor,
    keep: int,
    per_pivot: int,
    pivot_image_tokens: int = 4,
    pivot_text_tokens: int = 4,
) -> torch.Tensor:
    """(B, keep) indices of the visual tokens DART keeps, ascending.

    Args:
        visual_normed: (B, N, D) the visual tokens' hidden states through the final norm.
        text_normed: (B, T, D) the text tokens' after the image, alike (padded rows repeat a real one).
        visual_norms, text_norms: (B, N) and (B, T) L1 norms of their keys at the layer before.
        text_mask: (B, T) which text rows are real.
        keep: visual tokens to keep (:func:`dart_count`); per_pivot: tokens each pivot adds.
    """
    batch, count = visual_norms.shape
    images = min(pivot_image_tokens, count)
    image_pivots = visual_norms.topk(images, dim=1).indices.sort(dim=1).values  # (B, P_i)
    # A sample with fewer real text rows than pivots takes its last real row for the missing ones.
    masked = text_norms.masked_fill(~text_mask, float("-inf"))
    ranked = masked.topk(min(pivot_text_tokens, masked.shape[1]), dim=1).indices
    last = _last_real_row(text_mask).expand(-1, pivot_text_tokens)
    ranked = torch.cat([ranked, last[:, ranked.shape[1] :]], dim=1)
    rank = torch.arange(pivot_text_tokens, device=ranked.device)
    text_pivots = torch.where(rank < text_mask.sum(dim=1, keepdim=True), ranked, last).sort(dim=1).values
    chosen = torch.zeros(batch, count, dtype=torch.bool, device=visual_norms.device)
    chosen.scatter_(1, image_pivots, True)
    pivots = torch.cat(
        [
            torch.gather(visual_normed, 1, image_pivots[..., None].expand(-1, -1, visual_normed.shape[-1])),
            torch.gather(text_normed, 1, text_pivots[..., None].expand(-1, -1, text_normed.shape[-1])),
        ],
        dim=1,
    )  # (B, P, D) in the order they pick
    taken = images
    for index in range(pivots.shape[1]):
        take = min(per_pivot, keep - taken)
        if take <= 0:
            break
        dissimilarity = -torch.nn.functional.cosine_similarity(
            pivots[:, index, None, :], visual_normed, dim=-1
        )  # (B, N)
        dissimilarity = dissimilarity.float().masked_fill(chosen, float("-inf"))
        chosen.scatter_(1, dissimilarity.topk(take, dim=1).indices, True)
        taken += take
    if taken != keep:
        raise VlpruneError(f"dart: {pivots.shape[1]} pivots of {per_pivot} tokens each cannot keep {keep} tokens")
    return chosen.nonzero()[:, 1].view(batch, keep)


def _last_real_row(text_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) each sample's last real text row (row 0 for a sample without one)."""
    positions = torch.arange(text_mask.shape[1], device=text_mask.device).expand_as(text_mask)
    return positions.masked_fill(~text_mask, 0).amax(dim=1, keepdim=True)


@register
@dataclass
class DART(Pruner):
    name = "dart"
    stage = Stage.IN_LLM
    reference = "DART, EMNLP 2025 (ZichenWen1/DART)"
    default_positions = "original"  # the reference sets position_ids = keep_indexs

    layer: int = 2
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def __post_init__(self) -> None:
        for option in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VlpruneError(f"dart: {option}={value!r} must be an int of at least 1 (the reference uses 4)")

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        # Layer 0 has no earlier layer to read keys from, so DART starts at layer 1.
        layer = check_layer(self.layer, num_layers, minimum=1, method=self.name)
        budget = self._required_keep(num_visual)
        count = dart_count(budget, num_visual, self.pivot_image_tokens, self.pivot_text_tokens)
        needs = frozenset({Need.KEY_STATES, Need.FINAL_NORM, Need.TEXT_TOKENS})
        return [StagePlan(layer=layer, keep=count, query_rows=QueryRows.TEXT, needs=needs)]

    def per_pivot(self, num_visual: int) -> int:
        """Tokens each pivot adds: the budget over the pivots (the reference's ``TOKEN_TOPK``)."""
        pivots = min(self.pivot_image_tokens, num_visual) + self.pivot_text_tokens
        return resolve_keep(self.keep, num_visual) // pivots

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.final_norm is not None and ctx.visual_keys is not None, "the engine supplies dart's inputs"
        assert ctx.text_hidden is not None and ctx.text_mask is not None and ctx.query_keys is not None
        if ctx.text_hidden.shape[1] == 0:
            raise VlpruneError("dart: the prompts have no text after the image to choose text pivots from")
        norm = ctx.final_norm
        keep_index = select_dart(
            norm(ctx.visual_hidden),
            norm(ctx.text_hidden),
            key_l1(ctx.visual_keys),
            key_l1(ctx.query_keys),
            ctx.text_mask,
            ctx.keep,
            self.per_pivot(ctx.num_visual),
            self.pivot_image_tokens,
            self.pivot_text_tokens,
        )
        return Selection(keep_index=keep_index)
