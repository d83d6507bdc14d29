"""The token layout of a prefill as stages prune it, and the masks that go with it.

A :class:`Layout` describes the sequence that the decoder layers of one segment see: which slots are visual tokens,
which original visual token each one was, which slots are padding, and the RoPE position of each. A stage turns one
layout into the next::

    before:  [pad pad  t t  v0 v1 v2 v3 v4 v5  t t t]          v = visual, t = text
    keep {v1, v4}, recycle r:
    after:   [pad pad  t t  v1 v4 r  t t t]                    r enters after the kept visual tokens

Kept tokens stay in their original order, so causal order is unchanged, and keep their original positions unless
re-indexing is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vlprune.kernels import gather_tokens
from vlprune.pruners.base import first_true


@dataclass
class Layout:
    """Per-slot facts of the current sequence. All tensors are (B, L).

    Attributes:
        is_visual: True for visual tokens (original or recycled).
        origin: index among the sample's original visual tokens, -1 for text, padding and recycled tokens.
        real: False for left padding.
        positions: RoPE position of each slot.
        position_embeddings: the (cos, sin) pair of (B, L, head_dim) tensors the layers receive, once known.
    """

    is_visual: torch.Tensor
    origin: torch.Tensor
    real: torch.Tensor
    positions: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    visual_width: int | None = None  # visual tokens per sample when every sample has this many (no device read)
    text_width: int | None = None  # the most real text tokens after the first visual token, when known
    _visual_slots: torch.Tensor | None = field(default=None, repr=False)
    _text_rows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def visual_slots(self) -> torch.Tensor:
        """(B, N) slot indices of the visual tokens, ascending; in a ragged batch N is the largest sample's count and
        a sample with fewer repeats its last one (computed once: without ``visual_width``, finding them synchronises
        a GPU)."""
        if self._visual_slots is None:
            self._visual_slots, _ = padded_visual_slots(self.is_visual, self.visual_width)
        return self._visual_slots

    @property
    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) slot indices of the real text tokens after the first visual token (the instruction), and (B, T)
        validity: samples with fewer tokens repeat their last one. Computed once per layout."""
        if self._text_rows is None:
            columns = torch.arange(self.length, device=self.is_visual.device)[None, :]
            text = self.real & ~self.is_visual & (columns > self.visual_slots[:, :1])
            width = self.text_width if self.text_width is not None else int(text.sum(dim=1).max())
            self._text_rows = first_true(text, width)
        return self._text_rows

    @property
    def length(self) -> int:
        return self.is_visual.shape[1]

    def to(self, device: torch.device) -> Layout:
        """The layout on ``device`` (layers of a model split over GPUs live on different devices)."""
        if self.is_visual.device == device:
            return self
        embeddings = self.position_embeddings
        return Layout(
            is_visual=self.is_visual.to(device),
            origin=self.origin.to(device),
            real=self.real.to(device),
            positions=self.positions.to(device),
            position_embeddings=None if embeddings is None else (embeddings[0].to(device), embeddings[1].to(device)),
            visual_width=self.visual_width,
            text_width=self.text_width,
        )


