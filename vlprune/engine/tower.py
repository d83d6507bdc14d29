"""The vision-tower strategy: how the engine reads and prunes a family's vision tower, chosen by the adapter's
``traits.tower``.

A patch tower (:data:`~vlprune.adapters.VisionTower.PATCH`: one sequence per crop, [CLS] first where it has one) is
read by :class:`~vlprune.engine.tower_patch.PatchTowerRecord` and pruned inside by
:class:`~vlprune.engine.vision.VisionStages`; a packed, merged tower (``PACKED``: the Qwen-VL family) by
:class:`~vlprune.engine.tower_packed.PackedTowerRecord` and :class:`~vlprune.engine.packed_vision.PackedVisionStages`.
A family with another kind of tower adds its pair here.
"""

from __future__ import annotations

from typing import Any

from vlprune.adapters import ModelAdapter, VisionTower
from vlprune.engine.packed_vision import PackedVisionStages
from vlprune.engine.tower_packed import PackedTowerRecord
from vlprune.engine.tower_patch import PatchTowerRecord, TowerWants
from vlprune.engine.vision import VisionStages
from vlprune.pruners.base import Pruner

__all__ = ["TowerWants", "tower_record_for", "vision_stages_for"]


def tower_record_for(
    adapter: ModelAdapter, wants: TowerWants, image_inputs: dict[str, Any]
) -> PatchTowerRecord | PackedTowerRecord:
    """What records the feature layer's values of ``adapter``'s tower for the vision bridge."""
    if adapter.traits.tower is VisionTower.PACKED:
        return PackedTowerRecord(adapter, wants, image_inputs)
    return PatchTowerRecord(adapter, wants)


def vision_stages_for(
    adapter: ModelAdapter, pruner: Pruner, image_inputs: dict[str, Any]
) -> VisionStages | PackedVisionStages:
    """The hooks that run ``pruner``'s vision-encoder stages on ``adapter``'s tower."""
    stages = PackedVisionStages if adapter.traits.tower is VisionTower.PACKED else VisionStages
    return stages(adapter, pruner, image_inputs)
