"""VisPruner: keep the tokens the vision tower finds important, then the most diverse of the rest, before the LLM.

Reference: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs",
ICCV 2025 (arXiv 2412.01818, the entry FasterVLM's paper was first posted under); official code
github.com/Theia-4869/VisPruner, Apache-2.0 (``encode_images`` in ``llava/model/llava_arch.py``, ``feature_select``
in ``llava/model/multimodal_encoder/clip_encoder.py``).

What the reference does and vlprune reproduces, with a budget of T tokens and ``important_ratio`` r (default 0.5,
the eval scripts' ``--important_ratio``; its README runs MME at 64 tokens with 0.75):

1. **Important tokens**: the ``int(T · r)`` patches with the highest [CLS] attention at the vision feature layer
   (LLaVA-1.5: the attention of CLIP's second-to-last layer, [CLS] row, patches only, mean over heads).
2. **Diverse tokens**, ``T - int(T · r)`` of them, from the other patches, kept in the order of the attention sort
   (most attended first): the features are unit-normalised (the tower's features at that layer, before the
   projector); repeatedly, the residual list is split alternately into ``a = [0::2]`` and ``b = [1::2]``, each a-token
   is scored by its highest cosine similarity to any b-token, and the ``min(8, R - T_div)`` highest-scoring a-tokens
   are dropped (near-duplicates of a b-token); the residual list becomes the other a-tokens, by descending score,
   followed by the b-tokens, until ``T_div`` remain.
3. The kept tokens are important ∪ diverse, applied as a mask after the projector (no merging): they enter the
   language model in their original order, the shortened prompt numbered contiguously as the reference's rebuilt
   ``inputs_embeds`` are (default ``positions="reindex"``).

Deviations, each for a reason:
- Sorts are stable: tokens of equal attention, and a-tokens of equal similarity, are taken lowest index first; the
  reference's ``argsort`` leaves their order unspecified, and it decides both the kept set and the a/b split.
- A residual list of odd length R gives ``ceil(R / 2)`` a-tokens, all scored; the reference's indexing assumes
  ``R // 2`` and raises (or, when one a-token would survive the step, drops it too). A step drops at most the
  a-tokens there are; the reference's indexing raises when a step would drop more. On LLaVA-1.5's 576 tokens with the
  published budgets (64, 128, 192; r = 0.5 or 0.75) R stays even and no step lacks a-tokens, and both give the same
  tokens.
- Similarities are computed in the features' dtype, as the reference does (float16 there): rounding decides
  near-ties, so a float32 computation could keep other tokens on a float16 model. ``float32=True`` computes them in
  float32 instead.
- The [CLS] row is computed by the engine from the feature layer's query and keys, so the tower keeps SDPA instead
  of running with ``output_attentions=True``; pruning happens at the input of decoder layer 0 rather than by
  shortening ``inputs_embeds`` (every decoder layer sees exactly the kept tokens; ``positions="original"`` keeps
  their original positions instead).
- Several images in one prompt are pruned as one sequence with one budget; the reference encodes each image with
  its own budget of T.

Towers without a [CLS] token (SigLIP, LLaVA-OneVision's tower, the Qwen-VL ViTs) take the maintainer's substitute
(Theia-4869/VisPruner#1): the mean attention each token receives at the vision feature layer (averaged over the
queries and heads; per crop on tiled inputs; on Qwen-VL pooled over each 2 x 2 merge group, "the same merging
operation" applied to the attention). On Qwen-VL the de-duplication runs on "the merged tokens" (same issue): the
patch merger's outputs, the language model's input embeddings of the image (or video) tokens; the kept tokens keep
their multimodal positions, the only numbering vlprune offers there.

LLaVA-NeXT (the reference's ``encode_images`` runs on every crop, base view and tiles, with the budget T each, and
carries the masks through the tile stitching and unpadding): each view selects its important and diverse tokens from
its own tokens, with ``int(q · r)`` important of its share q. Deviations: vlprune keeps the budget per sample and
shares it among the views in proportion to their tokens (the remainder to the largest views), which is the
reference's equal share when every view is whole; a tile selects among its unpadded tokens only (the reference
selects on the padded tile and then cuts the padding away, so its tiles keep fewer than T); the ``image_newline``
line breaks, which the reference always keeps on top of its budget, count in ``keep`` and take budget only when every
other token is kept (they carry no image content). LLaVA-OneVision runs the same path with the received attention.

The selection is :func:`select_vispruner`, a function of the attention scores, the features and, on anyres inputs,
each token's view, which the pruner calls and another engine can call alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan
from vlprune.pruners.groups import crop_quotas

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits

IMPORTANT_RATIO = 0.5  # the reference's eval scripts' --important_ratio default
DROP_PER_STEP = 8  # a-tokens the reference drops per matching step


def check_important_ratio(important_ratio: object) -> float:
    """``important_ratio`` as a float if it is a number in [0, 1].

    Raises:
        VlpruneError: another type, or a number outside [0, 1].
    """
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, int | float):
        raise VlpruneError(
            f"important_ratio={important_ratio!r} must be a number in [0, 1] (the share of the budget kept by "
            f"attention; the reference uses 0.5)"
        )
    if not 0.0 <= important_ratio <= 1.0:
        raise VlpruneError(
            f"important_ratio={important_ratio!r} is outside [0, 1]: 0 keeps only diverse tokens, 1 only important "
            f"ones (the reference uses 0.5)"
        )
    return float(important_ratio)


def vispruner_split(keep: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) tokens for a budget of ``keep``: ``int(keep · r)`` and the rest, as the reference."""
    important = int(keep * important_ratio)
    return important, keep - important


