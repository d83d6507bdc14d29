"""The engine's registry of stage-input providers: one per need, each filling exactly the context fields tagged with
its need, and nothing beyond the core for a plan that asks for nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import vlprune
from vlprune.adapters import FAMILIES
from vlprune.engine.stage_inputs import PROVIDERS, ROW_MODES, provider
from vlprune.needs import Need
from vlprune.pruners import Pruner, QueryRows, Selection, Stage, StageContext, StagePlan, create
from vlprune.pruners.contexts import CORE_FIELDS, provider_of


class NeedsRecorder(Pruner):
    """Asks for ``needs`` (with the last token's attention rows when ``rows``) at layer 2, keeps the first tokens and
    records the contexts it was handed."""

    name = "needs-recorder"
    stage = Stage.IN_LLM

    def __init__(self, needs: frozenset[Need], rows: bool) -> None:
        self.keep, self.needs, self.rows, self.contexts = 8, needs, rows, []

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        rows = QueryRows.LAST if self.rows else None
        return [StagePlan(layer=2, keep=self.keep, query_rows=rows, needs=self.needs)]

    def select(self, ctx: StageContext) -> Selection:
        self.contexts.append(ctx)
        return Selection(keep_index=torch.arange(ctx.keep).expand(ctx.batch_size, -1))


def _context(needs: frozenset[Need], rows: bool) -> StageContext:
    model, processor = tiny_model("clip")
    pruner = NeedsRecorder(needs, rows)
    with vlprune.attach(model, pruner):
        model(**tiny_inputs(processor, 2))
    (context,) = pruner.contexts
    return context


def test_every_need_has_one_provider_or_shapes_the_attention_rows() -> None:
    assert set(PROVIDERS) | ROW_MODES == set(Need)
    assert not set(PROVIDERS) & ROW_MODES


def test_every_family_declares_only_needs_the_engine_can_provide() -> None:
    for adapter in set(FAMILIES.values()):
        assert adapter.traits.provides <= set(PROVIDERS) | ROW_MODES, adapter.traits.family


def test_a_second_provider_for_a_need_is_refused() -> None:
    with pytest.raises(ValueError, match="vision_keys"):
        provider(Need.VISION_KEYS)(lambda reads: {})
    with pytest.raises(ValueError, match="per_head_attention"):
        provider(Need.PER_HEAD_ATTENTION)(lambda reads: {})


def test_each_provider_fills_exactly_the_fields_of_its_need() -> None:
    """Every need LLaVA-1.5 (CLIP, with [CLS]) serves at once: each field tagged with a need of the plan or with the
    attention rows is given, and only the vision-tower pruning's field (no such stage here) is left empty."""
    needs = frozenset(Need) - {Need.OWN_LAYER_ATTENTION}  # own-layer rows come without value states
    context = _context(needs, rows=True)
    for spec in dataclasses.fields(StageContext):
        given = getattr(context, spec.name) is not None
        tag = provider_of(spec.name)
        expected = spec.name in CORE_FIELDS or tag in needs or tag == "query_rows"
        assert given == expected, (spec.name, tag)


def test_a_plan_that_asks_for_nothing_gets_the_core_alone() -> None:
    context = _context(frozenset(), rows=False)
    for spec in dataclasses.fields(StageContext):
        assert (getattr(context, spec.name) is not None) == (spec.name in CORE_FIELDS), spec.name


def test_the_instruction_ids_are_the_prompt_ids_after_the_image_and_embed_to_its_input_embeddings() -> None:
    model, processor = tiny_model("clip")
    inputs = tiny_inputs(processor, 2)
    pruner = NeedsRecorder(frozenset({Need.INSTRUCTION_IDS, Need.INITIAL_EMBEDDINGS}), rows=False)
    with vlprune.attach(model, pruner):
        model(**inputs)
    (ctx,) = pruner.contexts
    visual = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    lengths = []
    for b in range(2):
        after_image = torch.arange(visual.shape[1]) > visual[b].nonzero()[0, 0]
        text = inputs["input_ids"][b][real[b] & ~visual[b] & after_image]
        count = len(text)
        lengths.append(count)
        assert torch.equal(ctx.instruction_ids[b, :count], text)
        assert bool(ctx.instruction_mask[b, :count].all()) and not bool(ctx.instruction_mask[b, count:].any())
        assert not bool(ctx.instruction_ids[b, count:].any())  # padding reads 0, not a repeated token
    assert torch.equal(ctx.instruction_mask, ctx.initial_text_mask)
    embedded = ctx.input_embeddings(ctx.instruction_ids)
    mask = ctx.instruction_mask
    torch.testing.assert_close(embedded[mask], ctx.initial_text_hidden[mask], atol=0, rtol=0)
    assert len(set(lengths)) == 2, "the tiny batch should pad one sample's instruction"


def test_the_pipeline_binds_its_processor_s_tokenizer_to_the_pruner() -> None:
    model, processor = tiny_model("clip")
    pipeline = vlprune.load((model, processor), method="random", keep=8)
    assert pipeline.pruner.tokenizer is processor.tokenizer
    assert create("random", keep=4).tokenizer is None
