"""CDPruner: keep the visual tokens that maximise conditional diversity, by a DPP conditioned on the instruction.

Reference: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(arXiv 2506.10967); official code github.com/Theia-4869/CDPruner (``encode_images`` in ``llava/model/llava_arch.py``,
the text tower in ``llava/model/multimodal_encoder/clip_encoder.py``).

What the reference does and vlprune reproduces, on the projected visual tokens ``z`` (the projector's output, the
language model's input):

1. Similarity ``S = ẑ ẑᵀ`` (cosine of the projected tokens, in float32, as the reference's ``image_normalized``).
2. Relevance ``r_i`` of each token to the instruction, min-max normalised with one min and one max over the **whole
   batch tensor** (the reference's ``relevance.min()`` / ``.max()``, not per sample):
   ``r ← (r - min + 1e-6) / (max - min)``.
3. Optionally ``r ← exp(α r)`` with ``α = θ / (2 (1 - θ))``: commented out in the reference (θ = 0.5 there), so off
   by default; ``relevance_weight=θ`` turns it on (OpenVINO GenAI's CDPruner runs it with θ = 0.5).
4. Kernel ``L = diag(r) S diag(r)`` and the greedy fast-MAP DPP of Chen et al. (2018), vectorised over the batch:
   ``d² = diag(L)``; each step picks ``j = argmax d²``, ``e = (L_j - Σ_t c_t[j] c_t) / sqrt(d²_j)``, appends ``e`` to
   the ``c`` rows, ``d² -= e²``, ``d²_j = -inf``. The ``keep`` picks are sorted ascending; pruned tokens are dropped
   (no merging) and the shortened prompt is numbered contiguously (default ``positions="reindex"``).

Relevance, and the deviation it needs: the reference's relevance is ``mean_M(-cos(CLIP image embed, CLIP text
embed))`` from a ``CLIPTextModelWithProjection`` it loads beside the vision tower (the negation, its maintainers say,
is for CLIP only: Theia-4869/CDPruner#14, #9). LLaVA checkpoints carry no CLIP text tower, so vlprune uses on every
family the variant that needs no extra model, OpenVINO GenAI's (``vision_token_pruning_processor.cpp``,
``cdpruner/relevance_calculator.cpp``, written for Qwen-VL where the maintainers give no code): ``r_i = cos(z_i, t̄)``
with ``t̄`` the mean of the language model's input embeddings of the instruction (the real text tokens after the
image), not negated (``use_negative_relevance=false``; ``negative_relevance=True`` negates). ``relevance="clip"``
names the reference's CLIP variant and is refused: it is not implemented.

Other deviations, each for a reason:
- ``keep`` is the number of tokens kept per sample, the reference's ``visual_token_num`` on LLaVA-1.5.
- When the kernel's rank is spent (a token's remaining ``d²`` is not positive: duplicated tokens, or more picks than
  the embedding width), the reference divides by ``sqrt`` of it and fills the rest with NaN picks; vlprune makes that
  step's update zero, so the remaining picks are distinct tokens taken by their remaining ``d²``.
- ``normalise="sample"`` (the default) min-max normalises each sample on its own, so that a sample's choice does not
  depend on the others of its batch. The reference normalises over the whole tensor, but it only ever runs one
  sample, where the two are the same; ``normalise="batch"`` reproduces its tensor-wide min and max on batches.
- Pruning happens at the input of decoder layer 0 rather than by shortening ``inputs_embeds``: every decoder layer
  sees exactly the kept tokens; ``positions="original"`` keeps the kept tokens' positions instead.

LLaVA-NeXT (the reference's ``prepare_inputs_labels_for_multimodal``): every crop (the base view and each tile) runs
its own DPP over its own tokens, one relevance normalisation over all of them, and the ``image_newline`` tokens are
always kept. vlprune does the same from ``ctx.geometry``'s crops with a per-sample budget: the line breaks are kept
and the rest of ``keep`` is shared among the crops in proportion to their tokens (the reference gives every crop the
same ``visual_token_num``, so its total grows with the tile grid, and unpads after selecting, so a tile keeps what
survives unpadding; vlprune selects among the unpadded tokens, which also leaves the padding out of the
normalisation). When ``keep`` does not exceed the line breaks, they are dropped and the crops share all of it.

Qwen-VL: the maintainer says both features are taken after the PatchMerger (Theia-4869/CDPruner#7, #4): the
language model's input embeddings of the image (or video) tokens, as here; the kept tokens keep their multimodal
positions (the only numbering vlprune offers there).

The selection is :func:`select_cdpruner`, a function of plain tensors, which the pruner calls and another engine can
call alike; :func:`dpp_greedy` is the fast-MAP inference on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan
from vlprune.pruners.groups import line_breaks_first, proportional_crop_shares
from vlprune.pruners.options import check_choice

RELEVANCE_SOURCES = ("embeddings", "clip")
NORMALISATIONS = ("batch", "sample")
_MIN_MAX_EPS = 1e-6  # the reference's offset, which keeps the least relevant token's weight above zero


class ConditionalTokens(NamedTuple):
    """What :func:`select_cdpruner` returns."""

    index: torch.Tensor
    """(B, keep) long indices of the kept tokens, ascending."""
    relevance: torch.Tensor
    """(B, N) float32 each token's relevance after normalisation (and the exponent when on); 0 at line breaks."""


