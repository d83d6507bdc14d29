"""Running a pruning stage: the pruner's selection, then one path that applies it to the batch (order ->
compaction -> mask -> positions -> segment and statistics), for a batch pruned as one, a batch pruned sample by
sample (a ragged batch, or a count the data decides) and a static prefill inside a captured graph alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprune.engine.compaction import compact
from vlprune.engine.layout import order_after_stage, prefill_mask
from vlprune.engine.plan_check import checked_keep_index
from vlprune.engine.positions import with_model_positions
from vlprune.engine.prefill import Prefill
from vlprune.engine.ragged import ragged_order, sample_context, stacked_recycled
from vlprune.engine.stage_context import StageInputs, StageSources, build_stage_context
from vlprune.engine.static_mode import StaticMode
from vlprune.kernels import gather_tokens
from vlprune.pruners.base import Pruner, Selection, StagePlan


@dataclass
class Cut:
    """What a stage's selections make of the batch, in the form the one apply path takes.

    Attributes:
        hidden: (B, L, D) the states the next sequence is gathered from.
        order: (B, L') the slot each position of the next sequence reads (recycled tokens after the L slots).
        kept_slots: (B, K) the slots that ``selection.kept_hidden`` (B, K, D) overwrites before the gather.
        selection: the kept states merged in place, if any, and the recycled tokens.
        filler: (B, L') slots that left-fill the shorter samples of a batch cut sample by sample, else None.
        kept_origin: per sample, the kept tokens' original indices (-1 for earlier recycled ones): on the device
            (B, K) for a batch cut as one, on the host for one cut sample by sample.
        recycled: per sample, the recycled tokens it adds.
        out: per sample, its visual tokens after the stage.
    """

    hidden: torch.Tensor
    order: torch.Tensor
    kept_slots: torch.Tensor
    selection: Selection
    filler: torch.Tensor | None
    kept_origin: torch.Tensor | list[list[int]]
    recycled: list[int]
    out: list[int]


class StageRunner:
    """Runs a session's stages.

    Args:
        pruner: the method.
        reindex: True when positions are renumbered after each stage ("reindex"), False to keep them.
        sources: where the stages' inputs come from (:class:`~vlprune.engine.stage_context.StageSources`).
    """

    def __init__(self, pruner: Pruner, reindex: bool, sources: StageSources) -> None:
        self.pruner = pruner
        self.reindex = reindex
        self.sources = sources

    def layer_inputs(self, prefill: Prefill, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """What decoder layer ``index`` receives during ``prefill``: the sequence after the stage at this layer,
        if any, and, once a stage has run, the pruned sequence's mask, positions and cos/sin (None: unchanged)."""
        stage = prefill.stage_at.get(index)
        if stage is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if not prefill.segments:
                prefill.layout = with_model_positions(prefill.layout, kwargs, hidden.shape[0])
            hidden = self.run(stage, hidden, prefill, prefill.static)
            args, kwargs = _with_hidden(args, kwargs, hidden)
        if not prefill.segments:
            return None
        layout = prefill.layout
        kwargs["attention_mask"] = prefill.mask
        kwargs["position_embeddings"] = layout.position_embeddings
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = layout.positions
        return args, kwargs

    def run(self, stage: StagePlan, hidden: torch.Tensor, prefill: Prefill, static: StaticMode | None) -> torch.Tensor:
        """The hidden states after ``stage``, the input of its layer; ``prefill`` follows the new sequence.
        ``static``: the prefill runs inside a captured graph (no device reads, masks over the cache's room)."""
        prefill.layout = prefill.layout.to(hidden.device)
        inputs = build_stage_context(stage, hidden, prefill, self.sources)
        if prefill.ragged or (stage.keep is None and inputs.context.batch_size > 1):
            cut = self._cut_by_sample(stage, inputs, prefill)
        else:
            cut = self._cut_as_one(stage, inputs, prefill, static)
        return self._apply(stage, cut, prefill, static)

    def _cut_as_one(self, stage: StagePlan, inputs: StageInputs, prefill: Prefill, static: StaticMode | None) -> Cut:
        """The pruner's selection over the whole batch, every sample with the same count."""
        context, slots = inputs.context, inputs.slots
        selection = self.pruner.select(context)
        keep_index = checked_keep_index(
            selection,
            context,
            fixed=stage.keep is not None,
            keep_order=selection.ordered and self.reindex,
            check_values=static is None,
        )
        kept_slots = gather_tokens(slots, keep_index)
        recycled = selection.recycled
        num_recycled = 0 if recycled is None else recycled.hidden.shape[1]
        return Cut(
            hidden=inputs.hidden,
            order=order_after_stage(prefill.layout, kept_slots, num_recycled),
            kept_slots=kept_slots,
            selection=selection,
            filler=None,
            kept_origin=gather_tokens(context.visual_origin, keep_index),
            recycled=[num_recycled] * context.batch_size,
            out=[keep_index.shape[1] + num_recycled] * context.batch_size,
        )

    def _cut_by_sample(self, stage: StagePlan, inputs: StageInputs, prefill: Prefill) -> Cut:
        """The pruner's selection on each sample alone (see :mod:`vlprune.engine.ragged`), with its own count and
        budget; the shorter samples of the next sequence are left-filled."""
        context, hidden, slots = inputs
        kept_slots, kept_origin, selections = [], [], []
        for sample, (count, original) in enumerate(zip(prefill.current_counts, prefill.visual_counts, strict=True)):
            budget = prefill.sample_plans[sample][prefill.stage_index].keep
            if budget is not None and stage.keep_at_most:
                budget = min(budget, count)
            alone = sample_context(context, sample, count, original, budget if budget is not None else count)
            selection = self.pruner.select(alone)
            index = checked_keep_index(
                selection, alone, fixed=budget is not None, keep_order=selection.ordered and self.reindex
            )[0]
            kept_slots.append(slots[sample, index])
            kept_origin.append(alone.visual_origin[0, index].tolist())
            selections.append(selection)
        if any(s.kept_hidden is not None for s in selections):  # in-place merges replace kept states before the gather
            hidden = hidden.clone()
            for sample, selection in enumerate(selections):
                if selection.kept_hidden is not None:
                    hidden[sample, kept_slots[sample]] = selection.kept_hidden[0].to(hidden.dtype)
        recycled = stacked_recycled(selections, hidden.shape[-1], hidden)
        recycled_counts = [0 if s.recycled is None else s.recycled.hidden.shape[1] for s in selections]
        order, filler = ragged_order(prefill.layout.is_visual, kept_slots, recycled_counts)
        return Cut(
            hidden=hidden,
            order=order,
            kept_slots=slots,
            selection=Selection(keep_index=slots, recycled=recycled),
            filler=filler,
            kept_origin=kept_origin,
            recycled=recycled_counts,
            out=[len(kept) + extra for kept, extra in zip(kept_origin, recycled_counts, strict=True)],
        )

    def _apply(self, stage: StagePlan, cut: Cut, prefill: Prefill, static: StaticMode | None) -> torch.Tensor:
        """The one path from a cut to the next sequence: gather (with positions and cos/sin), layout, mask,
        segment and statistics."""
        device, dtype = cut.hidden.device, cut.hidden.dtype
        new_hidden, new_layout = compact(
            prefill.layout,
            cut.hidden,
            cut.order,
            cut.kept_slots,
            cut.selection,
            rotary=self.sources.adapter.rotary_embedding,
            keep_positions=not self.reindex,
            filler=cut.filler,
        )
        prefill.layout = new_layout
        if cut.filler is not None:
            prefill.padded = prefill.padded or bool(cut.filler.any())
        key_room = 0 if static is None else static.key_room
        padded = prefill.padded or static is not None
        prefill.mask = prefill_mask(new_layout.real, self.sources.mask_style, dtype, padded, key_room)
        prefill.add_segment(stage, new_layout, cut.out, self.reindex, device)
        if static is not None and isinstance(cut.kept_origin, torch.Tensor):
            prefill.defer_stage_stats(stage, cut.kept_origin, cut.recycled, cut.out)  # read once the graph has run
        else:
            kept_origin = cut.kept_origin
            kept_origin = kept_origin.tolist() if isinstance(kept_origin, torch.Tensor) else kept_origin
            prefill.add_stage_stats(stage, kept_origin, cut.recycled, cut.out)
        return new_hidden


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs
