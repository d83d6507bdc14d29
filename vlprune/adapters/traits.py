"""What a model family is, as the engine and the pruners may ask it: a frozen :class:`AdapterTraits` per adapter, and
the one rule (:func:`refusal`) that says whether a method's stages can run on it.

Pruners never compare family names: they ask traits (``traits.multi_crop``, ``traits.tower``) or inputs
(``Need.VISION_MAP in traits.provides``). ``vlprune methods``, the README's table and the engine's refusals all come
from :func:`refusal` over the adapters' declarations, so they cannot disagree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vlprune.needs import LANGUAGE_MODEL_NEEDS, VISION_READS, Need


class VisionTower(enum.StrEnum):
    """How a family's vision tower runs, which decides how the engine reads it and prunes inside it."""

    PATCH = "patch"  # one sequence per crop, the [CLS] token first where the tower has one (CLIP, SigLIP, DINOv2)
    PACKED = "packed"  # every image in one packed sequence, attention image by image, m x m patches merged (Qwen-VL)


@dataclass(frozen=True)
class AdapterTraits:
    """A family's traits.

    Attributes:
        family: the family's name in messages and in ``vlprune methods`` ("llava", "llava-next", ...).
        multi_crop: whether the vision tower may encode several crops (base view and tiles) per image (anyres).
        tower: how the vision tower runs (see :class:`VisionTower`).
        has_cls: whether the vision tower puts a [CLS] token first (per model where the tower varies; the class's
            traits give the family's usual tower, which ``vlprune methods`` lists).
        drops_cls: whether the [CLS] output is dropped before the projector.
        deepstack: whether the language model adds vision features to the visual positions after its first layers
            (Qwen3-VL), which the engine then prunes alike.
        encodes_videos: whether the base model encodes videos whose tokens are visual tokens.
        position_modes: the position handlings the family supports after pruning, the default first.
        geometry_inputs: the keyword arguments of the base model's ``get_image_features`` the geometry reads.
        vision_reads: the vision-side inputs (:data:`vlprune.needs.VISION_READS`) the engine can read on this family
            (the [CLS] attention only where ``has_cls``).
        prunes_in_vision: whether stages may prune inside the vision tower.
    """

    family: str
    multi_crop: bool = False
    tower: VisionTower = VisionTower.PATCH
    has_cls: bool = True
    drops_cls: bool = True
    deepstack: bool = False
    encodes_videos: bool = False
    position_modes: tuple[str, ...] = ("original", "reindex")
    geometry_inputs: tuple[str, ...] = ()
    vision_reads: frozenset[Need] = frozenset(VISION_READS)
    prunes_in_vision: bool = True

    @property
    def provides(self) -> frozenset[Need]:
        """Every input a stage can be given on this family."""
        reads = self.vision_reads if self.has_cls else self.vision_reads - {Need.CLS_ATTENTION}
        return LANGUAGE_MODEL_NEEDS | reads

    @property
    def packed_tower(self) -> bool:
        """Whether the tower runs every image in one packed sequence and merges m x m patches into one token."""
        return self.tower is VisionTower.PACKED


def provided_needs(traits: AdapterTraits, needs: frozenset[Need], cls_substitute: str | None) -> frozenset[Need]:
    """``needs`` as this family serves them: on a tower without [CLS], a method whose reference reads the attention
    each token receives instead (``cls_substitute == "received"``) gets that in place of the [CLS] attention."""
    if Need.CLS_ATTENTION in needs and not traits.has_cls and cls_substitute == "received":
        return (needs - {Need.CLS_ATTENTION}) | {Need.RECEIVED_ATTENTION}
    return needs


def refusal(
    traits: AdapterTraits,
    needs: frozenset[Need],
    method: str,
    *,
    cls_substitute: str | None = None,
    prunes_in_vision: bool = False,
    tower_name: str = "the vision tower",
) -> str | None:
    """Why ``method``, whose stages need ``needs`` (and which prunes inside the vision tower when
    ``prunes_in_vision``), cannot run on this family, or None when it can. ``tower_name`` names the tower in the
    [CLS] refusal (the model's ``vision_config.model_type``)."""
    if Need.CLS_ATTENTION in needs and not traits.has_cls and cls_substitute != "received":
        return f"method {method!r} needs the vision tower's [CLS] token, and {tower_name} has none"
    missing = provided_needs(traits, needs, cls_substitute) - traits.provides
    map_per_crop = Need.VISION_MAP in missing and traits.multi_crop
    unsupported = [
        VISION_READS.get(need, need.value)
        for need in [*VISION_READS, *sorted(missing - set(VISION_READS))]
        if need in missing and not (need is Need.VISION_MAP and map_per_crop)
    ]
    if unsupported:
        return (
            f"method {method!r} reads the vision encoder's {', '.join(unsupported)}, which is not implemented for "
            f"{traits.family} yet"
        )
    if map_per_crop:
        return (
            f"{method} reads one vision attention map per image; {traits.family} encodes a base view and tiles per "
            f"image, and this method's multi-crop path is not implemented yet"
        )
    if prunes_in_vision and not traits.prunes_in_vision:
        return f"{method} prunes inside the vision encoder, which is not implemented for {traits.family} yet"
    return None
