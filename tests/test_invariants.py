"""One invariant suite for every family (issue 25, item 7): over a registry of family cases (LLaVA-1.5 with CLIP,
DINOv2 and SigLIP towers, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL), keep-all equals vanilla
``generate``, dropping equals masking, a batch (ragged where the family allows) equals its samples alone, cached
decoding equals recomputation, detaching restores the model, and every registered method runs or refuses with its
reason. Models come from conftest's shared factory; a family is one row of ``CASES``.

The family files (``test_engine.py``, ``test_anyres_engine.py``, ``test_qwen_engine.py``) still hold their own
versions of these invariants, with more methods and backends, and what is specific to each family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import QUESTIONS, model_leftovers, shared_model
from test_engine import greedy, greedy_under_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners import available_methods, create, families_of
from vlprune.testing import build_tiny_inputs, make_test_image
from vlprune.testing_qwen import build_tiny_qwen_inputs

NEW_TOKENS = 3


@dataclass(frozen=True)
class Case:
    """A family as the suite runs it: the factory's model and how its prompts are made."""

    id: str
    family: str  # the adapter's family (what families_of lists) and conftest's builder
    options: tuple[tuple[str, Any], ...] = ()  # the builder's arguments
    sizes: tuple[tuple[int, int], ...] = ((32, 32), (32, 32))  # (width, height) of each sample's image
    cls: bool = True  # the tower has a [CLS] token (methods that read its attention refuse towers without one)

    @property
    def qwen(self) -> bool:
        return self.family.startswith("qwen")

    @property
    def ragged(self) -> bool:
        """The samples have different numbers of visual tokens."""
        return self.sizes[0] != self.sizes[1] and self.family != "llava"

    def model(self) -> tuple[torch.nn.Module, Any]:
        return shared_model(self.family, **dict(self.options))

    def inputs(self, processor, samples: tuple[int, ...] = (0, 1)):
        """Sample 0 (the shorter question, left-padded in a batch) and sample 1, or one of them alone."""
        images = [make_test_image(seed, 96).resize(self.sizes[seed]) for seed in samples]
        questions = [QUESTIONS[seed] for seed in samples]
        return (build_tiny_qwen_inputs if self.qwen else build_tiny_inputs)(processor, images, questions)


CASES = [
    Case("llava-clip", "llava"),
    Case("llava-dinov2", "llava", (("vision", "dinov2"), ("num_key_value_heads", 2))),
    Case("llava-siglip", "llava", (("vision", "siglip"), ("text", "qwen2"), ("num_key_value_heads", 2)), cls=False),
    Case("llava-next", "llava-next", sizes=((40, 20), (30, 60))),
    Case("llava-onevision", "llava-onevision", sizes=((40, 20), (30, 60)), cls=False),
    Case("qwen2-vl", "qwen2-vl", sizes=((48, 32), (32, 64)), cls=False),
    Case("qwen2.5-vl", "qwen2.5-vl", sizes=((48, 32), (32, 64)), cls=False),
    Case("qwen3-vl", "qwen3-vl", sizes=((48, 32), (32, 64)), cls=False),
]
case_ids = pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])

# Options that fit the tiny 4-layer language model (a method's defaults are for 32 layers where they are absolute).
TINY_OPTIONS = {"adaptinfer": {"layers": [1, 2, 3]}}


def visual_counts(model, inputs) -> list[int]:
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    return torch.isin(inputs["input_ids"], torch.tensor([i for i in ids if i is not None])).sum(1).tolist()


@case_ids
def test_keep_all_equals_vanilla_generate(case: Case) -> None:
    model, processor = case.model()
    inputs = case.inputs(processor)
    tokens, logits = greedy(model, inputs, NEW_TOKENS)
    with vlprune.attach(model, create("none")) as session:
        kept_tokens, kept_logits = greedy(model, inputs, NEW_TOKENS)
    assert torch.equal(kept_tokens, tokens)
    torch.testing.assert_close(kept_logits, logits, atol=1e-6, rtol=0)
    assert session.stats.visual_tokens_per_sample == visual_counts(model, inputs) and session.stats.stages == []


DROP_CASES = [("random", {"keep": 0.3}, 0), ("fastv", {"keep": 0.25, "layer": 2}, 2)]


