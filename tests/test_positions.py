"""Each method's RoPE numbering after pruning follows its reference by default; an explicit mode overrides it, and the
statistics record the mode that ran."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import vlprune
from vlprune.engine.session import resolve_positions
from vlprune.errors import VlpruneError
from vlprune.pruners import create

# What each reference does, as read from its official code (see each pruner's docstring).
REFERENCE_POSITIONS = {
    "none": "original",
    "random": "reindex",
    "fastv": "original",
    "fastervlm": "reindex",
    "divprune": "reindex",
    "holov": "reindex",
    "visionzip": "reindex",
    "flowcut": "reindex",
    "pyramiddrop": "reindex",
    "sparsevlm": "reindex",
    "vflowopt": "original",
    "zoo-prune": "reindex",
    "ptp": "original",
    "vispruner": "reindex",
    "scope": "reindex",
    "cdpruner": "reindex",
    "dart": "original",
    "mmtok": "reindex",
    "vscan": "reindex",
    "tops": "reindex",
}
# Settings that run on the tiny model (64 visual tokens, 4 decoder layers).
OPTIONS = {
    "none": {},
    "random": {"keep": 16},
    "fastv": {"keep": 16},
    "fastervlm": {"keep": 16},
    "divprune": {"keep": 16},
    "holov": {"keep": 16},
    "visionzip": {"keep": 16},
    "flowcut": {"keep": 16},
    "pyramiddrop": {"keep": 20},
    "sparsevlm": {"keep": 0.3},
    "vflowopt": {"keep": 0.25},
    "zoo-prune": {"keep": 16, "directions": 8},
    "ptp": {"keep": 16},
    "vispruner": {"keep": 16},
    "scope": {"keep": 16},
    "cdpruner": {"keep": 16},
    "dart": {"keep": 16},
    "mmtok": {"keep": 16},
    "vscan": {"keep": 16},
    "tops": {"keep": 0.3},
}


def test_every_method_declares_its_references_numbering() -> None:
    names = set(vlprune.pruners.available()) - {"adaptinfer"}  # AdaptInfer's own tests cover it
    assert names == set(REFERENCE_POSITIONS)
    for name, expected in REFERENCE_POSITIONS.items():
        assert create(name).reference_positions() == expected, name


def test_variants_whose_reference_numbers_otherwise() -> None:
    assert create("sparsevlm", version=2).reference_positions() == "original"  # SparseVLM+ keeps position ids
    assert create("random", keep=8, layer=2).reference_positions() == "original"  # in-LLM, numbered as FastV
    assert create("fastv+var", keep=8).reference_positions() == "original"


def greedy_logits(model: torch.nn.Module, inputs: dict, pruner, positions: str | None) -> tuple[torch.Tensor, str]:
    with vlprune.attach(model, pruner, positions=positions) as session, torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return torch.stack(output.logits, dim=1), session.stats.positions


@pytest.fixture(scope="module")
def model_and_inputs():
    model, processor = tiny_model()
    return model, dict(tiny_inputs(processor, 2)), processor


@pytest.mark.parametrize("name", sorted(REFERENCE_POSITIONS))
def test_a_default_attach_equals_the_references_mode_named(model_and_inputs, name: str) -> None:
    model, inputs, processor = model_and_inputs
    default, mode = greedy_logits(model, inputs, create(name, **OPTIONS[name]).use_tokenizer(processor), None)
    named_pruner = create(name, **OPTIONS[name]).use_tokenizer(processor)
    named, named_mode = greedy_logits(model, inputs, named_pruner, REFERENCE_POSITIONS[name])
    assert mode == named_mode == REFERENCE_POSITIONS[name]
    assert torch.equal(default, named)


@pytest.mark.parametrize("name", ["fastervlm", "fastv", "sparsevlm"])
def test_an_explicit_mode_overrides_the_default_and_changes_the_numbering(model_and_inputs, name: str) -> None:
    model, inputs, _ = model_and_inputs
    default, _ = greedy_logits(model, inputs, create(name, **OPTIONS[name]), None)
    other_mode = "original" if REFERENCE_POSITIONS[name] == "reindex" else "reindex"
    other, mode = greedy_logits(model, inputs, create(name, **OPTIONS[name]), other_mode)
    assert mode == other_mode
    assert not torch.allclose(default, other)  # the choice matters on a real computation


def test_the_pipeline_follows_each_method_unless_told() -> None:
    from vlprune.testing import make_test_image

    model, processor = tiny_model()
    pipeline = vlprune.load((model, processor), method="fastervlm", keep=16)
    assert pipeline.positions is None
    assert pipeline(make_test_image(0), "What?", max_new_tokens=1).stats.positions == "reindex"
    told = vlprune.load((model, processor), method="fastervlm", keep=16, positions="original")
    assert told(make_test_image(0), "What?", max_new_tokens=1).stats.positions == "original"


def test_a_bad_mode_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(VlpruneError, match=r"positions='shifted' is not valid; choose one of .*original.*reindex"):
        resolve_positions(create("fastv", keep=8), "shifted")
