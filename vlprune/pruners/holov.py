"""HoloV: holistic visual token pruning: crop budgets from attention and within-crop diversity, before the LLM.

Reference: Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention",
NeurIPS 2025 (arXiv 2510.02912); official code github.com/obananas/HoloV (``HoloV()`` in ``llava/model/utils.py``,
called from ``llava/model/llava_arch.py``).

What the reference does and vlprune reproduces, on the projected visual tokens ``z`` (the language model's input) and
the vision [CLS] attention ``a`` at the feature layer (head mean):

1. Split the N tokens, in raster order, into C contiguous chunks ("crops") of N // C tokens, the first N % C crops one
   longer. On LLaVA-1.5 the reference hard-codes C = 16 (``llava_arch.py``: ``HoloV(..., num_patches=16,
   new_image_token_num=64)``) and publishes only the 64-token setting. For any budget vlprune uses the rule of the
   reference's Qwen2.5-VL file (``qwen-model-HoloV/modeling_qwen2_5_vl.py``: ``num_patches = max(1, int((1024 / 576)
   · image_token_len / keep_num))``), which gives the same 16 crops for 64 of 576 tokens and 8 and 5 for 128 and 192.
2. In each crop (n tokens): ``S = (1 - I) ⊙ ẑ ẑᵀ`` on unit vectors, ``μ_i = Σ_j S_ij / (n - 1)``,
   ``V_i = Σ_j (S_ij - μ_i)² / (n - 1)`` (the zeroed diagonal counted, as in the code); holistic token score
   ``H = 1000 a + α · V · mean|1000 a| / mean|V|`` with ``α = 0.09``; crop score = mean of H over the crop.
3. Crop weights ``w_c = score_c / Σ score``; quotas ``floor(w_c · keep)``, the remainder one each to the crops of
   highest weight.
4. In each crop keep its quota of tokens with the highest [CLS] attention, and hand them to the language model crop by
   crop, most attended first inside a crop (a crop kept whole stays in raster order), numbered contiguously: the
   reference's ``torch.cat`` of each crop's ``topk`` (``llava/model/utils.py``). ``reference_order=False`` keeps the
   tokens in raster order instead; with ``positions="original"`` they are always in raster order (each token's
   position and its place in the causal order must agree).

Note: because V is rescaled per crop to the attention's mean magnitude, a crop's score is ``1.09 · mean(1000 a)`` in
the reference's code as in vlprune: the variance term changes no budget. vlprune keeps the formula as the code has it.

Deviations, each for a reason:
- When a crop's quota exceeds its size, the reference keeps the whole crop and pads the result with zero vectors,
  which then enter the language model as tokens. vlprune never pads: it hands the excess to the other crops in
  proportion to their weights (the iterative redistribution the paper describes), so exactly ``keep`` real tokens
  remain.
- Tokens of equal attention inside a crop (a crop of all-zero attention, in practice) are taken lowest index first,
  by a stable sort; the reference's ``torch.topk`` leaves which of them it keeps unspecified. The per-crop choice is
  made with fixed-width sorts over all tokens at once, so that a captured graph holds it.
- A crop of one token gets the score ``1000 a`` (its variance is 0); the reference uses the unscaled ``a`` there, an
  inconsistency that only crops of one token meet.
- ``crops`` sets C directly; ``tiles=True`` cuts the token grid into rectangular tiles (r x C/r with r the largest
  divisor of C not above its square root) instead of the reference's raster chunks; it needs a square grid.
- Towers without a [CLS] token (SigLIP, OneVision's tower) take the reference's own substitute from its Qwen2.5-VL
  file (``qwen-model-HoloV/modeling_qwen2_5_vl.py``): the attention each token receives at the vision feature layer,
  averaged over heads and queries (there the last ViT block, as OneVision's feature layer is; per crop on tiled
  inputs). That file's 2 x 2 merge-group averaging is specific to Qwen's patch merger and applies on Qwen-VL only.

Qwen-VL (the reference's ``modeling_qwen2_5_vl.py``): the attention each patch receives at the last encoder block,
averaged over its image's queries and the heads, pooled over each 2 x 2 merge group; crops by the same rule
(``num_patches = int(1024 / 576 · N / keep)``, the one its Qwen file uses). Deviations: the scores are put back from
the encoder's window order into the raster order of the tokens (the reference reverses the window permutation for the
features but not for the scores, so they only line up on images of one window), per image (the reference averages
over the queries of every image of the call, which scales each image's scores), and the span is the image tokens
(the reference's starts at ``<|vision_start|>`` and misses the last image token); kept tokens keep their multimodal
positions, as in the reference.

LLaVA-NeXT (the reference's ``llava_arch.py``: the ``image_newline`` lines commented out, unpadding kept): the line
breaks are removed and the rest, the base view then the stitched tile grid row by row, is chunked and pruned as one
sequence, crops crossing the base/tile border as in the reference. Deviation: the reference hard-codes 16 crops and
a 64-token budget there; vlprune applies its crop rule (above) to the budget asked, over the tokens without the line
breaks.

The selection is :func:`select_holov`, a function of the projected tokens, the attention scores and, on anyres
inputs, where the line breaks are (re-exported by :mod:`vlprune.pruners.selection`), which the pruner calls and
another engine can call alike. Its options are the reference's choices made open: ``crops=None`` is the reference's
crop rule, ``tiles=False`` its raster chunks, ``reference_order=True`` its crop-by-crop order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan
from vlprune.pruners.groups import crop_by_crop_order, crop_quotas, keep_by_quota, strip_crops, tile_crops

ALPHA = 0.09
ATTENTION_SCALE = 1000.0
_EPS = 1e-6


def reference_crop_count(num_visual: int, keep: int) -> int:
    """The reference's number of crops for ``keep`` of ``num_visual`` tokens (16/8/5 for 64/128/192 of 576)."""
    return max(1, int(1024 / 576 * num_visual / keep))