@pytest.mark.parametrize("method,options,layer", DROP_CASES, ids=[method for method, _, _ in DROP_CASES])
@case_ids
def test_drop_equals_mask(case: Case, method: str, options: dict, layer: int) -> None:
    """Pruning with original positions equals the unpruned model with the pruned tokens masked from the stage's layer
    on, in prefill and decode; pruning must change something for this to mean anything."""
    model, processor = case.model()
    inputs = case.inputs(processor)
    with vlprune.attach(model, create(method, **options), positions="original") as session:
        tokens, logits = greedy(model, inputs, NEW_TOKENS)
    stages = [(stage.layer, stage.kept_indices) for stage in session.stats.stages]
    assert [stage_layer for stage_layer, _ in stages] == [layer]
    oracle_tokens, oracle_logits = greedy_under_mask(model, inputs, stages)  # five tokens: the first three compare
    oracle_tokens, oracle_logits = oracle_tokens[:, :NEW_TOKENS], oracle_logits[:NEW_TOKENS]
    assert torch.equal(tokens, oracle_tokens)
    torch.testing.assert_close(logits, oracle_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        vanilla = model(**inputs).logits[:, -1]
    assert (logits[0] - vanilla).abs().max() > 1e-3


@case_ids
def test_a_batch_equals_its_samples_alone(case: Case) -> None:
    """Each sample of a left-padded batch (of different visual-token counts where the family allows) keeps what it
    keeps alone and generates what it generates alone."""
    model, processor = case.model()
    batch = case.inputs(processor)
    counts = visual_counts(model, batch)
    assert (counts[0] != counts[1]) == case.ragged
    with vlprune.attach(model, create("fastv", keep=0.25, layer=2)) as session:
        tokens, logits = greedy(model, batch, NEW_TOKENS)
        together = session.stats
        for index in range(2):
            single_tokens, single_logits = greedy(model, case.inputs(processor, (index,)), NEW_TOKENS)
            assert session.stats.stages[0].kept_indices[0] == together.stages[0].kept_indices[index]
            assert torch.equal(single_tokens[0], tokens[index])
            torch.testing.assert_close(single_logits[:, 0], logits[:, index], atol=1e-4, rtol=0)


@case_ids
def test_cached_decoding_equals_recomputation(case: Case) -> None:
    """Each cached decoding step equals a prefill of the prompt and the tokens so far without a cache (DivPrune
    ignores the text, so both prune alike); the Qwen-VL models number their multimodal positions themselves."""
    model, processor = case.model()
    inputs = case.inputs(processor)
    names = ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw")
    images = {name: inputs[name] for name in names if name in inputs}
    visual_ids = [i for i in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if i]
    with vlprune.attach(model, create("divprune", keep=0.25)), torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=visual_ids,  # an answer holding a visual placeholder would be read as an image's token
            return_dict_in_generate=True,
            output_logits=True,
        )
        tokens, logits = out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits)
        for step in range(tokens.shape[1]):
            ids = torch.cat([inputs["input_ids"], tokens[:, :step]], dim=1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :step])], dim=1)
            if case.qwen:
                types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens[:, :step])], dim=1)
                model.model.rope_deltas = None
                extra = {"mm_token_type_ids": types}
            else:
                extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **images, **extra)
            torch.testing.assert_close(out.logits[:, -1], logits[step], atol=1e-4, rtol=0)


class FailingPruner(vlprune.pruners.Pruner):
    name = "failing-invariants-test"
    stage = vlprune.pruners.Stage.IN_LLM

    def plan(self, num_visual: int, num_layers: int) -> list:
        return [vlprune.pruners.StagePlan(layer=1, keep=4)]

    def select(self, ctx):
        raise ZeroDivisionError("scoring failed")


@case_ids
def test_detach_restores_the_model(case: Case) -> None:
    """While attached the model carries vlprune's hooks and wrappers; after detaching (also when the pruner raises
    inside a hook) none is left, the attention interface is as it was, and the model generates exactly as before."""
    model, processor = case.model()
    inputs = case.inputs(processor)
    before = greedy(model, inputs, NEW_TOKENS)  # first: transformers adds its own output-capturing hooks on first use
    interface = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    assert model_leftovers(model) == []
    session = vlprune.attach(model, create("fastv", keep=0.25, layer=2))
    assert model_leftovers(model) and ALL_ATTENTION_FUNCTIONS._local_mapping != interface
    during = greedy(model, inputs, NEW_TOKENS)
    session.detach()
    assert model_leftovers(model) == [] and ALL_ATTENTION_FUNCTIONS._local_mapping == interface
    with pytest.raises(ZeroDivisionError), vlprune.attach(model, FailingPruner()), torch.no_grad():
        model(**inputs)
    assert model_leftovers(model) == [] and ALL_ATTENTION_FUNCTIONS._local_mapping == interface
    after = greedy(model, inputs, NEW_TOKENS)
    assert not torch.equal(during[1], before[1])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


@case_ids
def test_every_method_runs_or_refuses_with_its_reason(case: Case) -> None:
    """Every registered method (VAR on top of FastV, as it is run) prunes the prompt or refuses with a VlpruneError
    naming the family (or the missing [CLS] token), exactly as ``families_of`` (``vlprune methods``) says."""
    model, processor = case.model()
    inputs = case.inputs(processor)
    total = max(visual_counts(model, inputs))
    ran, refused = [], {}
    for method in [m for m in available_methods() if m not in ("none", "var")] + ["fastv+var"]:
        pruner = create(method, keep=0.25, **TINY_OPTIONS.get(method, {}))
        try:
            with vlprune.attach(model, pruner) as session, torch.no_grad():
                model(**inputs)
        except VlpruneError as error:
            refused[method] = str(error)
            continue
        assert session.stats.equivalent_visual_tokens < total, method  # the language model saw fewer tokens
        ran.append(method)
    for method in ran:
        assert case.family in families_of(method.partition("+")[0]), method
    for method, message in refused.items():
        if "[CLS]" in message:
            assert not case.cls, (method, message)
        else:
            assert case.family not in families_of(method) and case.family in message, (method, message)
    assert {"fastv", "random", "divprune", "sparsevlm", "pyramiddrop", "adaptinfer", "fastv+var"} <= set(ran)
