"""RoPE positions of a pruned sequence: which numbering a session runs ("original" or "reindex"), the model's own
positions taken as a prefill's starting point, the query rows' positions, and the shifted positions of decode steps
after re-indexing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from vlprune.adapters import ModelAdapter
from vlprune.engine.layout import Layout
from vlprune.engine.scoring import query_rows
from vlprune.errors import VlpruneError
from vlprune.pruners.base import Pruner, StagePlan

POSITION_MODES = ("original", "reindex")

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def resolve_positions(pruner: Pruner, positions: str | None, adapter: ModelAdapter | None = None) -> str:
    """``positions``, or the pruner's reference's handling when it is None; on a family that numbers positions in
    one way only (``ModelAdapter.position_modes``: the Qwen-VL family keeps the kept tokens' multimodal positions),
    None gives that way.

    Raises:
        VlpruneError: a value other than None, "original" or "reindex", or one the model's family does not support.
    """
    modes = POSITION_MODES if adapter is None else adapter.traits.position_modes
    if positions is None:
        positions = pruner.reference_positions()
        return positions if positions in modes else modes[0]
    if positions not in POSITION_MODES:
        raise VlpruneError(
            f"positions={positions!r} is not valid; choose one of {POSITION_MODES} or None (the method's)"
        )
    if positions not in modes:
        raise VlpruneError(
            f"positions={positions!r} is not supported on {adapter.family}, whose multimodal RoPE positions vlprune "
            f"keeps as they are; use one of {modes}"
        )
    return positions


def with_model_positions(layout: Layout, kwargs: dict, batch: int) -> Layout:
    """``layout`` with the positions and cos/sin the model computed for the full prompt (a decoder layer's
    keyword arguments), as the starting layout of the first stage."""
    cos, sin = kwargs["position_embeddings"]
    positions = kwargs.get("position_ids")
    if positions is not None:
        positions = positions.expand(batch, -1) if positions.dim() == 2 else positions
    else:
        positions = layout.positions
    return replace(
        layout,
        positions=positions.to(layout.positions.device),
        position_embeddings=(cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
    )


def query_positions(stage: StagePlan, layout: Layout, device: torch.device) -> torch.Tensor:
    """The positions of the stage's query rows."""
    rows, _ = query_rows(stage.query_rows, layout, device)
    return torch.gather(layout.positions.to(device), 1, rows)


def rotary_for(rotary: Rotary, hidden: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The model's rotary embedding at given positions, for a pruner that rotates its own queries or keys."""

    def at(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(hidden, positions)

    return at


def shifted_decode_positions(kwargs: dict, shift: torch.Tensor, batch: int) -> torch.Tensor:
    """A decode step's positions for layers whose prefill was re-indexed: ``generate``'s positions less the
    segment's ``shift`` (B,), the tokens the stages removed before it.

    Raises:
        VlpruneError: the call carries no ``position_ids``.
    """
    positions = kwargs.get("position_ids")
    if positions is None:
        raise VlpruneError("positions='reindex' needs position_ids during decoding (generate passes them)")
    return positions.expand(batch, -1) - shift[:, None].to(positions.device)