def check_relevance_weight(value: object) -> float | None:
    """``value`` if it is None or a θ in (0, 1) (α = θ / (2 (1 - θ)) needs θ < 1); else a VlpruneError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise VlpruneError(f"relevance_weight={value!r} must be None (no exponent, the reference) or a θ in (0, 1)")
    return float(value)


def check_relevance_source(value: object) -> str:
    value = check_choice("relevance", value, RELEVANCE_SOURCES)
    if value == "clip":
        raise VlpruneError(
            "relevance='clip' (the reference's CLIP text-tower relevance) is not implemented: LLaVA checkpoints carry "
            "no CLIP text tower; use relevance='embeddings' (the instruction's input embeddings, OpenVINO's variant)"
        )
    return value


@register
@dataclass
class CDPruner(Pruner):
    """Options: ``relevance_weight`` (θ of the relevance exponent; None: off, as the reference), ``normalise``
    ("sample", the default: each sample's own min-max, the reference's at its batch of one; "batch": one min-max over
    the whole batch tensor, as the reference's code is written), ``negative_relevance`` (negate the cosine, as
    the reference does for CLIP embeddings), ``relevance`` ("embeddings"; "clip" is refused)."""

    name = "cdpruner"
    stage = Stage.PRE_LLM
    reference = "CDPruner, arXiv 2506.10967 (Theia-4869/CDPruner)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    relevance_weight: float | None = None
    normalise: str = "sample"
    negative_relevance: bool = False
    relevance: str = "embeddings"

    def __post_init__(self) -> None:
        self.relevance_weight = check_relevance_weight(self.relevance_weight)
        self.normalise = check_choice("normalise", self.normalise, NORMALISATIONS)
        self.relevance = check_relevance_source(self.relevance)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        needs = frozenset({Need.INITIAL_EMBEDDINGS})
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=needs)]

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.initial_text_hidden is not None, "the engine supplies the instruction's embeddings for cdpruner"
        geometry = ctx.geometry
        # Whether any token comes from a tile is known on the host; only then does the per-crop path run.
        crops = geometry.crop if geometry is not None and geometry.has_tiles else None
        kept = select_cdpruner(
            ctx.visual_hidden,
            ctx.initial_text_hidden,
            ctx.initial_text_mask,
            ctx.keep,
            relevance_weight=self.relevance_weight,
            normalise=self.normalise,
            negative_relevance=self.negative_relevance,
            crops=crops,
        )
        return Selection(keep_index=kept.index, scores=kept.relevance)


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen et al., 2018, the fast incremental Cholesky form), batched.

    Args:
        kernel: (B, N, N) positive semi-definite kernels.
        k: picks per sample, at most N.

    Returns:
        (B, k) long indices in the order they were picked; all distinct.
    """
    batch, count = kernel.shape[:2]
    rows = torch.arange(batch, device=kernel.device)
    factors = kernel.new_zeros(k, batch, count)  # (k, B, N): the rows c_t of the incremental Cholesky factor
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N): d²
    picks = torch.empty(k, batch, dtype=torch.long, device=kernel.device)
    for step in range(k):
        pick = gains.argmax(dim=-1)
        picks[step] = pick
        gain = gains[rows, pick]
        projection = torch.einsum("tb,tbn->bn", factors[:step, rows, pick], factors[:step])
        # A spent rank (gain <= 0) would divide by sqrt of a non-positive number; that step changes nothing instead.
        scale = torch.where(gain > 0, gain.clamp_min(torch.finfo(gains.dtype).tiny).rsqrt(), 0.0)
        update = (kernel[rows, pick] - projection) * scale[:, None]
        factors[step] = update
        gains = gains - update.square()
        gains[rows, pick] = float("-inf")
    return picks.t()


