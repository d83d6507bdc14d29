"""DeepStack (Qwen3-VL): the language model adds features of some vision layers to the visual positions after its
first decoder layers (``_deepstack_process(hidden, visual_pos_masks, visual_embeds)``). Once a stage has shortened
the sequence, the model's full-length mask and planes no longer fit: :func:`place_planes` adds each remaining
original visual token its own plane row, and recycled tokens (which have no original token) none, without a device
read, so that the eager engine (which wraps that method on this model instance, :func:`wrap_deepstack`) and the
captured graphs (:mod:`vlprune.engine.captured`) place the planes with the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlprune.engine.layout import Layout
from vlprune.engine.vision_bridge import RestoreAttribute


def place_planes(
    hidden: torch.Tensor, layout: Layout, plane: torch.Tensor, original_mask: torch.Tensor
) -> torch.Tensor:
    """``hidden`` (B, L, D) with one DeepStack plane added at the current sequence's visual tokens.

    Args:
        layout: the current layout (``origin``: each slot's index among its sample's original visual tokens).
        plane: (V, D) the plane's rows, in the order of ``original_mask``'s True entries (row-major).
        original_mask: (B, L0) the model's visual positions of the full prompt.
    """
    device = hidden.device
    counts = original_mask.to(device).sum(dim=1)
    offsets = torch.cumsum(counts, dim=0) - counts  # (B,) each sample's first row
    slots = layout.visual_slots.to(device)  # (B, N); a sample with fewer tokens repeats its last slot
    origin = torch.gather(layout.origin.to(device), 1, slots)
    present = layout.is_visual.to(device).sum(dim=1, keepdim=True)
    own = (origin >= 0) & (torch.arange(slots.shape[1], device=device)[None, :] < present)
    rows = offsets[:, None] + origin.clamp(min=0)
    added = plane.to(device, hidden.dtype)[rows] * own[..., None].to(hidden.dtype)
    index = slots[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.scatter_add(1, index, added)


def wrap_deepstack(text_model: nn.Module, current_layout: Callable[[], Layout | None]) -> RestoreAttribute:
    """Wrap ``text_model._deepstack_process`` (this instance only) to place the planes on the pruned sequence once a
    stage has run (:func:`place_planes`); ``current_layout`` gives the layout of the prefill in progress, or None
    outside one or before its first stage."""
    process = text_model._deepstack_process  # the bound method of the model's class

    @functools.wraps(process)
    def _deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: Any) -> Any:
        layout = current_layout()
        if layout is not None:
            return place_planes(hidden_states, layout, visual_embeds, visual_pos_masks)
        return process(hidden_states, visual_pos_masks, visual_embeds)

    text_model._deepstack_process = _deepstack_process
    return RestoreAttribute(text_model, "_deepstack_process")
