"""The captured mode (vlprune.engine.captured) on the CPU: the same static path ``torch.compile`` captures as whole
graphs (``fullgraph=True``; the "eager" backend runs the captured graph as traced, so these tests check the capture
and the numbers without paying for code generation) equals the eager engine, reuses its graphs, and falls back to
the eager engine with one warning where a method cannot run with static shapes."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import QUESTIONS, private_model, tiny_model
from family_cases import hook_count

import vlprune
from vlprune.engine.captured import ANSWER_ROOM, CapturedSession
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.testing import build_tiny_inputs, make_test_image
from vlprune.testing_qwen import build_tiny_qwen_inputs

NEW_TOKENS = 5
METHODS = [
    ("fastv", {"keep": 16, "layer": 2}),
    ("fastervlm", {"keep": 16}),
    ("visionzip", {"keep": 16}),  # contextual tokens recycled before the language model, re-indexed positions
    ("sparsevlm", {"keep": 0.3}),  # three stages, rater rows, recycling by clustering
    ("flowcut", {"keep": 16}),  # prunes inside the vision encoder, which runs before the graph
]
THIRD_QUESTION = "Is there anything round in the picture, and where is it?"


@functools.cache
def batch_inputs(batch: int):
    _, processor = tiny_model("clip", 4)
    questions = [*QUESTIONS, THIRD_QUESTION][:batch]  # different lengths: the shorter prompts are left-padded
    images = [make_test_image(seed) for seed in range(batch)]
    return build_tiny_inputs(processor, images, questions)


def eager_generate(model, pruner, inputs):
    with vlprune.attach(model, pruner) as session:
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    return out.sequences, torch.stack(out.logits), session.stats


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method,options", METHODS)
def test_captured_generation_equals_the_eager_engine(method: str, options: dict, batch: int) -> None:
    model, _ = tiny_model("clip", 4)
    inputs = batch_inputs(batch)
    sequences, logits, stats = eager_generate(model, create(method, **options), inputs)
    with CapturedSession(model, create(method, **options), backend="eager") as session:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback warning: it ran captured
            captured, captured_logits = session.generate(**inputs, max_new_tokens=NEW_TOKENS, return_logits=True)
        decoded = captured.shape[1] - inputs["input_ids"].shape[1] > 1
        assert session.fallback_reason is None and session.compilations == 1 + decoded  # prefill, decode step
    assert torch.equal(captured, sequences)
    torch.testing.assert_close(captured_logits, logits, atol=1e-5, rtol=0)
    assert [s.kept_indices for s in session.stats.stages] == [s.kept_indices for s in stats.stages]
    assert session.stats.visual_tokens_per_layer == stats.visual_tokens_per_layer
    assert session.stats.prefill_flops == stats.prefill_flops
    # The static cache holds the bucket's padding too: each layer's length exceeds the eager one by the same amount.
    extra = {c - e for c, e in zip(session.stats.kv_cache_lengths, stats.kv_cache_lengths, strict=True)}
    length = inputs["input_ids"].shape[1]
    assert len(extra) == 1 and extra.pop() == session.bucket_for(length) - length


MORE_METHODS = [
    ("random", {"keep": 16, "layer": 2}),  # its scores, drawn on the host from its seed
    ("zoo-prune", {"keep": 16, "directions": 8}),  # its random directions, drawn on the host
    ("holov", {"keep": 16}),  # its crops' members and sizes, built on the host
    ("ptp", {"keep": 16}),  # its regions, from the token grid's extent (VisualGeometry.extents)
    ("adaptinfer", {"keep": 16, "layers": [1, 2, 3]}),  # three stages
]


@pytest.mark.parametrize("method,options", MORE_METHODS)
def test_more_methods_run_captured_at_batch_3(method: str, options: dict) -> None:
    """The methods beyond the five above, at batch 3. What some of them build from shapes and seeds alone is built
    on the host (in a key's first, eager, call, or with the geometry), and the graph only reads it."""
    model, _ = tiny_model("clip", 4)
    inputs = batch_inputs(3)
    sequences, logits, stats = eager_generate(model, create(method, **options), inputs)
    with CapturedSession(model, create(method, **options), backend="eager") as session:
        captured, captured_logits = session.generate(**inputs, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert session.fallback_reason is None and session.compilations == 2
    assert torch.equal(captured, sequences)
    torch.testing.assert_close(captured_logits, logits, atol=1e-5, rtol=0)
    assert [s.kept_indices for s in session.stats.stages] == [s.kept_indices for s in stats.stages]


def test_the_same_key_reuses_its_graphs_and_a_new_bucket_or_batch_compiles_new_ones() -> None:
    model, processor = tiny_model("clip", 4)
    one, three = batch_inputs(1), batch_inputs(3)
    short = one["input_ids"].shape[1]
    with CapturedSession(model, create("fastv", keep=16, layer=2), backend="eager", buckets=(short, 2 * short)) as s:
        first = s.generate(**one, max_new_tokens=3)
        assert s.compilations == 2
        again = s.generate(**one, max_new_tokens=3)
        assert s.compilations == 2 and torch.equal(first, again)
        # A shorter prompt of the same bucket: the graphs hold no shape or count of the prompt's own text.
        other = build_tiny_inputs(processor, [make_test_image(5)], ["What is it?"])
        assert s.generate(**other, max_new_tokens=3).shape[1] == other["input_ids"].shape[1] + 3
        assert s.compilations == 2
        s.generate(**three, max_new_tokens=3)  # three prompts, the longest past the first bucket: new caches
        assert s.compilations == 4 and len(s.capture_seconds) == 2
    assert {key.bucket for key in s.capture_seconds} == {short, 2 * short}
    assert {key.answer_room for key in s.capture_seconds} == {ANSWER_ROOM}


def test_a_count_the_data_decides_runs_eagerly_with_one_warning() -> None:
    model, _ = tiny_model("clip", 4, layers=6)  # the rank rule's four stages need six layers
    inputs = batch_inputs(1)
    method = {"keep": 64, "rule": "rank"}  # the first version's count per stage, from the rank of the attention
    sequences, _, _ = eager_generate(model, create("sparsevlm", **method), inputs)
    with CapturedSession(model, create("sparsevlm", **method), backend="eager") as session:
        with pytest.warns(UserWarning, match="sparsevlm runs eagerly, not captured: a stage keeps a number of tokens"):
            first = session.generate(**inputs, max_new_tokens=NEW_TOKENS)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # once per reason
            session.generate(**inputs, max_new_tokens=NEW_TOKENS)
        assert session.compilations == 0
    assert torch.equal(first, sequences)


def test_code_that_cannot_be_captured_falls_back_with_the_reason() -> None:
    """VisionZip's LLaVA-NeXT path shares its budget among views in a host loop over the data: tracing it fails,
    and the session runs the method eagerly, with the same answer as the eager engine."""
    from test_anyres_engine import anyres_inputs, anyres_model

    model, processor = anyres_model("llava-next")
    inputs = anyres_inputs(processor, 1)
    sequences, _, _ = eager_generate(model, create("visionzip", keep=0.25), inputs)
    session = CapturedSession(model, create("visionzip", keep=0.25), backend="eager")
    with session, pytest.warns(UserWarning, match="visionzip runs eagerly, not captured: its code cannot be captured"):
        output = session.generate(**inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(output, sequences) and session.fallback_reason.startswith("its code cannot be captured")


OTHER_FAMILIES = [
    ("qwen2.5-vl", "visionzip", {"keep": 0.25}),
    ("qwen3-vl", "fastv", {"keep": 0.25, "layer": 1}),  # a stage before the last DeepStack plane (after layer 1)
    ("llava-onevision", "sparsevlm", {"keep": 0.25}),
]


@pytest.mark.parametrize("family,method,options", OTHER_FAMILIES)
def test_other_families_run_captured(family: str, method: str, options: dict) -> None:
    """Qwen-VL's multimodal positions (decoding continues one past the prompt's largest (t, h, w) position) and a
    chunked tower's reads assembled before the graph; Qwen3-VL's DeepStack planes added to the kept tokens' rows
    (a plane added to the wrong tokens changes the logits); OneVision's tiles."""
    if family.startswith("qwen"):
        from test_qwen_engine import qwen_inputs, qwen_model

        model, processor = qwen_model(family)
        inputs = qwen_inputs(processor, 2, sizes=((48, 32), (48, 32)))  # one size: the same count per sample
        build = build_tiny_qwen_inputs
    else:
        from test_anyres_engine import anyres_inputs, anyres_model

        model, processor = anyres_model(family)
        inputs = anyres_inputs(processor, 2)
        build = build_tiny_inputs
    sequences, logits, _ = eager_generate(model, create(method, **options), inputs)
    with CapturedSession(model, create(method, **options), backend="eager") as session:
        captured, captured_logits = session.generate(**inputs, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert session.fallback_reason is None and session.compilations == 2
        # The questions swapped between the samples: each prompt's own counts differ, the key and graphs do not.
        images = [
            make_test_image(seed, 96).resize((48, 32) if family.startswith("qwen") else (40, 30)) for seed in (0, 1)
        ]
        session.generate(**build(processor, images, [QUESTIONS[1], QUESTIONS[0]]), max_new_tokens=NEW_TOKENS)
        assert session.compilations == 2
    assert torch.equal(captured, sequences)
    torch.testing.assert_close(captured_logits, logits, atol=1e-5, rtol=0)


RECYCLING_ON_QWEN3 = [
    # One merged token recycled per stage; the first stage (layer 1) comes before DeepStack's second plane, which
    # must skip the recycled token (it has no original token, hence no plane row).
    ("sparsevlm", {"keep": 0.25}),
    # On Qwen-VL its contextual tokens take their centres' places, positions and plane rows (no separate tokens).
    ("visionzip", {"keep": 0.25}),
]


@pytest.mark.parametrize("method,options", RECYCLING_ON_QWEN3)
def test_captured_equals_eager_in_logits_where_tokens_are_recycled_on_qwen3_vl(method: str, options: dict) -> None:
    """Captured equals eager in the logits, not only in the tokens, for merged tokens under DeepStack: giving the
    recycled token the plane row of its sample's first visual token moves the logits by 2.2e-2 (in float32 and in
    float64 alike) and leaves every greedy token as it was.

    Why float64 and 1e-6: in float32 the clean gap is 6e-6 with no pruning at all and 1.2e-5 to 1.4e-5 with these
    methods (2.2e-5 in the issue that asked for this test), above the 1e-5 of the tests above. In float64 it is
    1.2e-7 with no pruning and with both methods alike: the rounding of the float32 copy of the logits that
    transformers' ``generate`` returns. So the two engines compute the same thing, and the float32 gap is
    reassociation, not a difference in what any token receives: the captured prefill runs the prompt left-padded to
    its bucket and attends over static caches longer than the prompt, so its matmuls and softmaxes sum in another
    order, and the tiny model's sharp layers (weight_scale 8) grow those differences."""
    from test_qwen_engine import qwen_inputs

    model, processor = private_model("qwen3-vl")  # its own: it runs in float64
    model = model.to(torch.float64)
    inputs = qwen_inputs(processor, 2, sizes=((48, 32), (48, 32)))  # one size: the same count per sample
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    sequences, logits, stats = eager_generate(model, create(method, **options), inputs)
    with CapturedSession(model, create(method, **options), backend="eager") as session:
        captured, captured_logits = session.generate(**inputs, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert session.fallback_reason is None and session.compilations == 2
    if method == "sparsevlm":
        assert stats.stages[0].layer == 1 and all(stage.recycled > 0 for stage in stats.stages)
    assert torch.equal(captured, sequences)
    assert [s.kept_indices for s in session.stats.stages] == [s.kept_indices for s in stats.stages]
    torch.testing.assert_close(captured_logits.double(), logits.double(), atol=1e-6, rtol=0)


def test_a_ragged_batch_runs_eagerly_with_the_reason() -> None:
    from test_qwen_engine import qwen_inputs, qwen_model

    model, processor = qwen_model("qwen2-vl")
    inputs = qwen_inputs(processor, 2)  # two image sizes
    session = CapturedSession(model, create("fastv", keep=0.25), backend="eager")
    with session, pytest.warns(UserWarning, match="different numbers of visual tokens"):
        session.generate(**inputs, max_new_tokens=2)


def test_detach_restores_the_model_and_bad_buckets_are_refused() -> None:
    model, _ = tiny_model("clip", 4)
    with torch.no_grad():
        model(**batch_inputs(1))  # transformers installs its own output-recording hooks at the first call
    before = hook_count(model)
    with CapturedSession(model, create("fastv", keep=16, layer=2), backend="eager") as session:
        session.generate(**batch_inputs(1), max_new_tokens=2)
    assert hook_count(model) == before
    with pytest.raises(VlpruneError, match="buckets"):
        CapturedSession(model, create("fastv", keep=16), buckets=(0, 64))
    assert hook_count(model) == before
    session = CapturedSession(model, create("fastv", keep=16), backend="eager")
    with session, pytest.raises(VlpruneError, match="max_new_tokens"):
        session.generate(**batch_inputs(1), max_new_tokens=0)