def instruction_relevance(
    visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None, *, negative: bool = False
) -> torch.Tensor:
    """(B, N) float32 cosine between each visual token and the mean of its sample's real instruction embeddings."""
    text = text.float()
    if text_mask is None:
        mean = text.mean(dim=1)
    else:
        weights = text_mask.to(text.dtype)[..., None]
        mean = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    unit_visual = _unit(visual.float())
    unit_text = _unit(mean)
    cosine = torch.einsum("bnd,bd->bn", unit_visual, unit_text)
    return -cosine if negative else cosine


def _unit(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def _min_max(relevance: torch.Tensor, valid: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """The reference's ``(r - min + 1e-6) / (max - min)`` over the ``valid`` entries (of each sample, or the batch)."""
    dims = (-1,) if per_sample else (0, 1)
    low = relevance.masked_fill(~valid, float("inf")).amin(dim=dims, keepdim=True)
    high = relevance.masked_fill(~valid, float("-inf")).amax(dim=dims, keepdim=True)
    spread = high - low
    # Equal relevance everywhere (the reference would divide by zero) weighs every token alike.
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    return ((relevance - low + _MIN_MAX_EPS) / spread).masked_fill(~valid, 0.0)


def select_cdpruner(
    visual: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    keep: int,
    *,
    relevance_weight: float | None = None,
    normalise: str = "batch",
    negative_relevance: bool = False,
    crops: torch.Tensor | None = None,
) -> ConditionalTokens:
    """CDPruner's kept tokens: greedy MAP of the DPP with kernel ``diag(r) S diag(r)``.

    Args:
        visual: (B, N, D) the visual tokens as they enter the language model (the projector's output).
        text: (B, T, D) the language model's input embeddings of the instruction (the text after the image).
        text_mask: (B, T) which of them are real, or None for all.
        keep: tokens kept per sample (a count in [1, N]).
        relevance_weight: θ in (0, 1) turns on ``r ← exp(θ / (2 (1 - θ)) · r)``; None (the reference) leaves r.
        normalise: "batch" (the reference: one min and max over the whole batch) or "sample".
        negative_relevance: negate the cosine (the reference's choice for CLIP embeddings).
        crops: (B, N) each token's crop (vision-tower input, any ids) with -1 at line breaks, when some token comes
            from a tile (LLaVA-NeXT, OneVision), else None. With crops each crop runs its own DPP on its share of the
            budget (in proportion to its tokens), and the line breaks are kept when ``keep`` exceeds their count.

    Returns:
        the kept indices, ascending, and each token's relevance (:class:`ConditionalTokens`).

    Raises:
        VlpruneError: ``keep`` outside [1, N], or a bad ``relevance_weight`` or ``normalise``.
    """
    relevance_weight = check_relevance_weight(relevance_weight)
    check_choice("normalise", normalise, NORMALISATIONS)
    batch, count = visual.shape[:2]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= count:
        raise VlpruneError(f"keep={keep!r} must be an int count in [1, {count}] (the visual tokens per sample)")
    valid = torch.ones(batch, count, dtype=torch.bool, device=visual.device) if crops is None else crops >= 0
    relevance = _min_max(
        instruction_relevance(visual, text, text_mask, negative=negative_relevance), valid, normalise == "sample"
    )
    if relevance_weight is not None:
        relevance = torch.exp(relevance_weight / (2.0 * (1.0 - relevance_weight)) * relevance).masked_fill(~valid, 0)
    unit = _unit(visual.float())
    if crops is None:
        kernel = relevance[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance[:, None, :]
        return ConditionalTokens(dpp_greedy(kernel, keep).sort(dim=-1).values, relevance)
    rows = [_select_per_crop(unit[b], relevance[b], crops[b], keep) for b in range(batch)]
    return ConditionalTokens(torch.stack(rows), relevance)


def _select_per_crop(unit: torch.Tensor, relevance: torch.Tensor, crops: torch.Tensor, keep: int) -> torch.Tensor:
    """(keep,) ascending indices for one sample: its line breaks when the budget exceeds them, and each crop's share
    of the rest picked by the crop's own DPP."""
    kept, budget = line_breaks_first(crops, keep)
    if budget > int((crops >= 0).sum()):
        raise VlpruneError(f"keep={keep} exceeds the {len(crops)} visual tokens of a sample")
    for tokens, share in proportional_crop_shares(crops, budget):
        if share == 0:
            continue
        z = unit[tokens]
        r = relevance[tokens]
        kernel = r[:, None] * (z @ z.T) * r[None, :]
        kept.append(tokens[dpp_greedy(kernel[None], share)[0]])
    return torch.cat(kept).sort().values


__all__ = ["CDPruner", "ConditionalTokens", "dpp_greedy", "instruction_relevance", "select_cdpruner"]
