"""DeepStack (Qwen3-VL): the language model adds features of some vision layers to the visual positions after its
first decoder layers (``_deepstack_process(hidden, visual_pos_masks, visual_embeds)``). Once a stage has shortened
the sequence, the model's full-length mask and planes no longer fit; the engine wraps that method on this model
instance so that every plane is cut with the same kept indices as the hidden states: each remaining original visual
token receives its own plane row, and recycled tokens (which have no original token) receive none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlprune.engine.layout import Layout
from vlprune.engine.vision_bridge import RestoreAttribute


def pruned_planes(
    layout: Layout, original_mask: torch.Tensor, embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual-position mask (B, L) and plane rows (K, D) of the current sequence.

    Args:
        layout: the current layout (``origin``: each slot's index among its sample's original visual tokens).
        original_mask: (B, L0) the model's visual positions of the full prompt.
        embeds: (V, D) one plane's rows, in the order of ``original_mask``'s True entries (row-major).
    """
    device = embeds.device
    counts = original_mask.sum(dim=1).to(device)
    offsets = torch.cumsum(counts, dim=0) - counts  # (B,) first row of each sample
    origin = layout.origin.to(device)
    mask = layout.is_visual.to(device) & (origin >= 0)
    rows = (offsets[:, None] + origin.clamp(min=0))[mask]
    return mask, embeds[rows]


def wrap_deepstack(text_model: nn.Module, current_layout: Callable[[], Layout | None]) -> RestoreAttribute:
    """Wrap ``text_model._deepstack_process`` (this instance only) to prune the planes like the hidden states once a
    stage has run; ``current_layout`` gives the layout of the prefill in progress, or None outside one or before
    its first stage."""
    process = text_model._deepstack_process  # the bound method of the model's class

    @functools.wraps(process)
    def _deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: Any) -> Any:
        layout = current_layout()
        if layout is not None:
            visual_pos_masks, visual_embeds = pruned_planes(layout, visual_pos_masks, visual_embeds)
        return process(hidden_states, visual_pos_masks, visual_embeds)

    text_model._deepstack_process = _deepstack_process
    return RestoreAttribute(text_model, "_deepstack_process")
