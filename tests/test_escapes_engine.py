"""Bad inputs that used to escape in the engine (issue 24), in the form a user meets them: a OneVision video refused
with one line instead of passing unpruned, ``var`` with a budget, a ragged batch's budget naming its sample, a second
attach on a model a compiled Pipeline holds, and the captured fallback warning attributed to the user's call."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import shared_model

import vlprune
from vlprune.engine.captured import CapturedSession
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.testing import build_tiny_inputs, make_test_image
from vlprune.testing_anyres import VIDEO_TOKEN, VIEW_SIZE

VIDEO_REFUSAL = "vlprune does not prune the videos of llava-onevision"


def onevision_with_videos():
    return shared_model("llava-onevision", videos=True)


def llava_next():
    return shared_model("llava-next")


def llava(layers: int = 4):
    return shared_model("llava", num_hidden_layers=layers)


def greedy(model, inputs, new_tokens: int = 2) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)


# ------------------------------------------------------------------------------------------------ OneVision videos


def onevision_inputs(image: bool, video: bool):
    """One prompt with an image, a two-frame video, or both (the tiny chat template has no video slot)."""
    _, processor = onevision_with_videos()
    placeholders = ("<image>" if image else "") + (VIDEO_TOKEN if video else "")
    media = {}
    if image:
        media["images"] = [make_test_image(0, 96).resize((40, 30))]
    if video:
        frames = [np.asarray(make_test_image(seed, VIEW_SIZE).convert("RGB")) for seed in range(2)]
        media["videos"] = [np.stack(frames)]
    return processor(text=[f"USER: {placeholders}\nWhat is shown? ASSISTANT:"], return_tensors="pt", **media)


@pytest.mark.parametrize("image", [True, False], ids=["image-and-video", "video-alone"])
def test_a_onevision_video_is_refused_in_one_line_not_passed_unpruned(image: bool) -> None:
    model, _ = onevision_with_videos()
    inputs = onevision_inputs(image=image, video=True)
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) > 0
    with vlprune.attach(model, create("fastv", keep=16, layer=2)) as session:
        with pytest.raises(VlpruneError, match=VIDEO_REFUSAL) as info:
            greedy(model, inputs)
        assert "\n" not in str(info.value) and "Qwen-VL" in str(info.value)
        assert session.stats is None  # nothing was half-pruned
        # The model's own forward (pixel_values_videos, not generate's pre-encoded features) is refused alike.
        with pytest.raises(VlpruneError, match=VIDEO_REFUSAL):
            model(**inputs)
        # The session still prunes an image-only prompt afterwards.
        greedy(model, onevision_inputs(image=True, video=False))
    assert session.stats.visual_tokens_per_sample == [145] and session.stats.stages[0].visual_out_per_sample == [16]


# ------------------------------------------------------------------------------------------------ var with a budget


def test_var_with_a_budget_says_it_prunes_nothing_and_how_to_compose_it() -> None:
    model, _ = llava()
    with pytest.raises(VlpruneError) as info:
        vlprune.attach(model, create("var", keep=64))
    message = str(info.value)
    assert message.startswith("method 'var' modifies attention and prunes nothing, so keep=64 does not apply to it")
    assert "'fastv+var'" in message and "METHOD+var" in message and "unpruned model" in message
    assert "'none'" not in message
    # What `var` alone is: the unpruned plan with VAR's attention redistribution attached.
    alone = create("var")
    assert alone.plan(576, 32) == [] and alone.modifier.name == "var"
    with pytest.raises(VlpruneError, match="method 'none' keeps all 576 visual tokens; keep=64"):
        create("none", keep=64).plan(576, 32)


# ------------------------------------------------------------------------------------------------ ragged budgets


def ragged_next_batch():
    """Three samples of 161, 161 and 154 visual tokens: the smallest is the last one."""
    model, processor = llava_next()
    sizes = [(30, 60), (30, 60), (40, 20)]
    images = [make_test_image(seed, 96).resize(size) for seed, size in enumerate(sizes)]
    inputs = build_tiny_inputs(processor, images, ["What?", "Which colour?", "Where is it?"])
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [161, 161, 154]
    return model, inputs


@pytest.mark.parametrize("method,options", [("random", {}), ("fastv", {"layer": 2})])
def test_a_ragged_batch_budget_error_names_the_sample_and_its_count(method: str, options: dict) -> None:
    model, inputs = ragged_next_batch()
    with vlprune.attach(model, create(method, keep=158, **options)), pytest.raises(VlpruneError) as info:
        greedy(model, inputs, new_tokens=1)
    assert str(info.value).startswith(
        "keep=158 is outside [1, 154] for sample 2 of the batch, which has 154 visual tokens (the samples have "
        "161, 161, 154"
    )
    assert "per sample" not in str(info.value) and type(info.value) is VlpruneError


def test_a_ragged_batch_budget_in_the_vision_tower_names_the_image() -> None:
    model, inputs = ragged_next_batch()
    with vlprune.attach(model, create("flowcut", keep=158)), pytest.raises(VlpruneError) as info:
        greedy(model, inputs, new_tokens=1)
    assert str(info.value).startswith("keep=158 is outside [1, 154] for image 2 of the batch, which has 154 visual")
    assert type(info.value) is VlpruneError


def test_a_uniform_batch_keeps_the_per_sample_message() -> None:
    model, processor = llava_next()
    images = [make_test_image(seed, 96).resize((40, 20)) for seed in range(2)]
    inputs = build_tiny_inputs(processor, images, ["What?", "Which colour?"])
    with vlprune.attach(model, create("random", keep=158)), pytest.raises(VlpruneError) as info:
        greedy(model, inputs, new_tokens=1)
    assert str(info.value) == "keep=158 is outside [1, 154]: the model has 154 visual tokens per sample"


# ------------------------------------------------------------------------------------------------ a held model


def test_a_model_held_by_a_compiled_pipeline_names_pipeline_close() -> None:
    model, processor = llava()
    pipe = vlprune.load((model, processor), method="fastv", keep=8, layer=2, compile=True)
    with pipe:
        pipe.captured_session()  # what the first call attaches, and keeps until close()
        with pytest.raises(VlpruneError, match=r"Pipeline\.close\(\)") as info:
            vlprune.attach(model, create("random", keep=4))
        assert "`with pipeline:`" in str(info.value) and "already has a vlprune session attached" in str(info.value)
        second = vlprune.load((model, processor), method="random", keep=4)
        with pytest.raises(VlpruneError, match=r"Pipeline\.close\(\)"):
            second(make_test_image(0), "What color is the square?", max_new_tokens=1)
    # Leaving the block released the model: the second pipeline now runs.
    assert second(make_test_image(0), "What color is the square?", max_new_tokens=1).stats.stages[0].visual_out == 4


def test_an_eagerly_attached_model_says_detach() -> None:
    model, _ = llava()
    with vlprune.attach(model, create("fastv", keep=8, layer=2)) as first:
        with pytest.raises(VlpruneError, match=r"detach it first \(session\.detach\(\)") as info:
            vlprune.attach(model, create("random", keep=4))
        assert "Pipeline" not in str(info.value)
        assert first.attached
    with vlprune.attach(model, create("random", keep=4)):  # released by the first session's block
        pass


# ------------------------------------------------------------------------------------------------ fallback warning


def fallback_warnings(run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if "runs eagerly, not captured" in str(w.message)]


def test_the_captured_fallback_warning_points_at_the_users_call_not_torch() -> None:
    model, processor = llava(layers=6)  # SparseVLM's rank rule prunes after layers scaled from 2, 6, 15 and 19
    inputs = build_tiny_inputs(processor, [make_test_image(0)], ["What color is the square?"])
    # SparseVLM's rank rule lets the data decide each stage's count: it cannot run with static shapes.
    with CapturedSession(model, create("sparsevlm", keep=64, rule="rank"), backend="eager") as session:
        caught = fallback_warnings(lambda: session.generate(**inputs, max_new_tokens=1))
    assert len(caught) == 1
    torch_dir = os.path.dirname(torch.__file__)
    assert not caught[0].filename.startswith(torch_dir) and caught[0].filename == __file__


def test_the_fallback_warning_of_a_compiled_pipeline_points_at_the_users_call() -> None:
    model, processor = llava(layers=6)
    with vlprune.load((model, processor), method="sparsevlm", keep=64, rule="rank", compile=True) as pipe:
        caught = fallback_warnings(lambda: pipe(make_test_image(0), "What color is the square?", max_new_tokens=1))
    assert len(caught) == 1 and caught[0].filename == __file__
