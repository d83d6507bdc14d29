"""The providers of a stage's inputs: one registered function per :class:`~vlprune.needs.Need`.

A stage plan names what it needs beyond the core of its context (``StagePlan.needs``); each need has exactly one
provider here, which reads it from what the engine holds at the stage (:class:`StageReads`) and returns the
:class:`~vlprune.pruners.base.StageContext` fields it fills. Which families can serve a need is declared by the
adapters (``AdapterTraits.provides``), so adding an input is one provider and one declaration per adapter that
supports it; the registry follows transformers' ``AttentionInterface``: implementations registered by key, looked up
at run time.

Two needs have no provider of their own: ``OWN_LAYER_ATTENTION`` and ``PER_HEAD_ATTENTION`` say how the attention
rows are computed (:mod:`vlprune.engine.scoring`), not what is handed over. The rows themselves come with every plan
that names ``query_rows`` (:func:`attention_row_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlprune.adapters import ModelAdapter
from vlprune.engine.layout import Layout
from vlprune.engine.positions import query_positions, rotary_for
from vlprune.engine.prefill import Prefill
from vlprune.engine.scoring import QueryAttention, query_rows
from vlprune.engine.vision_bridge import VisionBridge
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens
from vlprune.needs import Need
from vlprune.pruners.base import QueryRows, StagePlan

ROW_MODES = frozenset({Need.OWN_LAYER_ATTENTION, Need.PER_HEAD_ATTENTION})
"""Needs that change how the attention rows are computed and are handed over inside them, with no provider."""


@dataclass(frozen=True)
class StageSources:
    """Where a stage's inputs come from, besides the prefill: the model's adapter, the vision tower's recorded
    reads (``bridge``), the vision-encoder stages (``vision_stages``: ``VisionStages`` or ``PackedVisionStages``),
    the attention backend's mask format, the language model's depth, and what the method's reference reads on a
    tower without [CLS] (``Pruner.cls_substitute``)."""

    adapter: ModelAdapter
    bridge: VisionBridge
    vision_stages: Any
    mask_style: str
    num_layers: int
    cls_substitute: str | None


@dataclass(frozen=True)
class StageReads:
    """What the engine holds at a stage, for the providers: the stage's plan, the hidden states (B, L, D) of its
    layer's input, the prefill's layout and the (B, N) slots of the visual tokens, the prefill's geometry of the
    original visual tokens, the prefill, the model's sources, the attention rows captured for the stage (or None) and
    the image inputs the geometry reads."""

    stage: StagePlan
    hidden: torch.Tensor
    layout: Layout
    slots: torch.Tensor
    geometry: VisualGeometry
    prefill: Prefill
    sources: StageSources
    query: QueryAttention | None
    image_inputs: dict[str, Any]


Provider = Callable[[StageReads], dict[str, Any]]
PROVIDERS: dict[Need, Provider] = {}
"""Need -> its provider, in the order the engine calls them (which decides the first refusal a stage meets)."""


def provider(need: Need) -> Callable[[Provider], Provider]:
    """Register ``function`` as the one provider of ``need``.

    Raises:
        ValueError: ``need`` already has a provider, or is a row mode (:data:`ROW_MODES`).
    """

    def register(function: Provider) -> Provider:
        if need in PROVIDERS or need in ROW_MODES:
            raise ValueError(f"{need!r} already has a provider ({PROVIDERS.get(need, 'the attention rows')})")
        PROVIDERS[need] = function
        return function

    return register


def provided_inputs(reads: StageReads, needs: frozenset[Need]) -> dict[str, Any]:
    """The context fields of ``needs``, from their providers, in the registry's order.

    Raises:
        RuntimeError: a need without a provider (a Need added without one).
    """
    missing = needs - PROVIDERS.keys() - ROW_MODES
    if missing:
        raise RuntimeError(f"no provider is registered for {sorted(missing)}")
    values: dict[str, Any] = {}
    for need, function in PROVIDERS.items():
        if need in needs:
            values.update(function(reads))
    return values


def attention_row_inputs(reads: StageReads) -> dict[str, Any]:
    """The attention rows of a plan with ``query_rows``: the rows' attention to the visual tokens, their mask and
    positions, and the rotary embedding."""
    query, hidden = reads.query, reads.hidden
    return {
        "query_attention": query.visual,
        "query_mask": query.mask,
        "query_positions": query_positions(reads.stage, reads.layout, hidden.device),
        "rotary": rotary_for(reads.sources.adapter.rotary_embedding, hidden),
    }


@provider(Need.QUERY_ROW_ATTENTION)
def _query_row_attention(reads: StageReads) -> dict[str, Any]:
    return {} if reads.query is None else {"query_row_attention": reads.query.own}


@provider(Need.VALUE_STATES)
def _value_states(reads: StageReads) -> dict[str, Any]:
    if reads.query is None:  # a plan without query rows has no rows to take values at
        return {}
    return {"visual_values": reads.query.values, "query_values": reads.query.query_values}


@provider(Need.KEY_STATES)
def _key_states(reads: StageReads) -> dict[str, Any]:
    if reads.query is None:  # a plan without query rows has no rows to take keys at
        return {}
    return {"visual_keys": reads.query.keys, "query_keys": reads.query.query_keys}


@provider(Need.FINAL_NORM)
def _final_norm(reads: StageReads) -> dict[str, Any]:
    norm = getattr(reads.sources.adapter.language_model, "norm", None)
    if norm is None:
        raise RuntimeError(f"{type(reads.sources.adapter.language_model).__name__} has no final norm (.norm)")
    return {"final_norm": norm}


@provider(Need.CLS_ATTENTION)
def _cls_attention(reads: StageReads) -> dict[str, Any]:
    return {"vision_cls_attention": reads.sources.bridge.cls_scores(reads.geometry, reads.layout, reads.slots)}


@provider(Need.VISION_FEATURES)
def _vision_features(reads: StageReads) -> dict[str, Any]:
    features = reads.sources.bridge.feature_tokens(reads.geometry, reads.layout, reads.slots)
    return {"vision_features": features, "projector": reads.sources.adapter.token_projector}


@provider(Need.VISION_KEYS)
def _vision_keys(reads: StageReads) -> dict[str, Any]:
    return {"vision_keys": reads.sources.bridge.key_tokens(reads.geometry, reads.layout, reads.slots)}


@provider(Need.INITIAL_EMBEDDINGS)
def _initial_embeddings(reads: StageReads) -> dict[str, Any]:
    prefill, device = reads.prefill, reads.slots.device
    if prefill.initial_visual is None or prefill.initial_text is None:
        raise RuntimeError("the language model's input embeddings were not captured for this prefill")
    text, valid = prefill.initial_text
    return {
        "initial_visual_hidden": prefill.initial_visual.to(device),
        "initial_text_hidden": text.to(device),
        "initial_text_mask": valid.to(device),
    }


@provider(Need.INSTRUCTION_IDS)
def _instruction_ids(reads: StageReads) -> dict[str, Any]:
    prefill, device = reads.prefill, reads.slots.device
    if prefill.instruction_ids is None:
        raise RuntimeError("the prompt's input_ids were not kept for this prefill")
    ids, valid = prefill.instruction_ids
    return {
        "instruction_ids": ids.to(device),
        "instruction_mask": valid.to(device),
        "input_embeddings": reads.sources.adapter.language_model.get_input_embeddings(),
    }


@provider(Need.VISION_MAP)
def _vision_map(reads: StageReads) -> dict[str, Any]:
    return reads.sources.bridge.map_inputs(reads.hidden.shape[0], reads.prefill.num_visual, True)


@provider(Need.CROP_MAPS)
def _crop_maps(reads: StageReads) -> dict[str, Any]:
    return reads.sources.bridge.crop_inputs(reads.geometry, reads.image_inputs, True)


@provider(Need.EARLY_ATTENTION)
def _early_attention(reads: StageReads) -> dict[str, Any]:
    return {"vision_early_attention": reads.sources.bridge.early_scores(reads.geometry, reads.layout, reads.slots)}


@provider(Need.RECEIVED_ATTENTION)
def _received_attention(reads: StageReads) -> dict[str, Any]:
    return {"vision_received_attention": reads.sources.bridge.received(reads.geometry, reads.layout, reads.slots)}


@provider(Need.TEXT_TOKENS)
def _text_tokens(reads: StageReads) -> dict[str, Any]:
    rows, valid = query_rows(QueryRows.TEXT, reads.layout, reads.hidden.device)
    return {"text_hidden": gather_tokens(reads.hidden, rows), "text_mask": valid}