def deduplicate(unit: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
    """The reference's iterative bipartite de-duplication of the ``residual`` tokens down to ``target``.

    Args:
        unit: (B, N, F) unit-normalised features of all tokens.
        residual: (B, R) indices of the candidate tokens, in the order the split into a/b follows.
        target: tokens to keep per sample, at least 1.

    Returns:
        (B, target) indices: the surviving a-tokens of the last step by descending similarity, then its b-tokens
        (``residual`` itself when it is not longer than ``target``).
    """
    width = unit.shape[-1]
    while True:
        count = residual.shape[1]
        drop = min(DROP_PER_STEP, count - target, (count + 1) // 2)
        if drop <= 0:
            return residual
        tokens = torch.gather(unit, 1, residual[..., None].expand(-1, -1, width))
        closest = (tokens[:, 0::2] @ tokens[:, 1::2].transpose(1, 2)).amax(dim=-1)  # (B, ceil(R / 2))
        distinct = torch.argsort(closest, dim=-1, descending=True, stable=True)[:, drop:]
        residual = torch.cat([torch.gather(residual[:, 0::2], 1, distinct), residual[:, 1::2]], dim=1)


def select_vispruner(
    attention: torch.Tensor,
    features: torch.Tensor,
    keep: int,
    important_ratio: float = IMPORTANT_RATIO,
    *,
    views: torch.Tensor | None = None,
    float32: bool = False,
) -> torch.Tensor:
    """VisPruner's kept tokens: the most attended ``int(keep · r)``, then the most diverse of the rest.

    Args:
        attention: (B, N) each token's attention at the vision feature layer: the [CLS] query's (head mean; on tiled
            inputs its own view's [CLS] row), or on towers without [CLS] the attention it receives.
        features: (B, N, F) what the similarities are computed on: the vision features at that layer, before the
            projector (LLaVA), or the patch merger's outputs (Qwen-VL).
        keep: tokens kept per sample (a count in [1, N]).
        important_ratio: r, the share of ``keep`` chosen by attention, in [0, 1].
        views: (B, N) each token's view when some token comes from a tile or is a line break (LLaVA-NeXT,
            LLaVA-OneVision: 0 the base view, 1.. the tiles, -1 a line break), else None: one selection over all N.
            With views each view selects from its own tokens with its share of ``keep``, in proportion to its
            tokens; line breaks take budget only when every other token is kept.
        float32: compute the similarities in float32; False (the reference's choice) uses the features' dtype.

    Returns:
        (B, keep) long indices into the N tokens, ascending.

    Raises:
        VlpruneError: ``keep`` outside [1, N] or ``important_ratio`` outside [0, 1].
    """
    ratio = check_important_ratio(important_ratio)
    count = attention.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= count:
        raise VlpruneError(f"keep={keep!r} must be an int in [1, {count}] (the visual tokens per sample)")
    if views is not None:
        return _select_per_view(attention, features, keep, ratio, views, float32)
    return _select(attention, features, keep, ratio, float32)


def _select(attention: torch.Tensor, features: torch.Tensor, keep: int, ratio: float, float32: bool) -> torch.Tensor:
    """(B, keep) ascending: the single-view selection over all N tokens."""
    important, diverse = vispruner_split(keep, ratio)
    order = torch.argsort(attention, dim=-1, descending=True, stable=True)
    if diverse == 0:
        return order[:, :important].sort(dim=-1).values
    values = features.float() if float32 else features
    # A zero vector (never a real patch) would make the reference's division NaN; it stays zero here.
    unit = values / values.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    residual = deduplicate(unit, order[:, important:], diverse)
    return torch.cat([order[:, :important], residual], dim=1).sort(dim=-1).values


def _select_per_view(
    attention: torch.Tensor, features: torch.Tensor, keep: int, ratio: float, views: torch.Tensor, float32: bool
) -> torch.Tensor:
    """(B, keep) ascending: each view its share of ``keep`` by :func:`_select` on its own tokens; line breaks (and
    a ragged batch's padding) last, in order."""
    rows = []
    for sample in range(attention.shape[0]):
        group = views[sample].clamp(min=-1) + 1  # 0: line breaks, 1: base view, 2..: tiles
        capacity = torch.bincount(group)
        weights = capacity.float()
        weights[0] = 0.0
        quota = crop_quotas((weights / weights.sum())[None], capacity, keep)[0].tolist()
        kept = []
        for view, share in enumerate(quota):
            if share == 0:
                continue
            members = (group == view).nonzero()[:, 0]
            if view == 0:  # only when every other token is kept: the first line breaks
                kept.append(members[:share])
                continue
            picked = _select(
                attention[sample : sample + 1, members], features[sample : sample + 1, members], share, ratio, float32
            )
            kept.append(members[picked[0]])
        rows.append(torch.cat(kept).sort().values)
    return torch.stack(rows)


@register
@dataclass
class VisPruner(Pruner):
    """Options: ``important_ratio`` (the share of ``keep`` chosen by attention, default 0.5), ``float32``
    (similarities in float32 instead of the features' dtype)."""

    name = "vispruner"
    stage = Stage.PRE_LLM
    reference = "VisPruner, ICCV 2025 (Theia-4869/VisPruner)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1
    cls_substitute = "received"  # the maintainer (VisPruner#1): the mean attention each token receives

    important_ratio: float = IMPORTANT_RATIO
    float32: bool = False

    def __post_init__(self) -> None:
        self.important_ratio = check_important_ratio(self.important_ratio)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        needs = frozenset({Need.CLS_ATTENTION, Need.VISION_FEATURES})
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=needs)]

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        if not traits.packed_tower:
            return self.plan(num_visual, num_layers)
        # Qwen-VL: the merged tokens themselves (the stage's hidden states) are compared, not the merger's input.
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=frozenset({Need.CLS_ATTENTION}))]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        attention = ctx.vision_cls_attention if ctx.vision_cls_attention is not None else ctx.vision_received_attention
        assert attention is not None, "the engine supplies the [CLS] attention (or its substitute) for vispruner"
        features = ctx.vision_features if ctx.vision_features is not None else ctx.visual_hidden
        geometry = ctx.geometry
        # Known on the host: only inputs with tiles or line breaks take the per-view path.
        tiled = geometry is not None and (geometry.has_tiles or geometry.has_newlines)
        keep_index = select_vispruner(
            attention,
            features,
            ctx.keep,
            self.important_ratio,
            views=geometry.view if tiled else None,
            float32=self.float32,
        )
        return Selection(keep_index=keep_index, scores=attention)
