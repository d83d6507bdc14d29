"""The sequence after a stage: the kept and recycled tokens' hidden states, positions and RoPE cos/sin, gathered in
one fused call, and the layout that describes them."""

from __future__ import annotations

from dataclasses import replace

import torch

from vlprune.engine.layout import Layout, apply_order, reindexed
from vlprune.engine.positions import Rotary
from vlprune.kernels import gather_rows
from vlprune.pruners.base import Selection


def compact(
    layout: Layout,
    hidden: torch.Tensor,
    order: torch.Tensor,
    kept_slots: torch.Tensor,
    selection: Selection,
    *,
    rotary: Rotary,
    keep_positions: bool,
    filler: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Layout]:
    """The hidden states and layout after a stage.

    Args:
        layout, hidden: the sequence before the stage.
        order: (B, L') the slot each new position reads (see :func:`~vlprune.engine.layout.order_after_stage`).
        kept_slots: (B, K) the kept visual tokens' slots.
        selection: the pruner's choice; its in-place merged states replace the kept tokens' before the gather, and
            its recycled tokens are read from their own tensors instead of concatenated.
        rotary: ``rotary(hidden, positions)`` -> (cos, sin) of the model's rotary embedding.
        keep_positions: True for original positions (cos/sin are gathered with the tokens), False to renumber the
            sequence contiguously (cos/sin recomputed).
        filler: (B, L') slots that left-fill the shorter samples of a ragged batch, made padding.
    """
    recycled = selection.recycled
    if selection.kept_hidden is not None:
        hidden = hidden.scatter(
            1, kept_slots[..., None].expand(-1, -1, hidden.shape[-1]), selection.kept_hidden.to(hidden.dtype)
        )
    recycled_positions = None if recycled is None else recycled.positions.to(hidden.device)
    sources = [hidden, layout.positions]
    extras = [None, None] if recycled is None else [recycled.hidden.to(hidden.dtype), recycled_positions]
    if keep_positions:
        cos, sin = layout.position_embeddings
        sources += [cos, sin]
        extras += [None, None] if recycled is None else list(rotary(hidden, recycled_positions))
    gathered = gather_rows(order, sources, extras)
    new_hidden, positions = gathered[0], gathered[1]
    num_recycled = 0 if recycled is None else recycled.hidden.shape[1]
    uniform = None if filler is not None else kept_slots.shape[1] + num_recycled
    new_layout = apply_order(layout, order, recycled_positions, positions=positions, visual_width=uniform)
    if filler is not None:
        new_layout = replace(
            new_layout,
            real=new_layout.real & ~filler,
            is_visual=new_layout.is_visual & ~filler,
            origin=new_layout.origin.masked_fill(filler, -1),
        )
    if keep_positions:
        return new_hidden, replace(new_layout, position_embeddings=(gathered[2], gathered[3]))
    new_layout = reindexed(new_layout)
    return new_hidden, replace(new_layout, position_embeddings=rotary(new_hidden, new_layout.positions))