def padded_visual_slots(is_visual: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Nmax) slot indices of each sample's visual tokens, ascending, and (B, Nmax) validity; a sample with fewer
    tokens repeats its last one (so gathers stay in range). One device read (the largest count) unless ``width``
    gives it."""
    if width is None:
        width = int(is_visual.sum(dim=1).max())
    return first_true(is_visual, width)


def initial_layout(visual_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> Layout:
    """The layout of the prompt as the processor built it. visual_mask: (B, L) bool; attention_mask: (B, L) or None."""
    real = torch.ones_like(visual_mask) if attention_mask is None else attention_mask.bool()
    origin = torch.where(visual_mask, visual_mask.long().cumsum(1) - 1, -1)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return Layout(is_visual=visual_mask, origin=origin, real=real, positions=positions)


def order_after_stage(layout: Layout, kept_slots: torch.Tensor, num_recycled: int) -> torch.Tensor:
    """Slot order of the next layout, as indices into ``cat(current slots, recycled tokens)``.

    Args:
        layout: the current layout.
        kept_slots: (B, k) slot indices of the visual tokens kept, in the order they take in the next layout
            (ascending, unless a pruner ordered them).
        num_recycled: M, recycled tokens per sample; they take indices L..L+M-1 and go right after the last visual slot.

    Returns:
        (B, L - N + k + M) long.
    """
    batch = kept_slots.shape[0]
    stays = ~layout.is_visual
    stays = stays.scatter(1, kept_slots, True)
    width = layout.length - layout.visual_slots.shape[1] + kept_slots.shape[1]
    base, _ = first_true(stays, width)  # (B, L - N + k), ascending
    # The kept visual slots take the places of the visual slots in the pruner's order (the same when ascending).
    base = base.masked_scatter(torch.gather(layout.is_visual, 1, base), kept_slots)
    if num_recycled == 0:
        return base
    last_visual = layout.visual_slots[:, -1:]  # (B, 1)
    insert_at = (base <= last_visual).sum(1, keepdim=True)  # (B, 1): recycled tokens go after this many slots
    columns = torch.arange(base.shape[1] + num_recycled, device=base.device).expand(batch, -1)
    offset = columns - insert_at
    from_base = torch.where(offset < 0, columns, columns - num_recycled).clamp(0, base.shape[1] - 1)
    recycled = layout.length + offset.clamp(0, num_recycled - 1)
    is_recycled = (offset >= 0) & (offset < num_recycled)
    return torch.where(is_recycled, recycled, torch.gather(base, 1, from_base))


def apply_order(
    layout: Layout,
    order: torch.Tensor,
    recycled_positions: torch.Tensor | None,
    positions: torch.Tensor | None = None,
    visual_width: int | None = None,
) -> Layout:
    """The layout after a stage, given the slot order from :func:`order_after_stage` (position embeddings unset).

    ``positions``: the position ids already gathered in this order (the engine gathers them fused with the hidden
    states); computed here when None. ``visual_width``: the visual tokens every sample now holds, when they agree.
    """
    batch, num_recycled = order.shape[0], 0 if recycled_positions is None else recycled_positions.shape[1]

    def extended(values: torch.Tensor, fill: torch.Tensor | int | bool) -> torch.Tensor:
        if num_recycled == 0:
            return values
        extra = (
            fill if isinstance(fill, torch.Tensor) else torch.full((batch, num_recycled), fill, device=values.device)
        )
        return torch.cat([values, extra.to(values.dtype)], dim=1)

    if positions is None:
        positions = gather_tokens(extended(layout.positions, recycled_positions), order)
    return Layout(
        is_visual=gather_tokens(extended(layout.is_visual, True), order),
        origin=gather_tokens(extended(layout.origin, -1), order),
        real=gather_tokens(extended(layout.real, True), order),
        positions=positions,
        visual_width=visual_width,
        text_width=layout.text_width,
    )


def reindexed(layout: Layout) -> Layout:
    """The same layout with contiguous positions 0, 1, 2, ... over the real tokens (padding gets 0)."""
    positions = (layout.real.long().cumsum(1) - 1).clamp(min=0)
    return replace(layout, positions=positions, position_embeddings=None)


def prefill_mask(
    real: torch.Tensor, style: str, dtype: torch.dtype, padded: bool, key_room: int = 0
) -> torch.Tensor | None:
    """The causal mask of a prefill over ``real`` (B, L) in the attention backend's format.

    ``style`` "sdpa": boolean (B, 1, L, L), True = attend, or None when nothing is ``padded`` (SDPA then runs causal);
    "eager": additive float (B, 1, L, L) with the dtype's minimum at masked places, as transformers builds it.
    ``key_room``: that many more key columns, masked (a static KV cache's slots for the answer).
    """
    if style == "sdpa" and not padded and key_room == 0:
        return None
    length = real.shape[1]
    causal = torch.ones(length, length + key_room, dtype=torch.bool, device=real.device).tril()
    keys = torch.nn.functional.pad(real, (0, key_room), value=False)
    return _format(causal[None, None] & keys[:, None, None, :], style, dtype)


def decode_mask(key_real: torch.Tensor, query_length: int, style: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask for ``query_length`` new tokens attending to ``key_real`` (B, Lk) keys, the new ones last."""
    key_length = key_real.shape[1]
    rows = torch.arange(query_length, device=key_real.device)[:, None] + (key_length - query_length)
    causal = torch.arange(key_length, device=key_real.device)[None, :] <= rows  # (T, Lk)
    return _format(causal[None, None] & key_real[:, None, None, :], style, dtype)


def format_mask(allowed: torch.Tensor, style: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) in the attention backend's format ("sdpa": as is; "eager": additive)."""
    return _format(allowed, style, dtype)


def _format(allowed: torch.Tensor, style: str, dtype: torch.dtype) -> torch.Tensor:
    if style == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
