"""The tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL builders (vlprune.testing_qwen): processors that expand the vision
placeholders to size-dependent token counts, left-padded batches of differently sized images (and videos) that run
through a forward pass and greedy generation, Qwen2.5-VL's windowed encoder and Qwen3-VL's DeepStack."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_model

from vlprune.testing import make_test_image
from vlprune.testing_qwen import (
    DEEPSTACK_VISUAL_INDEXES,
    FULLATT_BLOCK_INDEXES,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
    build_tiny_qwen_inputs,
)

BUILDERS = {"qwen2-vl": build_tiny_qwen2_vl, "qwen2.5-vl": build_tiny_qwen2_5_vl, "qwen3-vl": build_tiny_qwen3_vl}
FAMILIES = list(BUILDERS)
QUESTIONS = ("What colour is the square?", "How many red objects are on the left?")
EXPECTED_IMAGE_TOKENS = [16, 24]
"""32 x 32 pixels: 8 x 8 patches, 4 x 4 merged tokens; 48 wide x 32 high: 8 x 12 patches, 4 x 6 tokens."""


def qwen_model(family: str, attn: str = "sdpa"):
    """The shared, cached tiny model of ``family`` (conftest's factory): use it as it is."""
    return shared_model(family, attn_implementation=attn)


def two_images():
    return [make_test_image(0, 32), make_test_image(1, 48).resize((48, 32))]


def frames(count: int = 4, size: int = 32):
    return [make_test_image(10 + seed, size) for seed in range(count)]


def count(inputs, token_id: int) -> list[int]:
    return (inputs["input_ids"] == token_id).sum(1).tolist()


def window_index(visual, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(window_index, cu_window_seqlens)`` of the vision tower: the window permutation of the merged tokens and
    the window boundaries in patches (the tower's ``get_window_index`` in older transformers, a function of
    ``transformers.vision_utils`` in 5.24)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_match_tokenizer_processor_and_config(family):
    model, processor = qwen_model(family)
    tokenizer = processor.tokenizer
    config = model.config
    assert config.image_token_id == processor.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert config.video_token_id == processor.video_token_id == tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids(VISION_START)
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids(VISION_END)
    assert (
        len({config.image_token_id, config.video_token_id, config.vision_start_token_id, tokenizer.unk_token_id}) == 4
    )
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    section = text.rope_parameters["mrope_section"]
    assert sum(section) * 2 == model.model.language_model.layers[0].self_attn.head_dim


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_image_sizes_runs_forward_and_generate(family):
    model, processor = qwen_model(family)
    inputs = build_tiny_qwen_inputs(processor, two_images(), list(QUESTIONS))
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    assert count(inputs, image_id) == EXPECTED_IMAGE_TOKENS
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 12]]
    assert torch.equal(inputs["mm_token_type_ids"] == 1, ids == image_id)
    # The shorter first prompt is left-padded, and each image span is framed by the vision start and end tokens.
    assert inputs["attention_mask"][0, 0] == 0 and bool(inputs["attention_mask"][:, -1].all())
    for row in ids:
        positions = (row == image_id).nonzero().flatten()
        assert row[positions[0] - 1] == model.config.vision_start_token_id
        assert row[positions[-1] + 1] == model.config.vision_end_token_id
        assert positions[-1] - positions[0] + 1 == len(positions)

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, ids.shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()

    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 3)
    assert torch.equal(generated[:, : ids.shape[1]], ids)
    # generate's (text row + 3 M-RoPE rows) positions give the same first token as the plain forward's M-RoPE rows.
    assert torch.equal(generated[:, ids.shape[1]], logits[:, -1].argmax(-1))


