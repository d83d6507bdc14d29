"""Decoding after a pruned prefill: the segments of decoder layers that hold the same pruned prefill, the masks of
each decode step over a segment's shorter KV cache, and the cache's size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlprune.engine.layout import decode_mask


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


def step_mask(decode: DecodeState, segment: Segment, hidden: torch.Tensor, style: str) -> torch.Tensor:
    """The attention mask of this decode step for the layers of ``segment``: its pruned prefill's real slots, then
    the tokens generated so far and this step's."""
    batch, device = hidden.shape[0], hidden.device
    new_tokens = decode.generated + decode.step_length
    if decode.step_attention_mask is not None:
        tail = decode.step_attention_mask[:, decode.prompt_length :].bool().to(device)
    else:
        tail = torch.ones(batch, new_tokens, dtype=torch.bool, device=device)
    key_real = torch.cat([segment.real.to(device), tail], dim=1)
    return decode_mask(key_real, decode.step_length, style, hidden.dtype)


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
