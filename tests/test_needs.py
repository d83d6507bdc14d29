"""Stage inputs as a set of needs: the plan's set, the old flags that read it, and the context's provided fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlprune.needs import LANGUAGE_MODEL_NEEDS, VISION_READS, Need, needs_from_flags
from vlprune.pruners import StageContext, StagePlan, create
from vlprune.pruners.contexts import CORE_FIELDS, provider_of
from vlprune.pruners.plans import plan_needs


def test_the_needs_split_into_the_language_models_and_the_vision_sides() -> None:
    assert LANGUAGE_MODEL_NEEDS | set(VISION_READS) == set(Need)
    assert not LANGUAGE_MODEL_NEEDS & set(VISION_READS)


@pytest.mark.parametrize("need", list(Need))
def test_each_need_reads_as_the_flag_it_replaced(need: Need) -> None:
    plan = StagePlan(layer=0, keep=4, needs=frozenset({need}))
    assert getattr(plan, need.value) is True
    assert all(getattr(plan, other.value) is False for other in Need if other is not need)
    assert plan == StagePlan(layer=0, keep=4, **{need.value: True})  # the old keyword spelling


def test_a_plan_without_needs_equals_the_bare_plan() -> None:
    assert StagePlan(0, 16) == StagePlan(layer=0, keep=16, needs=frozenset())
    assert dataclasses.replace(StagePlan(0, 16, vision_keys=True), keep=8) == StagePlan(0, 8, vision_keys=True)


def test_an_unknown_flag_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(TypeError, match="vision_keys"):
        StagePlan(layer=0, keep=4, vision_key=True)
    assert needs_from_flags({"vision_keys": True, "value_states": False}) == {Need.VISION_KEYS}


def test_the_methods_plans_name_their_inputs_as_needs() -> None:
    assert plan_needs(create("fastervlm", keep=0.25).plan(576, 32)) == {Need.CLS_ATTENTION}
    assert plan_needs(create("visionzip", keep=0.25).plan(576, 32)) == {
        Need.CLS_ATTENTION,
        Need.VISION_KEYS,
        Need.VISION_FEATURES,
    }
    assert plan_needs(create("adaptinfer", keep=0.25).plan(576, 32)) == {
        Need.PER_HEAD_ATTENTION,
        Need.QUERY_ROW_ATTENTION,
    }
    assert plan_needs(create("fastv", keep=0.25).plan(576, 32)) == frozenset()


def test_the_context_is_a_core_plus_fields_each_tagged_with_what_provides_it() -> None:
    for spec in dataclasses.fields(StageContext):
        assert (provider_of(spec.name) is None) == (spec.name in CORE_FIELDS), spec.name
    assert provider_of("vision_keys") is Need.VISION_KEYS
    assert provider_of("pixel_values") is Need.VISION_MAP
    assert provider_of("query_attention") == "query_rows"
    hidden = torch.zeros(1, 3, 2)
    context = StageContext(
        layer=0,
        keep=1,
        visual_hidden=hidden,
        visual_positions=torch.zeros(1, 3),
        visual_origin=torch.zeros(1, 3),
        vision_keys=hidden,
        text_hidden=None,
    )
    assert list(context.provided) == ["vision_keys"]
    assert provider_of("text_hidden") is Need.TEXT_TOKENS and context.vision_features is None
