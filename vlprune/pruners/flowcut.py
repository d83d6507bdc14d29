"""FlowCut: progressive pruning inside the vision encoder, guided by the information flow to the [CLS] token.

Reference: Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models",
NeurIPS 2025 (arXiv 2505.19536); official code github.com/TungChintao/FlowCut (``flowcut/modeling_clip_flowcut.py``,
``flowcut/utils_flowcut.py``; PyPI ``flowcut``), and ``FlowCut_Qwen`` for towers without [CLS].

What the reference does and vlprune reproduces (LLaVA-1.5: CLIP's 24 layers, features from layer 22):

1. At every encoder layer before the feature layer F, per image, from the layer's attention (heads averaged):
   attention strength ``a = softmax(q_cls kᵀ / √d)`` over the patches; semantic flow
   ``s = softmax(v_cls vᵀ)`` per head, no 1/√d, as in the code; information ``i = ||mean_h v_j||₁``;
   score ``S = (a / Σa + s / Σs) · i``, accumulated as ``C ← 0.5 C + 0.5 S`` (``C = S`` at the first layer).
2. After layers ``F - 1 - 2k`` (LLaVA-1.5: 1, 3, ..., 21) it prunes. With ``r = F - 1 - layer`` layers of pruning
   left and ``Ĥ`` the [CLS] attention's entropy divided by ``log N``, it drops
   ``round((N - keep) / √r · (1 - Ĥ²))`` patches, keeping at least ``keep``, those with the highest ``C``, in their
   original order; after layer ``F - 1`` it cuts to exactly ``keep``. [CLS] is kept throughout.
3. The feature layer then runs on ``keep`` patches, and exactly ``keep`` tokens reach the language model.

For towers without [CLS] (SigLIP) the reference's Qwen2-VL port is followed: the global query is the mean of the
layer's queries, ``S = a · i`` with no semantic term.

LLaVA-NeXT (the reference's ``anyres`` path, ``flowcut/main.py`` and ``modeling_llama_flowcut.py``), and OneVision:

4. Inside the tower every view (the base image and each tile) keeps ``int(T / 2)`` patches, T being the sample's
   budget (the reference's ``int(target_num / 2) + 1`` with [CLS]); an image encoded as one view keeps T.
5. The kept patches are placed on the stitched tile grid, unpadded (kept patches in the padding are lost, as the
   reference's ``unpad_mask`` drops them), and no ``image_newline`` token enters: the reference appends none.
6. After language-model layer 1 (a stage at layer 2) the visual tokens are cut to T, if more are left, by the last
   prompt token: ``rel = mean_h softmax_visual(q kᵀ / √d)``, ``sem = mean_h softmax_visual(v_q vᵀ / √d)``,
   ``S = (rel / Σrel + sem / Σsem) · ||mean_h v||₁`` with layer 1's post-RoPE queries and keys and its values,
   kept in their order and, as everywhere in this reference, numbered contiguously.

The patches that survive enter the language model numbered contiguously, as the reference's rebuilt
``inputs_embeds`` are (default ``positions="reindex"``).

Qwen-VL (the reference's ``FlowCut_Qwen`` port): the encoder's score uses the mean-pooled query, ``S = a · i``, with
the same moving average and entropy-adaptive schedule over all blocks (the merger reads the last block, so the last
cut follows it); 2T tokens (8T patches) leave the encoder, and the stage after language-model layer 1 keeps T.

Deviations, each for a reason:
- Scores come from the layer's queries, keys and values, which the engine hands over, so the tower keeps SDPA
  instead of the reference's eager attention with full attention maps.
- In a batch, the number pruned at a stage is each image's own; the reference takes the maximum over the batch, so
  its selection for an image depends on the other images. vlprune keeps the batch rectangular with masked filler
  tokens (see ``vlprune.engine.vision``), so each image gets exactly what it gets alone.
- The entropy treats ``0 · log 0`` as 0 (the reference produces NaN when an attention value underflows to 0).
- ``every`` (2) and ``ema`` (0.5) expose the reference's pruning interval and moving-average weight, its ablations.
- The budget counts tokens per image; a sample with several images is refused.
- On OneVision, whose stitched grid the model may shrink by bilinear interpolation, a shrunk token is kept when its
  nearest source patch is, and it is the interpolation of the kept patches alone (weights renormalised): the
  reference has no OneVision path, and the tower's dropped patches have no features to blend. Its mean-pooled query
  (the Qwen2-VL port's substitute for [CLS]) scores the SigLIP views.
- On Qwen-VL the encoder keeps or drops whole 2 x 2 merge groups (the mean score of the group's patches), image by
  image, and later blocks attend over each image's (or window's) kept patches: the reference prunes single patches
  over the whole packed sequence, so its merger then fuses four unrelated patches, and it leaves ``cu_seqlens``
  unchanged, which mixes images; its image tokens then take the first K positions of the original grid, vlprune
  keeps each kept token's own multimodal position.
- The language-model stage's value vectors are averaged over the key-value heads, which equals the reference's
  average over the repeated heads of grouped-query attention.
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
    VisionLayerContext,
    first_true,
    is_probe,
    resolve_keep,
    top_k_sorted,
)

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, real: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, T) softmax attention of one query per image (query: (B, H, 1, d)) over the real keys, heads averaged."""
    logits = (query.float() @ key.float().transpose(-1, -2)) * scaling  # (B, H, 1, T)
    logits = logits.masked_fill(~real[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]


def normalised_entropy(probabilities: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of each row over its real entries, renormalised to sum 1, divided by log(number of entries)."""
    p = probabilities.masked_fill(~real, 0.0)
    p = p / p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    count = real.sum(dim=-1).clamp(min=2).float()
    return entropy / count.log()


def flow_scores(ctx: VisionLayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's (B, N) score of each patch at one layer and the (B, N) global-token attention it used."""
    value = ctx.value.float()
    patch = slice(1, None) if ctx.has_cls else slice(None)
    real_patch = ctx.real[:, patch]
    information = value.mean(dim=1)[:, patch].abs().sum(dim=-1)  # L1 norm of the head-averaged value
    if ctx.has_cls:
        attention = head_mean_attention(ctx.query[:, :, :1], ctx.key, ctx.real, ctx.scaling)[:, patch]
        semantic = head_mean_attention(value[:, :, :1], value, ctx.real, 1.0)[:, patch]
        score = (_share(attention, real_patch) + _share(semantic, real_patch)) * information
    else:
        weights = ctx.real[:, None, :, None].float()
        global_query = (ctx.query.float() * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True)
        attention = head_mean_attention(global_query, ctx.key, ctx.real, ctx.scaling)
        score = attention * information
    return score.masked_fill(~real_patch, float("-inf")), attention


def _share(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    values = values.masked_fill(~real, 0.0)
    return values / values.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(values.dtype).tiny)


def adaptive_keep(attention: torch.Tensor, real: torch.Tensor, keep: torch.Tensor, layers_left: int) -> torch.Tensor:
    """(B,) patches each image keeps after a stage with ``layers_left`` (> 0) layers of pruning after it; ``keep``
    (B,) is each image's final count."""
    count = real.sum(dim=-1)
    flatness = normalised_entropy(attention, real)
    dropped = torch.round((count - keep).float() / math.sqrt(layers_left) * (1 - flatness**2)).long()
    return torch.maximum(count - dropped, keep.to(count.device))


def language_flow_scores(
    attention: torch.Tensor, values: torch.Tensor, query_values: torch.Tensor, real: torch.Tensor | None = None
) -> torch.Tensor:
    """FlowCut's (B, N) language-model score of each visual token from the last prompt token.

    Args:
        attention: (B, H, 1, N) per-head softmax attention of the last token to the visual tokens (normalised over
            all keys; renormalised here over the visual ones, which is the reference's softmax over visual keys).
        values: (B, Hkv, N, d) the visual tokens' value vectors; query_values: (B, Hkv, 1, d) the last token's.
        real: (B, N) the tokens to score, or None for all.
    """
    if real is None:
        real = torch.ones(values.shape[0], values.shape[2], dtype=torch.bool, device=values.device)
    per_head = attention[:, :, -1].float().masked_fill(~real[:, None], 0.0)
    relation = _share(per_head, real[:, None].expand_as(per_head)).mean(dim=1)
    values = values.float()
    semantic = head_mean_attention(query_values[:, :, -1:].float(), values, real, values.shape[-1] ** -0.5)
    information = values.mean(dim=1).abs().sum(dim=-1)
    score = (_share(relation, real) + _share(semantic, real)) * information
    return score.masked_fill(~real, float("-inf"))


@register
@dataclass
class FlowCut(Pruner):
    """Options: ``every`` (prune every k-th layer before the feature layer, default 2), ``ema`` (weight of the
    accumulated score, default 0.5), ``llm_layer`` (on LLaVA-NeXT and OneVision, the language-model layer whose
    output is cut to the budget, default 1 as the reference's ``prune_layer``)."""

    name = "flowcut"
    stage = Stage.VISION
    reference = "FlowCut, NeurIPS 2025 (TungChintao/FlowCut)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    every: int = 2
    ema: float = 0.5
    llm_layer: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise VlpruneError(f"every={self.every!r} must be a positive int (the reference prunes every 2 layers)")
        if not isinstance(self.ema, int | float) or not 0.0 <= self.ema < 1.0:
            raise VlpruneError(f"ema={self.ema!r} must be in [0, 1) (the reference uses 0.5)")
        if isinstance(self.llm_layer, bool) or not isinstance(self.llm_layer, int) or self.llm_layer < 0:
            raise VlpruneError(f"llm_layer={self.llm_layer!r} must be a layer index >= 0 (the reference uses 1)")

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        # The tokens are chosen inside the vision tower; the stage at layer 0 only drops the others' placeholders.
        return [StagePlan(layer=0, keep=self._required_keep(num_visual))]

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        # The reference's anyres and Qwen-VL ports add a language-model stage; its LLaVA-1.5 path prunes in the tower.
        if not traits.multi_crop and not traits.packed_tower:
            return self.plan(num_visual, num_layers)
        if not self.llm_layer + 1 < num_layers:
            raise VlpruneError(
                f"llm_layer={self.llm_layer} for flowcut: the language model has {num_layers} layers, the stage after "
                f"it must be one of them (valid: 0..{num_layers - 2})"
            )
        budget = num_visual if is_probe(num_visual) else self._required_keep(num_visual)
        return [
            StagePlan(layer=0, keep=None),  # the tokens whose patches the tower kept, a count per sample
            StagePlan(
                layer=self.llm_layer + 1,
                keep=budget,
                keep_at_most=True,
                query_rows=QueryRows.LAST,
                needs=frozenset({Need.PER_HEAD_ATTENTION, Need.VALUE_STATES}),
            ),
        ]

    def vision_budget_for(self, traits: AdapterTraits, image_tokens: int, view_patches: int, views: int) -> int:
        if traits.packed_tower:  # the reference's Qwen2-VL port: 2T tokens (8T patches) leave the encoder
            return min(view_patches, 2 * resolve_keep(self._required_keep(image_tokens), image_tokens))
        if views == 1:
            return resolve_keep(self._required_keep(view_patches), view_patches)
        return min(view_patches, max(1, resolve_keep(self.keep, image_tokens) // 2))

    def select(self, ctx: StageContext) -> Selection:
        if ctx.stage_index > 0:
            assert ctx.query_attention is not None and ctx.visual_values is not None and ctx.query_values is not None
            score = language_flow_scores(ctx.query_attention, ctx.visual_values, ctx.query_values)
            return Selection(keep_index=top_k_sorted(score, ctx.keep), scores=score)
        assert ctx.vision_kept is not None, "the engine supplies the tokens kept inside the vision tower"
        if torch.compiler.is_compiling():
            # A captured prefill reads nothing back: its engine checked, before the graph, that every sample kept
            # the stage's count.
            return Selection(keep_index=first_true(ctx.vision_kept, ctx.keep)[0])
        counts = ctx.vision_kept.sum(dim=1).tolist()
        if len(set(counts)) != 1 or not 1 <= counts[0] <= ctx.keep:
            raise VlpruneError(
                f"flowcut kept {counts} tokens per sample in the vision tower for keep={ctx.keep}: its budget counts "
                "the tokens of one image; pass one image per sample"
            )
        return Selection(keep_index=first_true(ctx.vision_kept, counts[0])[0])

    def vision_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        if feature_layer < 1:
            raise VlpruneError("flowcut needs at least one vision layer before the feature layer")
        return list(range(feature_layer))

    @torch.no_grad()
    def select_in_vision(self, ctx: VisionLayerContext) -> torch.Tensor | None:
        patch = slice(1, None) if ctx.has_cls else slice(None)
        real_patch = ctx.real[:, patch]
        score, attention = flow_scores(ctx)
        origin = ctx.origin[:, patch]
        accumulated = ctx.state.get("accumulated")
        if accumulated is None:
            accumulated = torch.zeros(ctx.origin.shape[0], int(ctx.origin.max()) + 1, device=score.device)
            current = score
        else:
            current = self.ema * torch.gather(accumulated, 1, origin) + (1 - self.ema) * score
        ctx.state["accumulated"] = accumulated.scatter(1, origin, current.masked_fill(~real_patch, 0.0))
        layers_left = ctx.feature_layer - 1 - ctx.layer
        if layers_left % self.every != 0:
            return None
        if layers_left == 0:
            kept_count = ctx.keep.to(current.device)
        else:
            kept_count = adaptive_keep(attention, real_patch, ctx.keep, layers_left)
        if ctx.group > 1:
            keep_patch = _keep_whole_groups(current, real_patch, kept_count, ctx.group)
        else:
            rank = current.masked_fill(~real_patch, float("-inf")).argsort(dim=-1, descending=True, stable=True)
            position = rank.argsort(dim=-1)  # each patch's place in the ranking
            keep_patch = (position < kept_count[:, None]) & real_patch
        if not ctx.has_cls:
            return keep_patch
        return torch.cat([torch.ones_like(keep_patch[:, :1]), keep_patch], dim=1)


def _keep_whole_groups(score: torch.Tensor, real: torch.Tensor, kept: torch.Tensor, group: int) -> torch.Tensor:
    """(B, T) the merge groups (``group`` consecutive patches, one language-model token) with the highest mean score,
    ``ceil(kept / group)`` of them per image: the encoder's tokens are pruned as the merger will read them."""
    batch, count = score.shape
    group_score = score.masked_fill(~real, 0.0).view(batch, count // group, group).mean(dim=-1)
    group_real = real.view(batch, count // group, group).all(dim=-1)
    rank = group_score.masked_fill(~group_real, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    groups = (kept + group - 1) // group
    keep_group = (rank.argsort(dim=-1) < groups[:, None]) & group_real
    return keep_group.repeat_interleave(group, dim=1)
