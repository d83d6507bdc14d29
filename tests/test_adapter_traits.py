"""Adapters as traits: the registry, the frozen traits, and the one rule that decides which methods run where."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

import vlprune.adapters as adapters
import vlprune.pruners
from vlprune.adapters import AdapterTraits, VisionTower, refusal, traits_of
from vlprune.adapters.base import continuation_starts
from vlprune.errors import VlpruneError
from vlprune.needs import Need

ROOT = Path(__file__).resolve().parents[1]


def test_the_registry_lists_the_families_in_their_documented_order() -> None:
    assert adapters.family_names() == vlprune.pruners.FAMILY_NAMES
    assert adapters.family_names() == (
        "llava",
        "llava-next",
        "llava-onevision",
        "qwen2-vl",
        "qwen2.5-vl",
        "qwen3-vl",
    )
    for adapter in adapters.FAMILIES.values():
        assert adapter.family == adapter.traits.family  # the old class attribute reads the traits


def test_traits_are_frozen_and_refused_for_an_unknown_family() -> None:
    traits = traits_of("qwen2.5-vl")
    with pytest.raises(dataclasses.FrozenInstanceError):
        traits.family = "other"  # type: ignore[misc]
    assert traits.tower is VisionTower.PACKED and traits.packed_tower and not traits.has_cls
    assert traits_of("llava-onevision").multi_crop and not traits_of("llava-onevision").has_cls
    with pytest.raises(VlpruneError, match="unknown model family 'llava-2'; the families are llava, "):
        traits_of("llava-2")


def test_a_decorated_adapter_serves_its_classes() -> None:
    @adapters.register_adapter("MadeUpForConditionalGeneration")
    class MadeUp(adapters.LlavaAdapter):
        traits = dataclasses.replace(adapters.LlavaAdapter.traits, family="made-up")

    try:
        assert adapters.FAMILIES["MadeUpForConditionalGeneration"] is MadeUp
        assert traits_of("made-up") is MadeUp.traits
    finally:
        del adapters.FAMILIES["MadeUpForConditionalGeneration"]
    assert "made-up" not in adapters.family_names()


def test_the_refusal_rule_gives_each_reason_its_message() -> None:
    packed, tiled = traits_of("qwen2-vl"), traits_of("llava-next")
    assert refusal(packed, frozenset({Need.CLS_ATTENTION}), "m", tower_name="qwen2_vl") == (
        "method 'm' needs the vision tower's [CLS] token, and qwen2_vl has none"
    )
    assert refusal(packed, frozenset({Need.CLS_ATTENTION}), "m", cls_substitute="received") is None
    assert refusal(packed, frozenset({Need.VISION_MAP, Need.VISION_KEYS}), "m") == (
        "method 'm' reads the vision encoder's map, which is not implemented for qwen2-vl yet"
    )
    assert refusal(tiled, frozenset({Need.VISION_MAP}), "m") == (
        "m reads one vision attention map per image; llava-next encodes a base view and tiles per image, and this "
        "method's multi-crop path is not implemented yet"
    )
    frozen_tower = AdapterTraits(family="x", prunes_in_vision=False)
    assert refusal(frozen_tower, frozenset(), "m", prunes_in_vision=True) == (
        "m prunes inside the vision encoder, which is not implemented for x yet"
    )


def test_the_families_of_a_method_follow_from_the_declarations() -> None:
    assert vlprune.pruners.families_of("fastervlm") == ["llava", "llava-next"]  # [CLS] attention, no substitute
    assert vlprune.pruners.families_of("holov") == list(adapters.family_names())  # the received substitute
    assert "llava-onevision" not in vlprune.pruners.families_of("visionzip")


def test_no_pruner_compares_family_names() -> None:
    names = "|".join(re.escape(name) for name in adapters.family_names())
    for path in sorted((ROOT / "vlprune" / "pruners").glob("*.py")):
        code = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", '"', "'"))
        )
        assert not re.search(rf"[=!]=\s*[\"']({names})[\"']|in\s+\w*FAMIL", code), path.name


def test_the_interface_declares_every_member_the_engine_calls() -> None:
    called = set()
    for path in sorted((ROOT / "vlprune" / "engine").glob("*.py")):
        called |= set(re.findall(r"adapter\.([A-Za-z_]\w*)", path.read_text()))
    declared = {name for name, _ in inspect.getmembers(adapters.ModelAdapter)} | set(
        adapters.ModelAdapter.__annotations__
    )
    assert called - declared == set()


def test_a_pruner_written_against_family_names_still_plans_and_budgets() -> None:
    from dataclasses import dataclass

    from vlprune.pruners import Pruner, StagePlan

    @dataclass
    class ByName(Pruner):
        name = "by-name"

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=1)]

        def plan_for_family(self, family: str, num_visual: int, num_layers: int) -> list[StagePlan]:
            if family == "llava-next":
                return [StagePlan(layer=0, keep=2)]
            return super().plan_for_family(family, num_visual, num_layers)

        def vision_budget(self, family: str, image_tokens: int, view_patches: int, views: int) -> int:
            return 3 if family == "qwen2-vl" else super().vision_budget(family, image_tokens, view_patches, views)

    pruner = ByName(keep=4)
    assert pruner.plan_for(traits_of("llava-next"), 8, 2) == [StagePlan(layer=0, keep=2)]
    assert pruner.plan_for(traits_of("llava"), 8, 2) == [StagePlan(layer=0, keep=1)]
    assert pruner.vision_budget_for(traits_of("qwen2-vl"), 8, 8, 1) == 3
    assert pruner.vision_budget_for(traits_of("llava"), 8, 8, 1) == 4


def test_a_continuation_starts_after_each_samples_real_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # the first prompt left-padded by 2
    assert continuation_starts(5, torch.device("cpu"), mask).tolist() == [[3], [5]]
    assert continuation_starts(5, torch.device("cpu"), None).tolist() == [[5]]
    with pytest.raises(VlpruneError, match=r"prompt_mask must be \(batch, 5\).*got \(2, 4\)"):
        continuation_starts(5, torch.device("cpu"), mask[:, :4])
