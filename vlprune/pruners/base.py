"""The pruner protocol: what a pruner declares, what it receives and what it returns.

A pruner owns scoring and selection only. The engine (``vlprune.engine``) owns hooks, gathering, masks, positions,
cache and statistics, and calls :meth:`Pruner.select` once per stage with a :class:`StageContext`.

Stages are numbered by the decoder layer whose *input* they prune::

    vision tower ─▶ projector ─▶ [stage at layer 0] ─▶ layer 0 ─▶ ... ─▶ [stage at layer K] ─▶ layer K ─▶ ...
                                  "pre-LLM"                               "in-LLM"

so a stage at layer 0 is pre-LLM pruning, and a stage at layer K >= 1 drops tokens after layer K - 1 has run (FastV's
"K = 2" is a stage at layer 2, scored with the attention of layer 1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry


class Stage(enum.StrEnum):
    """Where a pruner acts, as listed by ``vlprune methods``."""

    NONE = "none"
    VISION = "vision-encoder"
    PRE_LLM = "pre-LLM"
    IN_LLM = "in-LLM"
    ATTENTION = "attention-modifier"


class QueryRows(enum.StrEnum):
    """Which query tokens' attention rows a stage needs from the layer before it."""

    LAST = "last"  # the last token of each sample (FastV)
    TEXT = "text"  # every non-visual, non-padding token after the first visual token


@dataclass(frozen=True)
class StagePlan:
    """One pruning step: before decoder layer ``layer``, keep ``keep`` visual tokens per sample.

    Attributes:
        layer: decoder layer whose input is pruned; 0 means pre-LLM.
        keep: visual tokens per sample that continue (recycled tokens come on top of these), or None when the pruner
            decides the count from the data at :meth:`Pruner.select` (each sample its own: the engine then runs the
            stage sample by sample; the context's ``keep`` is then the number of tokens present).
        query_rows: attention rows the engine computes at layer ``layer - 1`` for this stage, or None.
        own_layer_attention: compute those rows with layer ``layer``'s own queries and keys, from its input, before
            pruning it (PyramidDrop), instead of from layer ``layer - 1``'s attention.
        per_head_attention: hand the pruner those rows per head, (B, H, R, N), instead of averaged over heads.
        query_row_attention: also hand the pruner the attention of those rows to the query rows' own tokens
            ((B, R, R), or (B, H, R, R) per head): the text-to-text attention of text-guided methods (AdaptInfer).
        vision_cls_attention: whether the stage needs the vision tower's [CLS] attention row at the feature layer.
        text_tokens: whether the stage needs the hidden states of the text after the image (the instruction).
        vision_features: whether the stage needs the projector's input features of the visual tokens and the
            projector itself (methods that score through the projector or merge before it).
        vision_keys: whether the stage needs the head-averaged keys of the visual tokens at the vision feature layer.
        initial_embeddings: whether the stage needs the language model's input embeddings (layer 0's input) of the
            visual tokens and of the text after the image, whatever layer it runs at.
        vision_attention: whether the stage needs the full attention map among the image's tokens at the vision
            feature layer (head mean), and the pixels the tower received.
        vision_received_attention: whether the stage needs the attention each visual token receives at the vision
            feature layer, averaged over its crop's patch queries and the heads (works on multi-crop families).
        vision_crop_attention: whether the stage needs each crop's attention map among its patches at the vision
            feature layer, the crops' pixels and the function that places per-crop values on the visual tokens as
            the model packs its features (multi-crop families; VFlowOpt).
        value_states: whether the stage also needs the value vectors of the visual tokens and of the query rows at
            the layer its attention rows come from (FlowCut's language-model stage). Not with ``own_layer_attention``.
        keep_at_most: ``keep`` is an upper bound: a sample with fewer visual tokens at this stage keeps them all
            (FlowCut's language-model stage runs only where the vision side left more than its budget).
    """

    layer: int
    keep: int | None
    query_rows: QueryRows | None = None
    own_layer_attention: bool = False
    per_head_attention: bool = False
    query_row_attention: bool = False
    vision_cls_attention: bool = False
    text_tokens: bool = False
    vision_features: bool = False
    vision_keys: bool = False
    initial_embeddings: bool = False
    vision_attention: bool = False
    vision_received_attention: bool = False
    vision_crop_attention: bool = False
    value_states: bool = False
    keep_at_most: bool = False


