"""Ragged batches: samples whose prompts hold different numbers of visual tokens (LLaVA-NeXT images of different
aspect ratios, or different image counts per sample).

The batched path hands a pruner (B, N) tensors with one N and one budget for the batch. A ragged stage instead
builds the batch's context once, padded to the largest sample, cuts it into one context per sample with that sample's
own token count and budget, and calls the pruner once per sample, so each sample is pruned exactly as it would be
alone and pruners never see padding. The samples then keep different numbers of tokens: the next sequence is as
long as the longest sample's, and the shorter samples are left-filled with slots that are padding (not real, not
visual), which the masks already exclude.
"""

from __future__ import annotations

import dataclasses

import torch

from vlprune.pruners.base import RecycledTokens, Selection, StageContext

# StageContext fields with an axis over the stage's current visual tokens (axis index), and over the prompt's
# original visual tokens (all listed axes).
_CURRENT_AXIS = {
    "visual_hidden": 1,
    "visual_positions": 1,
    "visual_origin": 1,
    "query_attention": -1,
    "vision_cls_attention": 1,
    "vision_features": 1,
    "vision_keys": 1,
    "vision_received_attention": 1,
    "vision_early_attention": 1,
    "vision_kept": 1,
    "visual_values": 2,
    "visual_keys": 2,
}
_ORIGINAL_AXES = {"initial_visual_hidden": (1,), "vision_attention": (1, 2)}
_PER_SAMPLE = (
    "query_mask",
    "query_positions",
    "query_row_attention",
    "text_hidden",
    "text_mask",
    "initial_text_hidden",
    "initial_text_mask",
    "instruction_ids",
    "instruction_mask",
    "pixel_values",
    "query_values",
    "query_keys",
)
# Fields over the vision tower's crops of the whole batch, which the geometry's crop indices point into.
_WHOLE_BATCH = ("vision_crop_attention", "vision_crop_pixels")


def sample_context(context: StageContext, sample: int, count: int, original: int, keep: int) -> StageContext:
    """The context of sample ``sample`` alone: its ``count`` current and ``original`` prompt visual tokens, its
    budget ``keep``."""
    values = {}
    for spec in dataclasses.fields(context):
        value = getattr(context, spec.name)
        if not isinstance(value, torch.Tensor):
            continue
        if spec.name in _WHOLE_BATCH:
            continue
        value = value[sample : sample + 1]
        if spec.name in _CURRENT_AXIS:
            value = value.narrow(_CURRENT_AXIS[spec.name] % value.dim(), 0, count)
        elif spec.name in _ORIGINAL_AXES:
            for axis in _ORIGINAL_AXES[spec.name]:
                value = value.narrow(axis, 0, original)
        elif spec.name not in _PER_SAMPLE:
            raise RuntimeError(f"StageContext.{spec.name} has no rule for ragged batches")
        values[spec.name] = value
    geometry = context.geometry
    if geometry is not None:
        values["geometry"] = geometry.sample(sample, count)
    pack = context.pack_crop_values
    if pack is not None:

        def pack_sample(crop_values: torch.Tensor, fill: float) -> torch.Tensor:
            return pack(crop_values, fill)[sample : sample + 1, :original]

        values["pack_crop_values"] = pack_sample
    return dataclasses.replace(context, keep=keep, **values)


def stacked_recycled(selections: list[Selection], hidden_size: int, like: torch.Tensor) -> RecycledTokens | None:
    """The samples' recycled tokens in one (B, Mmax, D) tensor (zeros after a sample's own M), or None if none
    recycles."""
    counts = [0 if s.recycled is None else s.recycled.hidden.shape[1] for s in selections]
    if not any(counts):
        return None
    width = max(counts)
    hidden = like.new_zeros(len(selections), width, hidden_size)
    positions = torch.zeros(len(selections), width, dtype=torch.long, device=like.device)
    for index, selection in enumerate(selections):
        if counts[index]:
            hidden[index, : counts[index]] = selection.recycled.hidden[0].to(hidden.dtype)
            positions[index, : counts[index]] = selection.recycled.positions[0].to(like.device)
    return RecycledTokens(hidden=hidden, positions=positions)


def ragged_order(
    is_visual: torch.Tensor, kept_slots: list[torch.Tensor], recycled: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot order of the next sequence, as indices into ``cat(current slots, recycled tokens)``, and where it is
    filler.

    Args:
        is_visual: (B, L) the current layout's visual slots.
        kept_slots: per sample, (k_b,) slots of its kept visual tokens in the order they enter (ascending unless a
            pruner ordered them).
        recycled: per sample, how many recycled tokens it adds (indices L.. L + M_b - 1, right after its last
            visual slot).

    Returns:
        (B, L') long order and (B, L') bool, True at the filler slots that left-fill the shorter samples (they
        point at slot 0; the caller marks them padding).
    """
    length = is_visual.shape[1]
    rows = []
    for sample, kept in enumerate(kept_slots):
        visual = is_visual[sample]
        stays = (~visual).clone()
        stays[kept] = True
        base = stays.nonzero()[:, 0]
        base = base.masked_scatter(visual[base], kept)
        last_visual = visual.nonzero()[-1, 0]
        insert_at = int((base <= last_visual).sum())
        extra = torch.arange(length, length + recycled[sample], device=base.device)
        rows.append(torch.cat([base[:insert_at], extra, base[insert_at:]]))
    width = max(len(row) for row in rows)
    order = torch.zeros(len(rows), width, dtype=torch.long, device=is_visual.device)
    filler = torch.ones(len(rows), width, dtype=torch.bool, device=is_visual.device)
    for sample, row in enumerate(rows):
        order[sample, width - len(row) :] = row
        filler[sample, width - len(row) :] = False
    return order, filler
