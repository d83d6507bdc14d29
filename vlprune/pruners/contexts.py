"""What the engine hands a pruner: :class:`StageContext` at a stage of the language model, and
:class:`VisionLayerContext` at a layer of the vision tower.

A stage context is a small core (the layer, the budget, the visual tokens' hidden states, positions, origins and
geometry, the stage's index) plus the values the stage's plan asked for, each field tagged with what provides it
(:func:`provider_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from vlprune.geometry import VisualGeometry
from vlprune.needs import Need

_ROWS = "query_rows"  # provided for a plan with ``query_rows``
_VISION_PRUNING = "vision_pruning"  # provided at layer 0 to pruners that prune inside the vision tower

CORE_FIELDS = (
    "layer",
    "keep",
    "visual_hidden",
    "visual_positions",
    "visual_origin",
    "geometry",
    "stage_index",
    "num_layers",
)
"""The fields every stage context carries."""


def _by(provider: Need | str) -> dict[str, Need | str]:
    """A provided field's metadata: what provides it."""
    return {"provider": provider}


def provider_of(name: str) -> Need | str | None:
    """What provides the :class:`StageContext` field ``name``: a need, "query_rows", "vision_pruning", or None for a
    core field."""
    for spec in fields(StageContext):
        if spec.name == name:
            return spec.metadata.get("provider")
    raise AttributeError(f"StageContext has no field {name!r}")


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
        vision_features: (B, N, F) what the projector received for each visual token (zeros for recycled tokens), or
            None. ``projector(vision_features)`` gives the tokens' embeddings at the input of the language model.
        projector: the model's projector module (vision features -> language-model embeddings), or None.
        vision_keys: (B, N, d) keys of the visual tokens at the vision feature layer, averaged over heads (zeros for
            recycled tokens), or None.
        text_hidden: (B, T, D) hidden states of the real text tokens after the first visual token (the instruction),
            when the plan asked for them; samples with fewer tokens repeat their last one.
        text_mask: (B, T) which of the T text tokens are real.
        initial_visual_hidden: (B, N0, D) the input embeddings of all the original visual tokens (not only the current
            ones; ``visual_origin`` indexes them), or None.
        initial_text_hidden: (B, T, D) the input embeddings of the text after the first visual token, padded like
            ``text_hidden``, or None.
        initial_text_mask: (B, T) which of those are real.
        instruction_ids: (B, T) long token ids of the text after the first visual token, in the prompt (padded like
            ``initial_text_hidden``, 0 where not real), or None.
        instruction_mask: (B, T) which of those are real.
        input_embeddings: the language model's token-embedding module (ids -> its input embeddings), or None.
        vision_attention: (B, N0, N0) head-mean softmax attention among the original visual tokens at the vision
            feature layer (rows: queries; normalised over all the tower's tokens, [CLS] included), or None.
        pixel_values: (B, C, H, W) the images as the vision tower received them, or None.
        vision_received_attention: (B, N) attention each token receives at the vision feature layer, averaged over
            the patch queries of its own crop and the heads (0 for line breaks and recycled tokens), or None.
        vision_crop_attention: (C, P, P) head-mean softmax attention among each crop's P patches at the vision
            feature layer (rows: queries; normalised over all the tower's tokens, [CLS] included), for every crop of
            the batch (``geometry.crop`` indexes them), or None.
        vision_early_attention: (B, N) the vision tower's [CLS] attention to each visual token at the earlier layer
            the plan names (``StagePlan.early_vision_depth``), averaged over heads; on a tower without [CLS] the
            attention each token receives there, like ``vision_received_attention``; 0 for line breaks and recycled
            tokens; or None.
        vision_crop_pixels: (C, channels, height, width) the crops as the vision tower received them, or None.
        pack_crop_values: places per-crop patch values (C, P) on this context's original visual tokens, (B, N0), as
            the model packs its features (the stitched tile grid, unpadded, and OneVision's bilinear down-scaling);
            line breaks get the second argument. Index the result with ``visual_origin``. None unless the plan
            asked for ``vision_crop_attention``.
        visual_values: (B, Hkv, N, d) value vectors of the visual tokens at the layer the attention rows come from
            (key-value heads, before any repetition for grouped-query attention), or None.
        query_values: (B, Hkv, R, d) value vectors of the query rows at that layer, or None.
        visual_keys: (B, Hkv, N, d) post-RoPE key vectors of the visual tokens at the layer the attention rows come
            from (key-value heads, before any repetition for grouped-query attention), or None.
        query_keys: (B, Hkv, R, d) post-RoPE key vectors of the query rows at that layer, or None.
        final_norm: the language model's final norm module (the one before the LM head), or None.
        vision_kept: (B, N) True at the visual tokens whose features the vision tower kept, for pruners with
            vision-encoder stages (:meth:`Pruner.vision_layers`) at the stage at layer 0, or None. A token of
            OneVision's down-scaled grid counts as kept when its nearest source patch is.
        stage_index: 0 for the first stage of the pruner's plan, 1 for the next, ...
        num_layers: decoder layers in the language model.

    The core (:data:`CORE_FIELDS`) comes with every stage; each other field is provided when the plan asks for what
    provides it (:func:`provider_of`: a :class:`~vlprune.needs.Need`, the query rows, or the vision tower's own
    pruning) and is None otherwise; :attr:`provided` holds those of this context.
    """

    layer: int
    keep: int
    visual_hidden: torch.Tensor
    visual_positions: torch.Tensor
    visual_origin: torch.Tensor
    geometry: VisualGeometry | None = None
    query_attention: torch.Tensor | None = field(default=None, metadata=_by(_ROWS))
    query_mask: torch.Tensor | None = field(default=None, metadata=_by(_ROWS))
    query_positions: torch.Tensor | None = field(default=None, metadata=_by(_ROWS))
    query_row_attention: torch.Tensor | None = field(default=None, metadata=_by(Need.QUERY_ROW_ATTENTION))
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, metadata=_by(_ROWS)
    )
    vision_cls_attention: torch.Tensor | None = field(default=None, metadata=_by(Need.CLS_ATTENTION))
    text_hidden: torch.Tensor | None = field(default=None, metadata=_by(Need.TEXT_TOKENS))
    text_mask: torch.Tensor | None = field(default=None, metadata=_by(Need.TEXT_TOKENS))
    vision_features: torch.Tensor | None = field(default=None, metadata=_by(Need.VISION_FEATURES))
    projector: nn.Module | None = field(default=None, metadata=_by(Need.VISION_FEATURES))
    vision_keys: torch.Tensor | None = field(default=None, metadata=_by(Need.VISION_KEYS))
    initial_visual_hidden: torch.Tensor | None = field(default=None, metadata=_by(Need.INITIAL_EMBEDDINGS))
    initial_text_hidden: torch.Tensor | None = field(default=None, metadata=_by(Need.INITIAL_EMBEDDINGS))
    initial_text_mask: torch.Tensor | None = field(default=None, metadata=_by(Need.INITIAL_EMBEDDINGS))
    instruction_ids: torch.Tensor | None = field(default=None, metadata=_by(Need.INSTRUCTION_IDS))
    instruction_mask: torch.Tensor | None = field(default=None, metadata=_by(Need.INSTRUCTION_IDS))
    input_embeddings: nn.Module | None = field(default=None, metadata=_by(Need.INSTRUCTION_IDS))
    vision_attention: torch.Tensor | None = field(default=None, metadata=_by(Need.VISION_MAP))
    pixel_values: torch.Tensor | None = field(default=None, metadata=_by(Need.VISION_MAP))
    vision_received_attention: torch.Tensor | None = field(default=None, metadata=_by(Need.RECEIVED_ATTENTION))
    vision_crop_attention: torch.Tensor | None = field(default=None, metadata=_by(Need.CROP_MAPS))
    vision_early_attention: torch.Tensor | None = field(default=None, metadata=_by(Need.EARLY_ATTENTION))
    vision_crop_pixels: torch.Tensor | None = field(default=None, metadata=_by(Need.CROP_MAPS))
    pack_crop_values: Callable[[torch.Tensor, float], torch.Tensor] | None = field(
        default=None, metadata=_by(Need.CROP_MAPS)
    )
    visual_values: torch.Tensor | None = field(default=None, metadata=_by(Need.VALUE_STATES))
    query_values: torch.Tensor | None = field(default=None, metadata=_by(Need.VALUE_STATES))
    visual_keys: torch.Tensor | None = field(default=None, metadata=_by(Need.KEY_STATES))
    query_keys: torch.Tensor | None = field(default=None, metadata=_by(Need.KEY_STATES))
    final_norm: nn.Module | None = field(default=None, metadata=_by(Need.FINAL_NORM))
    vision_kept: torch.Tensor | None = field(default=None, metadata=_by(_VISION_PRUNING))
    stage_index: int = 0
    num_layers: int = 0

    @property
    def provided(self) -> dict[str, Any]:
        """The provided fields (beyond the core) this context carries, by name."""
        return {
            spec.name: getattr(self, spec.name)
            for spec in fields(self)
            if spec.name not in CORE_FIELDS and getattr(self, spec.name) is not None
        }

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
        keep: (B,) patch tokens of each image (crop) that must reach the projector (see
            :meth:`Pruner.vision_budget_for`).
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
