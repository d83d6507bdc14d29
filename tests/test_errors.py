"""Bad input gets one clear ``VlpruneError`` that names the bad value, and leaves the model exactly as it was.

Every case goes through the public entry points (``vlprune.load((model, processor), ...)`` and the pipeline call, or
``vlprune.attach``). After each failure the model must carry exactly the forward hooks and pre-hooks it carried before
(transformers installs output-capturing forward hooks on the vision layers at the first forward, so "none" would be
wrong; none may come from vlprune), the transformers attention interface must hold what it held before, a new session
must attach, and greedy generation must give the tokens it gave before anything was tried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_model
from PIL import Image
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vlprune
from vlprune import VlpruneError
from vlprune.pruners import create
from vlprune.testing import make_test_image

NEW_TOKENS = 4


@dataclass
class Subject:
    """A model, what it is fed, and what it generated before any vlprune call."""

    model: nn.Module
    processor: Any
    inputs: dict[str, torch.Tensor]
    tokens: torch.Tensor
    image: Image.Image
    hooks: dict[str, list[Callable[..., Any]]]
    supported: bool = True
    mapping: dict[str, Any] = field(default_factory=lambda: attention_mapping())  # when the subject was built


def greedy(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, do_sample=False)


def hooks_on(model: nn.Module) -> dict[str, list[Callable[..., Any]]]:
    """The forward hooks and forward pre-hooks of every module of ``model`` that has any, by module and kind."""
    found = {}
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks"):
            if getattr(module, kind):
                found[f"{name or '<root>'}.{kind}"] = list(getattr(module, kind).values())
    return found


def vlprune_hooks(model: nn.Module) -> list[str]:
    return [
        f"{where}: {hook!r}"
        for where, hooks in hooks_on(model).items()
        for hook in hooks
        if (getattr(hook, "__module__", None) or "").startswith("vlprune")
    ]


def make_subject(model: nn.Module, processor: Any) -> Subject:
    """A fresh model's subject: it must start with no hook at all (a shared model may carry transformers' own)."""
    inputs = dict(tiny_inputs(processor, 2))
    assert hooks_on(model) == {}
    tokens = greedy(model, inputs)
    return Subject(model, processor, inputs, tokens, make_test_image(0), hooks_on(model))


def attention_mapping() -> dict[str, Any]:
    """What the transformers attention interface holds locally (where vlprune puts its observer wrapper)."""
    return dict(ALL_ATTENTION_FUNCTIONS._local_mapping)


def assert_unmodified(subject: Subject) -> None:
    model = subject.model
    assert vlprune_hooks(model) == []
    assert hooks_on(model) == subject.hooks
    mapping_after = attention_mapping()
    assert mapping_after.keys() == subject.mapping.keys()
    for name, function in subject.mapping.items():
        assert mapping_after[name] is function, f"attention function {name!r} was not restored"
    assert torch.equal(greedy(model, subject.inputs), subject.tokens)
    if not subject.supported:
        return
    # No stale "attached" state: a new session attaches, and detaching it leaves the model clean again.
    session = vlprune.attach(model, create("random", keep=8))
    assert vlprune_hooks(model), "the helper must see a session's hooks"
    session.detach()
    assert hooks_on(model) == subject.hooks


def expect_error(subject: Subject, action: Callable[[], object], *fragments: str) -> VlpruneError:
    """Run ``action``, which must raise a VlpruneError whose message contains every fragment; then check the model."""
    with pytest.raises(VlpruneError) as info:
        action()
    message = str(info.value)
    assert type(info.value) is VlpruneError
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_unmodified(subject)
    return info.value


@pytest.fixture(scope="module")
def clip() -> Subject:
    """CLIP + Llama, 4 layers, 64 visual tokens."""
    return make_subject(*tiny_model(private=True))


@pytest.fixture(scope="module")
def siglip() -> Subject:
    """SigLIP (no [CLS] token) + Llama with grouped-query attention."""
    return make_subject(*tiny_model(vision="siglip", kv_heads=2, private=True))


def run_pipeline(subject: Subject, image: Any = None, **load_options: Any) -> Callable[[], object]:
    def action() -> object:
        pipeline = vlprune.load((subject.model, subject.processor), **load_options)
        return pipeline(subject.image if image is None else image, "What is in the image?", max_new_tokens=2)

    return action


def test_baseline_is_sensitive_to_pruning(clip: Subject) -> None:
    # The generate comparison can only catch a model left pruned if pruning changes these tokens.
    with vlprune.attach(clip.model, create("fastv", keep=4, layer=1)):
        pruned = greedy(clip.model, clip.inputs)
        # ... and the mapping comparison only means something if a session does change the mapping.
        assert attention_mapping() != clip.mapping
    assert not torch.equal(pruned, clip.tokens)
    assert_unmodified(clip)


# ------------------------------------------------------------------------------------------------ method / budget


def test_unknown_method(clip: Subject) -> None:
    expect_error(clip, run_pipeline(clip, method="fastvv", keep=8), "'fastvv'", "did you mean 'fastv'", "random")


def test_unknown_option(clip: Subject) -> None:
    expect_error(clip, run_pipeline(clip, method="fastv", keep=8, seed=3), "seed", "'fastv'")


@pytest.mark.parametrize("method", ["fastv", "random", "fastervlm"])
@pytest.mark.parametrize("keep", [0, -1])
def test_keep_not_positive(clip: Subject, method: str, keep: int) -> None:
    expect_error(clip, run_pipeline(clip, method=method, keep=keep), f"keep={keep}")


@pytest.mark.parametrize("method", ["fastv", "random", "fastervlm"])
def test_keep_above_the_visual_tokens(clip: Subject, method: str) -> None:
    expect_error(clip, run_pipeline(clip, method=method, keep=65), "keep=65", "64 visual tokens")


def test_keep_above_the_visual_tokens_through_attach(clip: Subject) -> None:
    pruner = create("fastv", keep=65)
    expect_error(clip, lambda: vlprune.attach(clip.model, pruner, num_visual=64), "keep=65", "64")


def test_keep_above_the_visual_tokens_found_during_generate(clip: Subject) -> None:
    # Without num_visual the budget is only checked at the prefill, inside generate: the session must still leave the
    # model clean once it is detached.
    def action() -> None:
        with vlprune.attach(clip.model, create("fastv", keep=65)):
            greedy(clip.model, clip.inputs)

    expect_error(clip, action, "keep=65", "64")


def test_fraction_outside_unit_interval(clip: Subject) -> None:
    expect_error(clip, run_pipeline(clip, method="random", keep=1.5), "keep=1.5")


def test_budget_with_method_none(clip: Subject) -> None:
    expect_error(clip, run_pipeline(clip, method="none", keep=8), "keep=8", "'none'")


def test_missing_budget(clip: Subject) -> None:
    expect_error(clip, run_pipeline(clip, method="fastv"), "'fastv'", "keep")


# ------------------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(("layer", "valid"), [(4, "1..3"), (0, "1..3"), (-4, "1..3"), (9, "1..3")])
def test_fastv_layer_out_of_range(clip: Subject, layer: int, valid: str) -> None:
    expect_error(clip, run_pipeline(clip, method="fastv", keep=8, layer=layer), f"layer={layer}", "fastv", valid)


@pytest.mark.parametrize("layer", [4, -5])
def test_random_layer_out_of_range(clip: Subject, layer: int) -> None:
    expect_error(clip, run_pipeline(clip, method="random", keep=8, layer=layer), f"layer={layer}", "random", "0..3")


@pytest.mark.parametrize(("method", "layer"), [("fastv", 4), ("random", 4), ("fastv", 0)])
def test_layer_out_of_range_through_attach(clip: Subject, method: str, layer: int) -> None:
    pruner = create(method, keep=8, layer=layer)
    expect_error(clip, lambda: vlprune.attach(clip.model, pruner), f"layer={layer}", method)


# ------------------------------------------------------------------------------------------------ images / prompts


def test_missing_image_file(clip: Subject, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-image.png"
    expect_error(clip, run_pipeline(clip, image=missing, method="fastv", keep=8), str(missing), "does not exist")


def test_missing_image_file_given_as_str(clip: Subject, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jpg")
    expect_error(clip, run_pipeline(clip, image=missing, method="none"), missing)


def test_file_that_is_not_an_image(clip: Subject, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    expect_error(clip, run_pipeline(clip, image=text, method="random", keep=8), str(text), "not a readable image")


def test_image_of_the_wrong_type(clip: Subject) -> None:
    expect_error(clip, run_pipeline(clip, image=42, method="fastv", keep=8), "int")


def test_image_in_a_batch_that_is_missing(clip: Subject, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    make_test_image(1).save(good)
    missing = tmp_path / "missing.png"

    def action() -> object:
        pipeline = vlprune.load((clip.model, clip.processor), method="fastv", keep=8)
        return pipeline([good, missing], "What is this?", max_new_tokens=2)

    expect_error(clip, action, str(missing))


def test_prompt_without_image_token(clip: Subject) -> None:
    prompt = "USER: What is in the picture? ASSISTANT:"

    def action() -> object:
        pipeline = vlprune.load((clip.model, clip.processor), method="fastv", keep=8)
        return pipeline(clip.image, prompt=prompt, max_new_tokens=2)

    expect_error(clip, action, repr(prompt), "'<image>'")


def test_prompt_with_image_token_is_accepted(clip: Subject) -> None:
    # The counterpart of the case above: the same prompt with the token runs, so the check is on the token.
    pipeline = vlprune.load((clip.model, clip.processor), method="fastv", keep=8)
    result = pipeline(clip.image, prompt="USER: <image>\nWhat is in the picture? ASSISTANT:", max_new_tokens=2)
    assert result.stats is not None and result.stats.stages[0].visual_out == 8
    assert_unmodified(clip)


def test_question_and_prompt_both_given(clip: Subject) -> None:
    def action() -> object:
        pipeline = vlprune.load((clip.model, clip.processor), method="none")
        return pipeline(clip.image, "question", prompt="USER: <image>\nq ASSISTANT:")

    expect_error(clip, action, "question=", "prompt=")


def test_max_new_tokens_zero(clip: Subject) -> None:
    def action() -> object:
        return vlprune.load((clip.model, clip.processor), method="fastv", keep=8)(clip.image, "q", max_new_tokens=0)

    expect_error(clip, action, "max_new_tokens=0")


# ----------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def llama(clip: Subject) -> Subject:
    """A plain text-only Llama: not a supported VLM family."""
    tokenizer = clip.processor.tokenizer
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = dict(tokenizer(["What is this?", "Hello"], return_tensors="pt", padding=True))
    tokens = greedy(model, inputs)
    return Subject(model, clip.processor, inputs, tokens, clip.image, hooks_on(model), supported=False)


@pytest.mark.parametrize("method", ["none", "fastv", "random"])
def test_unsupported_model_family_through_attach(llama: Subject, method: str) -> None:
    pruner = create(method, keep=None if method == "none" else 8)
    expect_error(
        llama, lambda: vlprune.attach(llama.model, pruner), "LlamaForCausalLM", "LlavaForConditionalGeneration"
    )


def test_not_a_pruner_through_attach(clip: Subject) -> None:
    expect_error(clip, lambda: vlprune.attach(clip.model, "fastv"), "Pruner")  # type: ignore[arg-type]


def test_unknown_positions_mode_through_attach(clip: Subject) -> None:
    pruner = create("fastv", keep=8)
    expect_error(clip, lambda: vlprune.attach(clip.model, pruner, positions="shifted"), "'shifted'")


def test_unsupported_model_family_through_pipeline(llama: Subject) -> None:
    expect_error(llama, run_pipeline(llama, method="fastv", keep=8), "LlamaForCausalLM")


def test_fastervlm_on_siglip_needs_cls(siglip: Subject) -> None:
    expect_error(siglip, run_pipeline(siglip, method="fastervlm", keep=8), "[CLS]", "'fastervlm'", "siglip")
    pruner = create("fastervlm", keep=8)
    expect_error(siglip, lambda: vlprune.attach(siglip.model, pruner), "[CLS]")


def test_siglip_runs_methods_that_do_not_need_cls(siglip: Subject) -> None:
    # The refusal above is specific to the [CLS] method, not to the tower.
    result = vlprune.load((siglip.model, siglip.processor), method="fastv", keep=8)(siglip.image, "q", max_new_tokens=2)
    assert result.stats is not None and result.stats.stages[0].visual_out == 8
    assert_unmodified(siglip)


def test_vision_feature_layer_without_attention_rolls_back_the_hooks() -> None:
    # vision_feature_layer = -4 on a 3-layer tower selects the patch embeddings: fastervlm finds no attention to read
    # only after the session has started installing hooks, so this exercises the rollback in _attach.
    model, processor = tiny_model(private=True)  # its own: the test changes its config
    model.config.vision_feature_layer = -4
    subject = make_subject(model, processor)
    pruner = create("fastervlm", keep=8)
    expect_error(subject, lambda: vlprune.attach(model, pruner), "vision_feature_layer=-4")


# ------------------------------------------------------------------------------------------------ attaching twice


@pytest.mark.parametrize("second", ["attach", "pipeline"])
def test_attaching_twice(clip: Subject, second: str) -> None:
    first = vlprune.attach(clip.model, create("fastv", keep=8, layer=1))
    try:
        hooks_while_attached = hooks_on(clip.model)
        mapping_while_attached = attention_mapping()
        # Twice: a failed attempt must not release the first session's claim on the model either.
        for _ in range(2):
            with pytest.raises(VlpruneError, match="already has a vlprune session attached") as info:
                if second == "attach":
                    vlprune.attach(clip.model, create("random", keep=4))
                else:
                    run_pipeline(clip, method="random", keep=4)()
            assert type(info.value) is VlpruneError
        # The failed second session changed nothing, and the first one still works.
        assert hooks_on(clip.model) == hooks_while_attached
        assert attention_mapping() == mapping_while_attached
        assert first.attached
        pruned = greedy(clip.model, clip.inputs)
        assert first.stats is not None and first.stats.stages[0].visual_out == 8
        assert first.stats.stages[0].layer == 1
        assert not torch.equal(pruned, clip.tokens)
    finally:
        first.detach()
    assert_unmodified(clip)


def test_detach_twice_is_safe(clip: Subject) -> None:
    session = vlprune.attach(clip.model, create("fastv", keep=8))
    session.detach()
    session.detach()
    assert not session.attached
    assert_unmodified(clip)
