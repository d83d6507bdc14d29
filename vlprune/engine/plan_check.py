"""Checking a pruner's plan against a model's shape, so that a bad budget or layer fails before any work, and its
answer at each stage (:func:`checked_keep_index`).

The engine runs these checks when a pruner is attached and at each prefill; the API and the CLI run them from a
model's configuration alone (:func:`check_fits`), before the weights are loaded.
"""

from __future__ import annotations

import torch

from vlprune.errors import VlpruneError
from vlprune.pruners.base import Pruner, Selection, StageContext, StagePlan


def check_plan(method: str, plan: list[StagePlan], num_visual: int, num_layers: int) -> None:
    """Stage layers increase within the model's layers, layer-0 stages need no earlier attention, and each stage's
    count lies in [1, the previous stage's count].

    Raises:
        VlpruneError: naming the method and the stage that breaks the rule.
    """
    previous_layer, previous_keep = -1, num_visual
    for stage in plan:
        if not 0 <= stage.layer < num_layers or stage.layer <= previous_layer:
            raise VlpruneError(
                f"{method}: stage layers must increase within 0..{num_layers - 1}, got {[s.layer for s in plan]}"
            )
        if stage.query_rows is not None and stage.layer == 0 and not stage.own_layer_attention:
            raise VlpruneError(f"{method}: a stage at layer 0 has no earlier attention to score with")
        if stage.query_row_attention and stage.query_rows is None:
            raise VlpruneError(f"{method}: a stage asks for the query rows' own attention but names no query rows")
        if (stage.value_states or stage.key_states) and (stage.query_rows is None or stage.own_layer_attention):
            raise VlpruneError(f"{method}: value and key states come with query rows from the layer before the stage")
        if stage.keep is not None and not 1 <= stage.keep <= previous_keep:
            raise VlpruneError(f"{method}: keep={stage.keep} at layer {stage.layer} is outside [1, {previous_keep}]")
        previous_layer = stage.layer
        previous_keep = previous_keep if stage.keep is None else stage.keep


def check_fits(pruner: Pruner, num_visual: int, num_layers: int) -> list[StagePlan]:
    """The plan of ``pruner`` for a model with ``num_visual`` visual tokens per sample and ``num_layers`` decoder
    layers, checked.

    Raises:
        VlpruneError: a budget or a layer the model does not have.
    """
    plan = pruner.plan(num_visual, num_layers)
    check_plan(pruner.name, plan, num_visual, num_layers)
    return plan


def checked_keep_index(
    selection: Selection,
    context: StageContext,
    fixed: bool = True,
    keep_order: bool = False,
    check_values: bool = True,
) -> torch.Tensor:
    """The pruner's indices, checked, and sorted unless ``keep_order`` (an ordered selection with re-indexed
    positions); ``fixed=False`` (a plan with ``keep=None``) lets the pruner choose the count (the engine
    runs such stages sample by sample). ``check_values=False`` checks the shape only (a captured graph reads
    nothing back from the device; the eager engine checks every method's indices)."""
    if selection.ordered and selection.kept_hidden is not None:
        raise RuntimeError("a selection cannot be both ordered and carry kept_hidden (which follows ascending order)")
    keep_index = selection.keep_index.to(context.visual_hidden.device).long()
    expected = (context.batch_size, context.keep)
    shape_ok = tuple(keep_index.shape) == expected
    if not fixed:
        shape_ok = keep_index.dim() == 2 and keep_index.shape[0] == context.batch_size
        shape_ok = shape_ok and 1 <= keep_index.shape[1] <= context.num_visual
    if not shape_ok:
        raise RuntimeError(f"pruner returned keep_index of shape {tuple(keep_index.shape)}, expected {expected}")
    ascending = keep_index.sort(dim=1).values
    out_of_range = (ascending[:, 0] < 0) | (ascending[:, -1] >= context.num_visual)
    repeated = (ascending[:, 1:] == ascending[:, :-1]).any(dim=1)
    if check_values and bool((out_of_range | repeated).any()):  # one device read for both checks
        raise RuntimeError(f"the pruner returned indices outside [0, {context.num_visual}) or the same index twice")
    return keep_index if keep_order else ascending