@dataclass
class StageContext:
    """What the engine hands to :meth:`Pruner.select` at one stage. B = batch, N = visual tokens now, D = hidden.

    Attributes:
        layer: decoder layer whose input is being pruned (0 = pre-LLM).
        keep: how many of the N visual tokens to keep per sample.
        visual_hidden: (B, N, D) hidden states of the visual tokens at this point.
        visual_positions: (B, N) RoPE positions of those tokens.
        visual_origin: (B, N) index of each token among the original visual tokens of its sample (0..N0-1), -1 for a
            recycled token.
        geometry: where each of the N tokens came from (image, base view, tile or ``image_newline`` line break, grid
            places, crop and patch; -1 in every field for recycled tokens); see :mod:`vlprune.geometry`.
        query_attention: (B, R, N) softmax attention of the requested query rows to the visual tokens at layer
            ``layer - 1`` (or ``layer`` with ``own_layer_attention``), normalised over all keys, averaged over heads
            ((B, H, R, N) per head with ``per_head_attention``), or None.
        query_positions: (B, R) RoPE positions of those query rows, or None.
        query_row_attention: (B, R, R) attention of the query rows to the query rows' own tokens (row i, column j:
            row i's attention to row j's token), normalised over all keys like ``query_attention`` and per head
            alike, when the plan asked for it, else None. Columns of rows that ``query_mask`` marks unreal repeat a
            real row's token: mask them.
        rotary: the language model's rotary embedding as a function of (B, K) positions -> (cos, sin), each
            (B, K, head_dim), for pruners that correct for RoPE, or None.
        query_mask: (B, R) which of the R rows are real (rows are padded when samples have different text lengths).
        vision_cls_attention: (B, N) attention of the vision tower's [CLS] query to each visual token at the feature
            layer (averaged over heads), or None.
        text_hidden: (B, T, D) hidden states of the real text tokens after the first visual token (the instruction),
            when the plan asked for them; samples with fewer tokens repeat their last one.
        text_mask: (B, T) which of the T text tokens are real.
        vision_features: (B, N, F) what the projector received for each visual token (zeros for recycled tokens), or
            None. ``projector(vision_features)`` gives the tokens' embeddings at the input of the language model.
        projector: the model's projector module (vision features -> language-model embeddings), or None.
        vision_keys: (B, N, d) keys of the visual tokens at the vision feature layer, averaged over heads (zeros for
            recycled tokens), or None.
        initial_visual_hidden: (B, N0, D) the input embeddings of all the original visual tokens (not only the current
            ones; ``visual_origin`` indexes them), or None.
        initial_text_hidden: (B, T, D) the input embeddings of the text after the first visual token, padded like
            ``text_hidden``, or None.
        initial_text_mask: (B, T) which of those are real.
        vision_attention: (B, N0, N0) head-mean softmax attention among the original visual tokens at the vision
            feature layer (rows: queries; normalised over all the tower's tokens, [CLS] included), or None.
        pixel_values: (B, C, H, W) the images as the vision tower received them, or None.
        vision_received_attention: (B, N) attention each token receives at the vision feature layer, averaged over
            the patch queries of its own crop and the heads (0 for line breaks and recycled tokens), or None.
        vision_crop_attention: (C, P, P) head-mean softmax attention among each crop's P patches at the vision
            feature layer (rows: queries; normalised over all the tower's tokens, [CLS] included), for every crop of
            the batch (``geometry.crop`` indexes them), or None.
        vision_crop_pixels: (C, channels, height, width) the crops as the vision tower received them, or None.
        pack_crop_values: places per-crop patch values (C, P) on this context's original visual tokens, (B, N0), as
            the model packs its features (the stitched tile grid, unpadded, and OneVision's bilinear down-scaling);
            line breaks get the second argument. Index the result with ``visual_origin``. None unless the plan
            asked for ``vision_crop_attention``.
        visual_values: (B, Hkv, N, d) value vectors of the visual tokens at the layer the attention rows come from
            (key-value heads, before any repetition for grouped-query attention), or None.
        query_values: (B, Hkv, R, d) value vectors of the query rows at that layer, or None.
        vision_kept: (B, N) True at the visual tokens whose features the vision tower kept, for pruners with
            vision-encoder stages (:meth:`Pruner.vision_layers`) at the stage at layer 0, or None. A token of
            OneVision's down-scaled grid counts as kept when its nearest source patch is.
        stage_index: 0 for the first stage of the pruner's plan, 1 for the next, ...
        num_layers: decoder layers in the language model.
    """

    layer: int
    keep: int
    visual_hidden: torch.Tensor
    visual_positions: torch.Tensor
    visual_origin: torch.Tensor
    geometry: VisualGeometry | None = None
    query_attention: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    query_row_attention: torch.Tensor | None = None
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    vision_cls_attention: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    projector: nn.Module | None = None
    vision_keys: torch.Tensor | None = None
    initial_visual_hidden: torch.Tensor | None = None
    initial_text_hidden: torch.Tensor | None = None
    initial_text_mask: torch.Tensor | None = None
    vision_attention: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    vision_received_attention: torch.Tensor | None = None
    vision_crop_attention: torch.Tensor | None = None
    vision_crop_pixels: torch.Tensor | None = None
    pack_crop_values: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    visual_values: torch.Tensor | None = None
    query_values: torch.Tensor | None = None
    vision_kept: torch.Tensor | None = None
    stage_index: int = 0
    num_layers: int = 0

    @property
    def batch_size(self) -> int:
        return self.visual_hidden.shape[0]

    @property
    def num_visual(self) -> int:
        return self.visual_hidden.shape[1]