@dataclass(frozen=True)
class CropLayout:
    """The crops of ``N`` tokens, on one device: what the per-crop scores and quotas need, built once per shape (on
    the host, so that a captured graph only reads it)."""

    crop_of: torch.Tensor  # (N,) each token's crop
    members: tuple[torch.Tensor, ...]  # per crop, its tokens' indices
    capacity: torch.Tensor  # (C,) tokens per crop


_CROP_LAYOUTS: dict[tuple[int, int, bool, torch.device], CropLayout] = {}


def crop_layout_on(num_visual: int, crops: int, tiles: bool, device: torch.device) -> CropLayout:
    """The :class:`CropLayout` of ``crops`` raster strips (or 2-D tiles) of ``num_visual`` tokens, on ``device``."""
    key = (num_visual, crops, tiles, torch.device(device))
    if key not in _CROP_LAYOUTS:
        crop_of = tile_crops(num_visual, crops) if tiles else strip_crops(num_visual, crops)
        members = tuple((crop_of == crop).nonzero()[:, 0].to(device) for crop in range(crops))
        capacity = torch.bincount(crop_of, minlength=crops).to(device)
        _CROP_LAYOUTS[key] = CropLayout(crop_of.to(device), members, capacity)
    return _CROP_LAYOUTS[key]


def holistic_crop_scores(features: torch.Tensor, attention: torch.Tensor, layout: CropLayout) -> torch.Tensor:
    """(B, C) mean holistic score of each crop. features: (B, N, D); attention: (B, N)."""
    unit = features.float() / (features.float().norm(dim=-1, keepdim=True) + _EPS)
    scaled = attention.float() * ATTENTION_SCALE
    scores = []
    for members in layout.members:
        count = len(members)
        attention_c = scaled[:, members]
        if count <= 1:
            scores.append(attention_c.mean(dim=-1))
            continue
        z = unit[:, members]
        similarity = z @ z.transpose(1, 2)
        similarity = similarity - torch.diag_embed(similarity.diagonal(dim1=1, dim2=2))
        mean = similarity.sum(dim=-1) / (count - 1)
        variance = ((similarity - mean[..., None]) ** 2).sum(dim=-1) / (count - 1)
        rescale = attention_c.abs().mean(dim=-1, keepdim=True) / (variance.abs().mean(dim=-1, keepdim=True) + _EPS)
        scores.append((attention_c + ALPHA * variance * rescale).mean(dim=-1))
    return torch.stack(scores, dim=-1)


@register
@dataclass
class HoloV(Pruner):
    """Options: ``crops`` (C; default the reference's rule), ``tiles`` (2-D tiles instead of raster chunks),
    ``reference_order`` (true: crop by crop, most attended first, as the reference; false: raster order)."""

    name = "holov"
    stage = Stage.PRE_LLM
    reference = "HoloV, NeurIPS 2025 (obananas/HoloV)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1
    cls_substitute = "received"  # its Qwen2.5-VL file: the attention each token receives at the last ViT block

    crops: int | None = None
    tiles: bool = False
    reference_order: bool = True

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=frozenset({Need.CLS_ATTENTION}))]

    def crop_layout(self, num_visual: int, keep: int, device: torch.device) -> CropLayout:
        return holov_crop_layout(num_visual, keep, self.crops, self.tiles, device)

    def select(self, ctx: StageContext) -> Selection:
        attention = ctx.vision_cls_attention if ctx.vision_cls_attention is not None else ctx.vision_received_attention
        assert attention is not None, "the engine supplies the [CLS] attention (or its substitute) for holov"
        geometry = ctx.geometry
        # Whether any sample has line breaks is known on the host; only then does the per-sample path run.
        line_breaks = geometry.is_newline if geometry is not None and geometry.has_newlines else None
        keep_index = select_holov(
            ctx.visual_hidden,
            attention,
            ctx.keep,
            crops=self.crops,
            tiles=self.tiles,
            reference_order=self.reference_order,
            line_breaks=line_breaks,
        )
        return Selection(keep_index=keep_index, scores=attention, ordered=self.reference_order)


