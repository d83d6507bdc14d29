"""VisionZip: dominant tokens by [CLS] attention, the rest merged into contextual tokens, before the LLM.

Reference: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025
(arXiv 2412.04467); official code github.com/dvlab-research/VisionZip (``visionzip/utils.py``,
``visionzip/clip_encoder.py``).

What the reference does and vlprune reproduces, all at the vision feature layer (LLaVA-1.5: the output of CLIP's
second-to-last layer):

1. **Dominant tokens**: the ``dominant`` patches with the highest [CLS] attention (head sum, equivalently mean).
2. **Contextual tokens** from the M remaining patches, in their original order: every ``max(1, M // contextual)``-th
   one (the first ``contextual`` of them) is a centre; every other remaining patch joins the centre whose key (head
   mean of the layer's keys, unit-normalised) is most similar; a contextual token is the centre's feature **plus** the
   mean of its members' features (a centre without members stays as it is). Merging happens on the vision features,
   before the projector, which then maps the contextual tokens like any other.
3. The language model sees the dominant patches in their original order, then the contextual tokens.

Defaults: the reference's LLaVA-1.5 splits (dominant, contextual) = (54, 10), (108, 20), (162, 30) for 64, 128, 192
tokens, i.e. ``contextual = round(keep · 10 / 64)`` for any budget; ``contextual=`` sets it.

Deviations, each for a reason:
- The reference keeps the [CLS] token as one of the ``dominant`` tokens and sends it through the projector; LLaVA in
  transformers drops [CLS] before the projector (``vision_feature_select_strategy="default"``), so vlprune fills that
  slot with one more dominant patch (54 = 54 patches here, 53 patches + [CLS] in the reference).
- The [CLS] row and the keys are computed by the engine from the feature layer's queries and keys, so the tower keeps
  SDPA instead of running with ``output_attentions=True``.
- Contextual tokens (token recycling) enter right after the dominant ones, numbered contiguously with them (the
  reference's rebuilt ``inputs_embeds``; default ``positions="reindex"``). With ``positions="original"`` each takes
  the RoPE position of its centre and dominant tokens keep theirs.
- Towers without a [CLS] token (SigLIP) are refused: dominant tokens are defined by that token's attention.

LLaVA-NeXT (the reference's ``CLIPVisionTower_VisionZip`` and ``restore_image_features_sorted``): every view (the base
image and each tile) gets its own dominant tokens by its own [CLS] attention and its own contextual tokens merged
from its other tokens. vlprune shares the budget's dominant and contextual counts among the views in proportion to
their sizes (the reference gives each view the same counts, so its total grows with the tile grid). Deviations: the
reference keeps every view's [CLS] as a token and feeds no line breaks and no unpadding; vlprune keeps the model's
layout (unpadded tiles), drops the line breaks, and puts all contextual tokens after the kept ones, where the
reference puts the base view's right after its dominant tokens and the tiles' after the stitched grid.

Qwen-VL (the reference's ``Qwen2_5_VL/qwen2_5vl_visionzip.py``, commit 68993a3, written for Qwen2.5-VL and carried
over unchanged to Qwen2-VL and Qwen3-VL): there is no [CLS] token, so

1. a token's score is the attention its patches receive at the last vision block (a full-attention block; heads
   averaged, queries summed, then the mean over the token's 2 x 2 merge group, put back in raster order);
2. of the N tokens of a sample, ``contextual = max(int(0.05 · N), 1)`` (the reference's 65% + 5% and 45% + 5%
   settings) and ``dominant = keep - contextual``; the dominant tokens are the top-scored ones;
3. the contextual centres are strided over the rest as above and the rest merge into them by the similarity of their
   keys (the last block's post-RoPE keys, averaged over the merge group and the heads); a contextual token is the
   centre's language-model input embedding plus its members' mean, and it takes the centre's place and multimodal
   position: the language model sees the kept and merged tokens in their original order, positions gathered (the
   reference gathers its 3-D position ids and leaves ``rope_deltas`` as computed on the full prompt).

Deviations: the reference reads the attention with flash attention's varlen kernel but recomputes the scores over
all images of the call at once, without the per-image mask (one image per prompt, as it is run, is unaffected);
vlprune scores each image within itself. It is batch 1 only and handles images only; vlprune runs batches and scores
a video's tokens the same way, time step by time step as the encoder attends.

The selection is :func:`select_visionzip`, a function of the scores, the keys and the tokens to merge (and, on tiled
inputs, each token's view), re-exported by :mod:`vlprune.pruners.selection`, which the pruner calls and another
engine can call alike. It returns the dominant tokens, the merged contextual tokens and their centres; the caller
projects the merged features (LLaVA) or puts them in their centres' places (:meth:`ZippedTokens.in_place`, Qwen-VL).
The reference's budget splits are :func:`visionzip_split`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from vlprune.errors import VlpruneError
from vlprune.kernels import gather_tokens, merge_tokens
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import (
    Pruner,
    RecycledTokens,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    first_true,
    is_probe,
    top_k_sorted,
)
from vlprune.pruners.groups import crop_quotas

CONTEXTUAL_SHARE = 10 / 64  # the reference's 54 + 10, 108 + 20, 162 + 30
QWEN_CONTEXTUAL_SHARE = 0.05  # of the image's tokens, in the reference's Qwen2.5-VL code

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits


def contextual_centres(remaining: int, contextual: int) -> torch.Tensor:
    """Indices among the remaining patches of the contextual centres: every ``max(1, M // contextual)``-th one."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step)[:contextual]


def merge_contextual(
    features: torch.Tensor, keys: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens into centres by key similarity.

    Args:
        features: (B, M, F) features of the remaining tokens.
        keys: (B, M, d) their keys.
        centres: (C,) indices of the centres among the M tokens.

    Returns:
        (B, C, F) centre feature + mean of its members' features, and (B, M) the centre (0..C-1) each token joined.
    """
    count = keys.shape[1]
    is_centre = torch.zeros(count, dtype=torch.bool, device=keys.device)
    is_centre[centres.to(keys.device)] = True
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    similarity = unit @ unit[:, centres].transpose(1, 2)  # (B, M, C)
    assignment = similarity.argmax(dim=-1)  # first centre wins ties, as the reference's argmax
    assignment[:, centres] = torch.arange(len(centres), device=keys.device)
    member_mean = merge_tokens(features, assignment.masked_fill(is_centre[None], -1), len(centres))
    return features[:, centres].float() + member_mean, assignment


def visionzip_split(
    keep: int, num_visual: int, contextual: int | None = None, *, qwen: bool = False
) -> tuple[int, int]:
    """(dominant, contextual) for a budget of ``keep`` of ``num_visual`` tokens: ``contextual`` when given, else the
    reference's split, ``round(keep · 10 / 64)`` on LLaVA (54 + 10 of 64) and with ``qwen`` its Qwen-VL rule, 5% of
    the tokens (at least one).

    Raises:
        VlpruneError: the contextual count is not an int in [0, keep), or exceeds the tokens the dominant ones leave.
    """
    if contextual is None:
        contextual = max(int(QWEN_CONTEXTUAL_SHARE * num_visual), 1) if qwen else round(keep * CONTEXTUAL_SHARE)
    if isinstance(contextual, bool) or not isinstance(contextual, int) or not 0 <= contextual < keep:
        raise VlpruneError(f"contextual={contextual!r} must be an int in [0, keep={keep})")
    if contextual > num_visual - (keep - contextual):
        raise VlpruneError(f"contextual={contextual} exceeds the {num_visual - keep + contextual} tokens left")
    return keep - contextual, contextual


class ZippedTokens(NamedTuple):
    """What :func:`select_visionzip` returns."""

    index: torch.Tensor
    """(B, keep - contextual) long indices of the dominant tokens, ascending."""
    merged: torch.Tensor | None
    """(B, contextual, F) float32 contextual tokens: each centre's token plus the mean of its members' (None when
    ``contextual`` is 0); in the tokens' space (on LLaVA vision features, for the projector to map)."""
    centres: torch.Tensor | None
    """(B, contextual) long index of each contextual token's centre among the N tokens (None when ``contextual`` is
    0): where it takes its RoPE position from, or its place (:meth:`in_place`)."""

    def in_place(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's Qwen-VL placement: each contextual token replaces its centre, among the dominant tokens in
        their original order. tokens: (B, N, D) the tokens merged (there the language model's input embeddings).

        Returns:
            (B, keep) long indices ascending (dominant tokens and centres), and (B, keep, D) the tokens to put there
            (a dominant token's own, a centre's merged one), in ``tokens``' dtype.
        """
        if self.merged is None or self.centres is None:
            return self.index, gather_tokens(tokens, self.index)
        keep_index, order = torch.cat([self.index, self.centres], dim=1).sort(dim=1)
        hidden = torch.cat([gather_tokens(tokens, self.index).float(), self.merged], dim=1)
        return keep_index, gather_tokens(hidden, order).to(tokens.dtype)


@torch.no_grad()
def select_visionzip(
    scores: torch.Tensor,
    keys: torch.Tensor,
    tokens: torch.Tensor,
    keep: int,
    contextual: int,
    *,
    views: torch.Tensor | None = None,
) -> ZippedTokens:
    """VisionZip's selection: the ``keep - contextual`` dominant tokens by attention, and ``contextual`` tokens merged
    from the rest by the similarity of their keys.

    Args:
        scores: (B, N) each token's attention at the vision feature layer: the [CLS] query's (LLaVA, head mean; on
            tiled inputs each view's own [CLS] row), or on Qwen-VL the attention the token receives at the last
            vision block (the reference's score there).
        keys: (B, N, d) each token's key at that layer, averaged over heads (on Qwen-VL over its merge group too).
        tokens: (B, N, F) what is merged: the projector's input features on LLaVA (the reference merges before the
            projector), the language model's input embeddings on Qwen-VL (its reference merges after the merger).
        keep: tokens per sample, dominant and contextual together (64 = 54 + 10 in the reference's LLaVA setting).
        contextual: how many of ``keep`` are merged contextual tokens, in [0, keep); :func:`visionzip_split` gives
            the reference's choice.
        views: (B, N) each token's view when some token comes from a tile (LLaVA-NeXT: 0 the base view, 1.. the
            tiles, -1 a line break), else None. With views each view takes its share of the dominant and of the
            contextual tokens in proportion to its size, its dominant tokens by its own scores and its contextual
            tokens merged from its own other tokens; line breaks are dropped.

    Returns:
        the dominant tokens, the merged contextual tokens and their centres (:class:`ZippedTokens`); the contextual
        tokens come view by view (base first), centres ascending within a view.
    """
    dominant = keep - contextual
    if views is not None:
        return _zip_per_view(scores, keys, tokens, dominant, contextual, views)
    index = top_k_sorted(scores, dominant)
    if contextual == 0:
        return ZippedTokens(index, None, None)
    is_rest = torch.ones_like(scores, dtype=torch.bool).scatter(1, index, False)
    rest, _ = first_true(is_rest, scores.shape[1] - dominant)  # (B, M), ascending
    centres = contextual_centres(rest.shape[1], contextual).to(rest.device)
    merged, _ = merge_contextual(gather_tokens(tokens, rest), gather_tokens(keys, rest), centres)
    return ZippedTokens(index, merged, rest[:, centres])


def _zip_per_view(
    scores: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, dominant: int, contextual: int, views: torch.Tensor
) -> ZippedTokens:
    """LLaVA-NeXT: each view (base, tiles) takes its share of the dominant and of the contextual tokens, in
    proportion to its size; dominant tokens by the view's own scores, contextual ones merged from the view's other
    tokens only; line breaks are dropped."""
    kept_rows, merged_rows, centre_rows = [], [], []
    for sample in range(scores.shape[0]):
        group = views[sample].clamp(min=-1) + 1  # 0: line breaks, 1: base view, 2..: tiles
        capacity = torch.bincount(group)
        weights = capacity.float()
        weights[0] = 0.0
        weights = (weights / weights.sum())[None]
        dominant_quota = crop_quotas(weights, capacity, dominant)[0]
        contextual_quota = crop_quotas(weights, capacity - dominant_quota, contextual)[0]
        kept, merged, centre_slots = [], [], []
        for view in range(1, len(capacity)):
            members = (group == view).nonzero()[:, 0]
            take, merge = int(dominant_quota[view]), int(contextual_quota[view])
            top = members[scores[sample, members].topk(take).indices] if take else members[:0]
            kept.append(top)
            if merge == 0:
                continue
            is_rest = torch.ones(len(members), dtype=torch.bool, device=members.device)
            is_rest[torch.searchsorted(members, top.sort().values)] = False
            rest = members[is_rest]  # ascending
            centres = contextual_centres(len(rest), merge).to(rest.device)
            merged_tokens, _ = merge_contextual(
                tokens[sample : sample + 1, rest], keys[sample : sample + 1, rest], centres
            )
            merged.append(merged_tokens)
            centre_slots.append(rest[centres])
        kept_rows.append(torch.cat(kept).sort().values)
        merged_rows.append(torch.cat(merged, dim=1) if merged else None)
        centre_rows.append(torch.cat(centre_slots) if centre_slots else None)
    index = torch.stack(kept_rows)
    if contextual == 0:
        return ZippedTokens(index, None, None)
    return ZippedTokens(index, torch.cat(merged_rows), torch.stack(centre_rows))


@register
@dataclass
class VisionZip(Pruner):
    """Options: ``contextual`` (merged tokens, part of ``keep``; default ``round(keep · 10 / 64)``)."""

    name = "visionzip"
    stage = Stage.PRE_LLM
    reference = "VisionZip, CVPR 2025 (dvlab-research/VisionZip)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    contextual: int | None = None

    def split(self, keep: int, num_visual: int, qwen: bool = False) -> tuple[int, int]:
        """(dominant, contextual) for a budget of ``keep`` tokens (``qwen``: the reference's Qwen-VL split, 5% of the
        tokens contextual); see :func:`visionzip_split`."""
        return visionzip_split(keep, num_visual, self.contextual, qwen=qwen)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        dominant, _ = self.split(self._required_keep(num_visual), num_visual)
        # The stage keeps the dominant tokens; the contextual ones come on top as recycled tokens.
        return [
            StagePlan(
                layer=0, keep=dominant, needs=frozenset({Need.CLS_ATTENTION, Need.VISION_KEYS, Need.VISION_FEATURES})
            )
        ]

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        if not traits.packed_tower:  # the reference's Qwen-VL code: a packed, merged tower
            return self.plan(num_visual, num_layers)
        # The contextual tokens replace their centres in place, so the stage keeps the whole budget.
        keep = self._required_keep(num_visual)
        if not is_probe(num_visual):  # the split is checked against the real token count (5% of it contextual)
            self.split(keep, num_visual, qwen=True)
        return [StagePlan(layer=0, keep=keep, needs=frozenset({Need.RECEIVED_ATTENTION, Need.VISION_KEYS}))]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        if ctx.vision_cls_attention is None:  # the Qwen-VL plan reads the attention each token receives
            return self._select_merged_in_place(ctx)
        assert ctx.vision_keys is not None and ctx.projector is not None
        keep = self._required_keep(ctx.num_visual)
        _, contextual = self.split(keep, ctx.num_visual)
        scores = ctx.vision_cls_attention
        # Whether any token comes from a tile is known on the host; only then does the per-view path run.
        views = ctx.geometry.view if ctx.geometry is not None and ctx.geometry.has_tiles else None
        zipped = select_visionzip(scores, ctx.vision_keys, ctx.vision_features, keep, contextual, views=views)
        if zipped.merged is None:
            return Selection(keep_index=zipped.index, scores=scores)
        parameter = next(ctx.projector.parameters())
        hidden = ctx.projector(zipped.merged.to(parameter.dtype))
        positions = gather_tokens(ctx.visual_positions, zipped.centres)  # each contextual token at its centre's
        return Selection(
            keep_index=zipped.index, recycled=RecycledTokens(hidden=hidden, positions=positions), scores=scores
        )

    def _select_merged_in_place(self, ctx: StageContext) -> Selection:
        """Qwen-VL: dominant tokens by received attention, contextual tokens merged from the rest's embeddings into
        their centres, which stay in place among the kept tokens."""
        assert ctx.vision_received_attention is not None and ctx.vision_keys is not None
        _, contextual = self.split(ctx.keep, ctx.num_visual, qwen=True)
        scores = ctx.vision_received_attention
        zipped = select_visionzip(scores, ctx.vision_keys, ctx.visual_hidden, ctx.keep, contextual)
        if zipped.merged is None:  # contextual=0: the dominant tokens alone, their states unchanged
            return Selection(keep_index=zipped.index, scores=scores)
        keep_index, kept_hidden = zipped.in_place(ctx.visual_hidden)
        return Selection(keep_index=keep_index, kept_hidden=kept_hidden, scores=scores)