@dataclass
class VisionLayerContext:
    """What the engine hands to :meth:`Pruner.select_in_vision` at one layer of the vision encoder.

    B = images, T = tokens the layer attends over (the [CLS] token first when the tower has one), H heads, d = head
    dimension. Tokens the pruner dropped for one image while another image of the batch kept more stay in the batch as
    fillers: ``real`` is False for them, no later layer attends to them, and the pruner must not keep them.

    Attributes:
        layer: encoder layer index (0-based) whose attention this is; a pruning decision applies to its output.
        feature_layer: index of the encoder layer whose output the projector reads (the deepest one when several).
        query, key, value: (B, H, T, d) the layer's attention inputs.
        scaling: the attention's logit scale.
        real: (B, T) False at filler tokens.
        origin: (B, T) index of each token in the tower's original sequence ([CLS] = 0 when present).
        has_cls: whether token 0 is a [CLS] token that must stay.
        keep: (B,) patch tokens of each image (crop) that must reach the projector (see :meth:`Pruner.vision_budget`).
        group: patches that become one language-model token (Qwen-VL's m x m merge groups, consecutive in the
            sequence); a decision keeps or drops whole groups, and ``keep`` is a multiple of it.
        state: a dictionary that lives for one pass of the vision tower, for scores a pruner carries across layers.
    """

    layer: int
    feature_layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    real: torch.Tensor
    origin: torch.Tensor
    has_cls: bool
    keep: torch.Tensor
    state: dict
    group: int = 1


@dataclass
class RecycledTokens:
    """New tokens a pruner builds from pruned ones (merging), entered after the kept visual tokens of each sample.

    Attributes:
        hidden: (B, M, D) hidden states of the new tokens.
        positions: (B, M) RoPE position of each new token, in the original numbering.
    """

    hidden: torch.Tensor
    positions: torch.Tensor


@dataclass
class Selection:
    """A pruner's answer at one stage.

    Attributes:
        keep_index: (B, keep) indices into the stage's N visual tokens; the engine sorts them to keep causal order,
            unless ``ordered``.
        recycled: merged tokens to add after the kept ones, or None.
        kept_hidden: (B, keep, D) new hidden states for the kept tokens, in ``keep_index`` order sorted ascending
            (a pruner that merges pruned tokens into kept ones, in place), or None.
        scores: (B, N) the scores the selection was made from, for statistics and debugging, or None.
        ordered: ``keep_index`` is in the pruner's own order (HoloV's reference concatenates its tokens crop by crop,
            most attended first). When positions are re-indexed the kept tokens enter the sequence in that order,
            numbered contiguously, so the causal order is that order; with original positions the engine sorts them
            as always (a token's position and its place in the causal order must agree). Not with ``kept_hidden``.
    """

    keep_index: torch.Tensor
    recycled: RecycledTokens | None = None
    scores: torch.Tensor | None = None
    kept_hidden: torch.Tensor | None = None
    ordered: bool = False


ANYRES_FAMILIES = frozenset({"llava-next", "llava-onevision"})
"""The families that encode an image as a base view and tiles (the references' "anyres" paths)."""

QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
"""The Qwen-VL families: dynamic resolution, m x m patches merged into one token, multimodal RoPE."""

PROBE_TOKENS = 1 << 30
"""The token count the engine passes to :meth:`Pruner.plan` at attach time, when the real count is not known yet: the
plan's layers and needs must come out right; its token counts are not used."""


def is_probe(num_visual: int) -> bool:
    """Whether :meth:`Pruner.plan` is being asked for its layers only (see :data:`PROBE_TOKENS`)."""
    return num_visual >= PROBE_TOKENS