def holov_crop_layout(
    num_visual: int, keep: int, crops: int | None, tiles: bool, device: torch.device | str
) -> CropLayout:
    """The crops HoloV cuts ``num_visual`` tokens into for a budget of ``keep``: ``crops`` of them, or the
    reference's count (:func:`reference_crop_count`) when None; raster strips, or 2-D tiles with ``tiles``."""
    count = reference_crop_count(num_visual, keep) if crops is None else crops
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_visual:
        raise VlpruneError(f"crops={count!r} must be an int in [1, {num_visual}] (the number of visual tokens)")
    return crop_layout_on(num_visual, count, tiles, torch.device(device))


def select_holov(
    embeddings: torch.Tensor,
    attention: torch.Tensor,
    keep: int,
    *,
    crops: int | None = None,
    tiles: bool = False,
    reference_order: bool = True,
    line_breaks: torch.Tensor | None = None,
) -> torch.Tensor:
    """HoloV's kept tokens: crop budgets from attention and within-crop similarity variance, then each crop's most
    attended tokens.

    Args:
        embeddings: (B, N, D) the visual tokens as they enter the language model (the projector's output).
        attention: (B, N) each token's attention score at the vision feature layer: the [CLS] query's attention to
            it (head mean), or on towers without [CLS] (SigLIP, Qwen-VL's) the attention it receives (the
            reference's Qwen2.5-VL substitute).
        keep: tokens kept per sample (a count in [1, N], at most the tokens that are not line breaks).
        crops: C, the number of crops; None takes the reference's rule (:func:`reference_crop_count`).
        tiles: cut a square token grid into rectangular tiles instead of the reference's raster chunks.
        reference_order: hand the tokens crop by crop, most attended first, as the reference concatenates them;
            False gives them in ascending (raster) order.
        line_breaks: (B, N) True at LLaVA-NeXT's and OneVision's ``image_newline`` tokens when some sample has
            them, else None. They are removed first, as the reference does, and each sample's other tokens are
            chunked and pruned as one sequence.

    Returns:
        (B, keep) long indices into the N tokens, in crop-by-crop order with ``reference_order`` (the engine keeps
        that order when positions are re-indexed), else ascending.

    Raises:
        VlpruneError: ``crops`` is not an int in [1, N], or ``keep`` exceeds a sample's tokens without its line
            breaks.
    """
    if line_breaks is None:
        return _select_in_crops(embeddings, attention, keep, crops, tiles, reference_order)
    rows = []
    for sample in range(embeddings.shape[0]):
        visible = (~line_breaks[sample]).nonzero()[:, 0]
        if keep > len(visible):
            raise VlpruneError(
                f"holov drops the image_newline line breaks as its reference does; keep={keep} exceeds the "
                f"{len(visible)} other visual tokens"
            )
        picked = _select_in_crops(
            embeddings[sample : sample + 1, visible],
            attention[sample : sample + 1, visible],
            keep,
            crops,
            tiles,
            reference_order,
        )
        rows.append(visible[picked[0]])
    return torch.stack(rows)


def _select_in_crops(
    embeddings: torch.Tensor,
    attention: torch.Tensor,
    keep: int,
    crops: int | None,
    tiles: bool,
    reference_order: bool,
) -> torch.Tensor:
    """(B, keep) indices among ``embeddings``' tokens: crop quotas, then each crop's most attended tokens, crop by
    crop (most attended first) as the reference, or ascending without ``reference_order``."""
    layout = holov_crop_layout(embeddings.shape[1], keep, crops, tiles, embeddings.device)
    scores = holistic_crop_scores(embeddings, attention, layout)
    weights = scores / (scores.sum(dim=-1, keepdim=True) + _EPS)
    quota = crop_quotas(weights, layout.capacity, keep)
    if not reference_order:
        return keep_by_quota(attention, layout.crop_of, quota, keep)
    return crop_by_crop_order(attention, layout.crop_of, quota, layout.capacity, keep)
