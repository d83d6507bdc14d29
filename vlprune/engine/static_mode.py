"""The static mode of a prefill: how the stage runner behaves when the prefill runs inside a captured graph
(:mod:`vlprune.engine.captured`), where shapes must follow from the plan and nothing may be read from the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from vlprune.pruners.base import StagePlan


class DeferredStage(NamedTuple):
    """A stage whose statistics wait until the graph has run: its kept tokens' original indices stay on the device."""

    stage: StagePlan
    kept_origin: torch.Tensor  # (B, K)
    recycled: list[int]
    visual_out: list[int]


@dataclass
class StaticMode:
    """A prefill that runs as a static-shape graph.

    Attributes:
        key_room: KV slots beyond the prefill that the masks cover (a static cache's room for the answer).
        deferred: the stages run so far whose statistics read the device once the graph has run.
    """

    key_room: int = 0
    deferred: list[DeferredStage] = field(default_factory=list)
