"""What a pruner sees at a stage: :func:`build_stage_context` reads the stage's plan (which inputs it needs) and
assembles its :class:`~vlprune.pruners.base.StageContext` from the prefill's state, the language model's hidden
states and attention rows, and what the vision tower's hooks recorded."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vlprune.adapters import provided_needs
from vlprune.engine.layout import prefill_mask
from vlprune.engine.prefill import Prefill
from vlprune.engine.scoring import QueryAttention, own_layer_rows
from vlprune.engine.stage_inputs import StageReads, StageSources, attention_row_inputs, provided_inputs
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens
from vlprune.pruners.base import StageContext, StagePlan


class StageInputs(NamedTuple):
    """A stage's context, and the hidden states (B, L, D) the stage goes on from (the vision-encoder stages
    renormalise them at layer 0) with the (B, N) slots of their visual tokens."""

    context: StageContext
    hidden: torch.Tensor
    slots: torch.Tensor


def build_stage_context(stage: StagePlan, hidden: torch.Tensor, prefill: Prefill, sources: StageSources) -> StageInputs:
    """The context of ``stage`` over ``hidden`` (B, L, D), the input of the stage's layer; ``prefill.layout`` is on
    ``hidden``'s device.

    Raises:
        RuntimeError: the stage reads attention rows that the layer before it did not capture.
    """
    layout = prefill.layout
    slots = layout.visual_slots  # (B, N)
    if stage.query_rows is not None and stage.own_layer_attention:
        prefill.query_attention[stage.layer] = _own_layer_rows(stage, hidden, prefill, sources)
    query = prefill.query_attention.pop(stage.layer, None)
    origin, geometry = gather_tokens(layout.origin, slots), prefill.geometry()
    image_inputs = prefill.all_image_inputs()
    vision_kept = None
    if stage.layer == 0 and sources.vision_stages.active:
        vision_kept = _vision_kept(sources.vision_stages, geometry, origin)
        hidden = sources.vision_stages.renormalised(hidden, slots, geometry, image_inputs)
    present = int(slots.shape[1])
    keep = present if stage.keep is None else min(stage.keep, present) if stage.keep_at_most else stage.keep
    if stage.query_rows is not None and query is None:
        raise RuntimeError(f"no attention rows were captured at layer {stage.layer - 1}")
    reads = StageReads(stage, hidden, layout, slots, geometry, prefill, sources, query, image_inputs)
    context = StageContext(
        layer=stage.layer,
        keep=keep,
        visual_hidden=gather_tokens(hidden, slots),
        visual_positions=gather_tokens(layout.positions, slots),
        visual_origin=origin,
        geometry=geometry.take(origin),
        stage_index=prefill.stage_index,
        num_layers=sources.num_layers,
        vision_kept=vision_kept,
        **({} if query is None else attention_row_inputs(reads)),
        **provided_inputs(reads, provided_needs(sources.adapter.traits, stage.needs, sources.cls_substitute)),
    )
    return StageInputs(context, hidden, slots)


def _own_layer_rows(stage: StagePlan, hidden: torch.Tensor, prefill: Prefill, sources: StageSources) -> QueryAttention:
    """(B, R, N) attention of the stage's query rows to the visual tokens, from its own layer's queries and keys."""
    layout = prefill.layout
    mask = prefill.mask
    if mask is None and prefill.padded:
        mask = prefill_mask(layout.real, sources.mask_style, hidden.dtype, True)
    attention = sources.adapter.decoder_layers[stage.layer].self_attn
    return own_layer_rows(attention, sources.adapter.query_key, stage, hidden, layout, mask)


def _vision_kept(vision_stages: Any, geometry: VisualGeometry, origin: torch.Tensor) -> torch.Tensor:
    """(B, N) True at the current visual tokens whose patches the vision-encoder stages kept."""
    kept = vision_stages.token_kept(geometry)
    return gather_tokens(kept, origin.clamp(min=0)) & (origin >= 0)