def check_budget(keep: object) -> int | float:
    """``keep`` if it is a valid budget: an int count of at least 1, or a float fraction in (0, 1).

    A float is always a fraction, so a whole-number float (``1.0``, ``64.0``) is refused rather than read either way:
    ``keep=1.0`` could mean "everything" or "one token".

    Raises:
        VlpruneError: another type, a count below 1, a fraction outside (0, 1), or a whole-number float; the message
            names both readings of the last.
    """
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise VlpruneError(f"keep={keep!r} must be an int count or a float fraction in (0, 1)")
    if isinstance(keep, float):
        if keep.is_integer() and keep >= 1:
            raise VlpruneError(
                f"keep={keep!r} is ambiguous: a float is a fraction in (0, 1) and {keep!r} is not one; write "
                f"keep={int(keep)} for {int(keep)} visual token{'s' if keep != 1 else ''}, or a fraction such as 0.25 "
                f"(method none keeps every token)"
            )
        if not 0.0 < keep < 1.0:
            raise VlpruneError(f"keep={keep!r} is a fraction outside (0, 1); pass a fraction in (0, 1) or a count")
        return keep
    if keep < 1:
        raise VlpruneError(f"keep={keep} must be at least 1 visual token (or a fraction in (0, 1))")
    return keep


def parse_budget(text: str) -> int | float:
    """A budget from text (the CLI's ``--keep``, a sweep's list): ``"64"`` a count, ``"0.25"`` a fraction.

    Raises:
        VlpruneError: text that is no number, or a number that is no valid budget (see :func:`check_budget`).
    """
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise VlpruneError(f"keep={text!r} must be a count (64) or a fraction (0.25)") from None
    return check_budget(value)


def resolve_keep(keep: int | float, num_visual: int) -> int:
    """Turn a budget into a token count: an int is a count, a float in (0, 1) a fraction of ``num_visual``.

    Raises:
        VlpruneError: an invalid budget (see :func:`check_budget`) or a count above ``num_visual``.
    """
    keep = check_budget(keep)
    if isinstance(keep, float):
        return max(1, round(keep * num_visual))
    count = keep
    if not 1 <= count <= num_visual:
        raise keep_out_of_range(count, num_visual)
    return count


def keep_out_of_range(keep: int, num_visual: int) -> VlpruneError:
    """The error for a count budget above the ``num_visual`` visual tokens it is resolved against. It stays a plain
    VlpruneError (the one type vlprune raises) and carries both numbers (:func:`keep_range_of`), so that the engine
    can name the sample or the image of a ragged batch whose count it is, where "per sample" would be untrue."""
    error = VlpruneError(
        f"keep={keep} is outside [1, {num_visual}]: the model has {num_visual} visual tokens per sample"
    )
    error.keep_range = (keep, num_visual)
    return error


def keep_range_of(error: BaseException) -> tuple[int, int] | None:
    """(keep, visual tokens) of an error from :func:`keep_out_of_range`, else None."""
    return getattr(error, "keep_range", None)


def sample_keep_error(keep: int, num_visual: int, sample: int, counts: list[int]) -> VlpruneError:
    """A count budget above the tokens of ``sample`` of a ragged batch whose samples have ``counts`` visual tokens."""
    return VlpruneError(
        f"keep={keep} is outside [1, {num_visual}] for sample {sample} of the batch, which has {counts[sample]} "
        f"visual tokens (the samples have {', '.join(map(str, counts))}; a count budget applies to each sample: pass "
        f"at most {min(counts)}, or a fraction such as 0.25)"
    )


def image_keep_error(
    keep: int, num_visual: int, image: int, tokens: int, sample: int | None = None, item: str = "image"
) -> VlpruneError:
    """A count budget above what ``image`` (of ``sample``, when known) of a batch gives inside the vision tower: its
    ``tokens`` visual tokens, or, for an untiled view, the view's ``num_visual`` patches; ``item`` names what the
    tower encoded."""
    of_sample = "" if sample is None else f" (sample {sample})"
    patches = "" if num_visual == tokens else f", {num_visual} patches in its view"
    return VlpruneError(
        f"keep={keep} is outside [1, {num_visual}] for {item} {image} of the batch{of_sample}, which has {tokens} "
        f"visual tokens{patches}; a count budget applies to each {item} in the vision tower: pass at most "
        f"{num_visual}, or a fraction such as 0.25"
    )