def test_qwen2_5_vision_tower_is_windowed_with_one_full_attention_block():
    model, processor = qwen_model("qwen2.5-vl")
    visual = model.model.visual
    assert len(visual.blocks) == 3
    assert list(visual.fullatt_block_indexes) == list(FULLATT_BLOCK_INDEXES) == [2]
    inputs = build_tiny_qwen_inputs(processor, two_images(), list(QUESTIONS))
    for grid, windows in zip(inputs["image_grid_thw"], (4, 6), strict=True):
        index, cu_window_seqlens = window_index(visual, grid[None])
        tokens = int(grid.prod()) // visual.spatial_merge_size**2
        assert sorted(index.tolist()) == list(range(tokens))
        assert not torch.equal(index, torch.arange(tokens))
        # 2 x 2 merged tokens (4 x 4 patches) per window.
        assert len(cu_window_seqlens) - 1 == windows
        assert torch.diff(cu_window_seqlens).tolist() == [16] * windows


def test_qwen3_has_two_deepstack_layers_feeding_the_language_model():
    model, processor = qwen_model("qwen3-vl")
    visual = model.model.visual
    assert list(visual.deepstack_visual_indexes) == list(DEEPSTACK_VISUAL_INDEXES) == [0, 1]
    assert len(visual.deepstack_merger_list) == 2
    inputs = build_tiny_qwen_inputs(processor, two_images(), list(QUESTIONS))
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    assert len(features.deepstack_features) == 2
    for layer_features in features.deepstack_features:
        if isinstance(layer_features, torch.Tensor):  # transformers < 5.24: the images' tokens in one tensor
            assert layer_features.shape == (sum(EXPECTED_IMAGE_TOKENS), 64)
        else:
            assert [chunk.shape for chunk in layer_features] == [(n, 64) for n in EXPECTED_IMAGE_TOKENS]


def test_qwen3_query_key_norms_are_sharpened():
    sharp, _ = qwen_model("qwen3-vl")
    flat, _ = build_tiny_qwen3_vl(weight_scale=1.0)
    attention = sharp.model.language_model.layers[0].self_attn
    reference = flat.model.language_model.layers[0].self_attn
    torch.testing.assert_close(attention.q_norm.weight, reference.q_norm.weight * 8.0**0.5)
    torch.testing.assert_close(attention.k_norm.weight, reference.k_norm.weight * 8.0**0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_and_video_samples_in_one_batch(family):
    model, processor = qwen_model(family)
    video = np.stack([np.asarray(frame) for frame in frames(3)]) if family == "qwen2-vl" else frames(4)
    inputs = build_tiny_qwen_inputs(processor, [make_test_image(0, 32)], list(QUESTIONS), videos=[video])
    # 3 or 4 frames of 32 x 32: 2 temporal patches (the third frame is repeated) of 16 tokens.
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert count(inputs, model.config.image_token_id) == [16, 0]
    assert count(inputs, model.config.video_token_id) == [0, 32]
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == model.config.video_token_id)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))


def test_builders_are_seeded_and_eager_matches_sdpa():
    model, processor = qwen_model("qwen2-vl")
    eager, _ = qwen_model("qwen2-vl", "eager")
    other, _ = build_tiny_qwen2_vl(seed=1)
    assert eager.config.text_config._attn_implementation == "eager"
    state, eager_state = model.state_dict(), eager.state_dict()
    assert all(torch.equal(state[name], eager_state[name]) for name in state)
    assert not torch.equal(state["lm_head.weight"], other.state_dict()["lm_head.weight"])
    inputs = build_tiny_qwen_inputs(processor, two_images(), list(QUESTIONS))
    with torch.no_grad():
        eager_logits, sdpa_logits = eager(**inputs).logits, model(**inputs).logits
    # Padding positions attend to nothing, which the two implementations resolve differently: compare the real ones.
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager_logits[real], sdpa_logits[real], rtol=1e-4, atol=1e-4)


def test_inputs_need_one_question_per_sample():
    _, processor = qwen_model("qwen2-vl")
    with pytest.raises(ValueError, match="one question per image and video"):
        build_tiny_qwen_inputs(processor, two_images(), ["Only one?"])
    with pytest.raises(ValueError, match="one question per image and video"):
        build_tiny_qwen_inputs(processor, [], [])
    with pytest.raises(ValueError, match="attn_implementation"):
        build_tiny_qwen2_vl(attn_implementation="flash")
