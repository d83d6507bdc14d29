"""Decoding after a pruned prefill: the segments of decoder layers that hold the same pruned prefill, each decode
step's masks (over a segment's shorter KV cache, eager or static) and positions, and the cache's size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlprune.engine.layout import decode_mask
from vlprune.engine.positions import Rotary, shifted_decode_positions


@dataclass
class Segment:
    """Decoder layers ``first_layer`` .. next segment's first layer - 1, which all hold the same pruned prefill.

    Attributes:
        real: (B, L_s) False at padding slots of the segment's prefill sequence.
        position_shift: (B,) how far this segment's positions lag the original ones (only with re-indexing).
    """

    first_layer: int
    real: torch.Tensor
    position_shift: torch.Tensor
    dropped: list[int]  # per sample, real tokens removed by the stages so far (net of recycled ones)


@dataclass
class DecodeState:
    """What decoding after a pruned prefill needs."""

    cache: Any
    prompt_length: int
    segments: list[Segment]
    segment_of_layer: list[int | None]
    generated: int = 0
    step_masks: dict[int, Any] | None = None
    step_positions: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] | None = None
    step_attention_mask: torch.Tensor | None = None
    step_length: int = 0


def step_mask(
    prefill_real: torch.Tensor, answer_real: torch.Tensor, query_length: int, style: str, dtype: torch.dtype
) -> torch.Tensor:
    """The attention mask of a decode step for the layers of one segment, without a device read (a captured graph
    traces it): the keys are the segment's pruned prefill slots ``prefill_real`` (B, Lp), then the answer's slots
    ``answer_real`` (B or 1, A), the step's ``query_length`` new tokens last among the attended ones (a static
    cache's slots not written yet are False in ``answer_real``)."""
    key_real = torch.cat([prefill_real, answer_real.expand(prefill_real.shape[0], -1)], dim=1)
    return decode_mask(key_real, query_length, style, dtype)


def answer_slots(decode: DecodeState, batch: int, device: torch.device) -> torch.Tensor:
    """(B, A) which tokens generated so far and this step's are real: the call's attention mask past the prompt, or
    all of them."""
    if decode.step_attention_mask is not None:
        return decode.step_attention_mask[:, decode.prompt_length :].bool().to(device)
    return torch.ones(batch, decode.generated + decode.step_length, dtype=torch.bool, device=device)


def static_answer_slots(room: int, step: torch.Tensor) -> torch.Tensor:
    """(1, room) the slots of a static cache's answer that hold a token at decode step ``step`` (0-d, counted from
    the first token after the prefill's): those written so far and this step's."""
    return (torch.arange(room, device=step.device) <= step)[None, :]


def start_step(decode: DecodeState, attention_mask: torch.Tensor | None, query_length: int) -> None:
    """Forget the masks and positions of the previous decode step."""
    decode.step_masks, decode.step_positions = {}, {}
    decode.step_attention_mask = attention_mask
    decode.step_length = query_length


def step_layer_inputs(
    decode: DecodeState, index: int, hidden: torch.Tensor, kwargs: dict, style: str, rotary: Rotary, reindex: bool
) -> dict | None:
    """Decoder layer ``index``'s keyword arguments for this decode step: its segment's mask and, with re-indexed
    positions, its shifted positions and cos/sin (each computed once per segment and step); None before the first
    stage."""
    segment_index = decode.segment_of_layer[index]
    if segment_index is None:
        return None
    segment = decode.segments[segment_index]
    if segment_index not in decode.step_masks:
        answer = answer_slots(decode, hidden.shape[0], hidden.device)
        real = segment.real.to(hidden.device)
        decode.step_masks[segment_index] = step_mask(real, answer, decode.step_length, style, hidden.dtype)
    kwargs["attention_mask"] = decode.step_masks[segment_index]
    if reindex:
        if segment_index not in decode.step_positions:
            shifted = shifted_decode_positions(kwargs, segment.position_shift, hidden.shape[0])
            decode.step_positions[segment_index] = (shifted, rotary(hidden, shifted))
        shifted, embeddings = decode.step_positions[segment_index]
        kwargs["position_ids"] = shifted
        kwargs["position_embeddings"] = embeddings
    return kwargs


def segment_of_layer(segments: list[Segment], num_layers: int) -> list[int | None]:
    """For each decoder layer, the index of the segment it belongs to (None before the first stage)."""
    return [
        max((i for i, s in enumerate(segments) if s.first_layer <= layer), default=None) for layer in range(num_layers)
    ]


def cache_size(cache: Any) -> tuple[list[int], int]:
    layers = getattr(cache, "layers", None)
    if not layers:
        return [], 0
    lengths, size = [], 0
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor):
            lengths.append(0)
            continue
        lengths.append(int(keys.shape[-2]))
        size += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return lengths, size