def check_layer(layer: int, num_layers: int, *, minimum: int = 0, method: str) -> int:
    """Validate a decoder layer index for a pruner; negative indices count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise VlpruneError(f"layer={layer!r} for {method} must be an int")
    resolved = layer + num_layers if layer < 0 else layer
    if not minimum <= resolved < num_layers:
        raise VlpruneError(
            f"layer={layer} for {method} is out of range: the language model has {num_layers} layers, "
            f"valid layers are {minimum}..{num_layers - 1}"
        )
    return resolved


@dataclass
class Pruner:
    """Base class of every pruner. Subclasses are dataclasses whose fields are the method's options; they set the
    class attributes ``name``, ``stage`` and ``reference`` and implement :meth:`plan` and :meth:`select`.

    Attributes:
        keep: visual tokens that reach the language model (an int), or the fraction kept (a float in (0, 1)).
        modifier: an attention modifier (VAR) the engine runs with this pruner, set by ``create("METHOD+var")``.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.NONE
    reference: ClassVar[str] = ""
    default_positions: ClassVar[str] = "original"
    """How the method's reference numbers RoPE positions after pruning: "original" (kept tokens keep theirs) or
    "reindex" (the shortened prompt is numbered contiguously). ``vlprune.attach(positions=None)``, the API, the CLI and
    the lmms-eval wrapper default to it; an explicit ``positions=`` overrides it."""
    cls_substitute: ClassVar[str | None] = None
    """What the method's reference reads instead of the [CLS] attention on towers without a [CLS] token (SigLIP, the
    Qwen-VL ViTs): "received" hands stages that ask for ``vision_cls_attention`` the attention each token receives
    (``StageContext.vision_received_attention``) instead; None refuses such towers."""

    keep: int | float | None = None
    modifier: Any = field(default=None, init=False, repr=False, compare=False)

    def reference_positions(self) -> str:
        """The position handling of the reference for this configuration (see :attr:`default_positions`); methods
        whose reference numbers differently per variant override it."""
        return self.default_positions

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        """The stages this pruner runs for a model with ``num_visual`` visual tokens and ``num_layers`` layers.

        The stage layers and what each stage asks for may depend on ``num_layers`` but not on ``num_visual``: the
        engine installs its hooks before it knows how many visual tokens a call brings, calling ``plan`` with
        :data:`PROBE_TOKENS` (see :func:`is_probe`); budgets that cannot be resolved then may keep every token.
        """
        raise NotImplementedError

    def plan_for_family(self, family: str, num_visual: int, num_layers: int) -> list[StagePlan]:
        """The stages for a model of ``family`` ("llava", "llava-next", ...): :meth:`plan`, unless the method's
        reference runs other stages on that family (FlowCut's LLaVA-NeXT path adds a language-model stage)."""
        return self.plan(num_visual, num_layers)

    def select(self, ctx: StageContext) -> Selection:
        """Choose the visual tokens to keep at one stage."""
        raise NotImplementedError

    def vision_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        """Vision encoder layers at which :meth:`select_in_vision` runs (none by default).

        Args:
            num_layers: layers of the vision encoder.
            feature_layer: index of the layer whose output the projector reads.
        """
        return []

    def vision_budget(self, family: str, image_tokens: int, view_patches: int, views: int) -> int:
        """Patches each view (crop) of an image keeps inside the vision tower of a ``family`` model, for an image that
        gives ``image_tokens`` visual tokens from ``views`` views of ``view_patches`` patches each (on the Qwen-VL
        family in merge groups: one per token); by default the budget resolved against one view's patches."""
        return resolve_keep(self._required_keep(view_patches), view_patches)

    def select_in_vision(self, ctx: VisionLayerContext) -> torch.Tensor | None:
        """At a vision layer listed by :meth:`vision_layers`: None to keep every token, or a (B, T) bool tensor of the
        tokens that continue after this layer ([CLS] included). Each image keeps as many as it likes, but on the last
        pruning layer before the feature layer every image must keep exactly ``ctx.keep`` patches."""
        raise NotImplementedError

    def _required_keep(self, num_visual: int) -> int:
        if self.keep is None:
            raise VlpruneError(f"method {self.name!r} needs a budget: pass keep=<count> or keep=<fraction in (0, 1)>")
        return resolve_keep(self.keep, num_visual)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, in ascending index order. scores: (B, N) -> (B, k)."""
    if k >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def first_true(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) the columns of the first ``width`` True entries of each row of ``mask`` (B, L), ascending, and
    (B, width) validity; a row with fewer repeats its last one (column 0 when it has none). The shapes do not
    depend on the data (unlike ``nonzero``), so nothing is read back from the device and a graph can be captured."""
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # True columns first
    count = mask.sum(dim=1, keepdim=True)
    valid = torch.arange(width, device=mask.device)[None, :] < count
    last = torch.gather(order, 1, (count - 1).clamp(min=0, max=max(width - 1, 0)))
    return torch.where(valid, order, last), valid
