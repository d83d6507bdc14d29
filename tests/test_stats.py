"""Statistics against hand computations: token counts, FLOPs, KV-cache lengths and bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import vlprune
from vlprune.adapters import LanguageModelShape
from vlprune.engine.stats import layer_counts, layer_flops, stage_stats, view_counts
from vlprune.geometry import BASE, NEWLINE

# The tiny Llama of vlprune.testing: hidden 64, 4 heads of 16, 2 KV heads, SwiGLU intermediate 128, 4 layers.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 4


def hand_layer_flops(n: int) -> int:
    q_and_o = 2 * (2 * n * HIDDEN * HEADS * HEAD_DIM)
    k_and_v = 2 * (2 * n * HIDDEN * KV_HEADS * HEAD_DIM)
    scores_and_mix = 2 * (2 * n * n * HEADS * HEAD_DIM)
    swiglu = 3 * (2 * n * HIDDEN * FFN)
    return q_and_o + k_and_v + scores_and_mix + swiglu


def test_layer_flops_matches_the_hand_formula() -> None:
    shape = LanguageModelShape(LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, gated_mlp=True)
    for n in (1, 17, 100):
        assert layer_flops(n, shape) == hand_layer_flops(n)
    ungated = LanguageModelShape(LAYERS, HIDDEN, HEADS, HEADS, HEAD_DIM, FFN, gated_mlp=False)
    n = 10
    assert layer_flops(n, ungated) == 4 * 2 * n * HIDDEN * HIDDEN + 4 * n * n * HIDDEN + 2 * 2 * n * HIDDEN * FFN


def test_view_counts_sort_kept_tokens_by_their_view_and_count_recycled_ones() -> None:
    views = [BASE, BASE, 1, 2, NEWLINE]  # two base-view tokens, two tile tokens, a line break
    assert view_counts(views, [0, 2, 3, 4, -1], 2) == {"base": 1, "tiles": 2, "newlines": 1, "recycled": 3}
    assert view_counts(views, [], 0) == {"base": 0, "tiles": 0, "newlines": 0, "recycled": 0}


def test_stage_stats_report_the_largest_sample_and_drop_recycled_origins() -> None:
    views = [[BASE] * 4, [BASE] * 4]
    stats = stage_stats(2, [4, 3], [[0, 3, -1], [1, -1, -1]], [1, 0], [4, 3], views)
    assert (stats.layer, stats.visual_in, stats.visual_out, stats.recycled) == (2, 4, 4, 1)
    assert stats.kept_indices == [[0, 3], [1]]
    assert [v["recycled"] for v in stats.views_out] == [2, 2]
    assert stats.visual_in_per_sample == [4, 3] and stats.visual_out_per_sample == [4, 3]


def test_layer_counts_follow_the_stages_drops() -> None:
    stages = [stage_stats(1, [8, 8], [[0, 1, 2]] * 2, [0, 0], [3, 3], [[BASE] * 8] * 2)]
    stages.append(stage_stats(3, [3, 3], [[0], [1]], [1, 0], [2, 1], [[BASE] * 8] * 2))
    real, visual = layer_counts([None, 0, 0, 1], [[5, 5], [6, 7]], stages, [12, 10], [8, 8])
    assert real == [[12, 10], [7, 5], [7, 5], [6, 3]]
    assert visual == [8, 3, 3, 1.5]  # the samples' mean once they differ


@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_statistics(batch: int) -> None:
    model, processor = tiny_model("dinov2", KV_HEADS)
    inputs = tiny_inputs(processor, batch)
    real = inputs["attention_mask"].sum(1).tolist()  # real tokens per sample
    length = inputs["input_ids"].shape[1]
    with vlprune.attach(model, vlprune.pruners.create("fastv", keep=16, layer=2)) as session:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    stats = session.stats
    assert stats.batch_size == batch and stats.visual_tokens == 64
    (stage,) = stats.stages
    assert (stage.layer, stage.visual_in, stage.visual_out, stage.recycled) == (2, 64, 16, 0)
    assert len(stage.kept_indices) == batch and all(len(k) == 16 for k in stage.kept_indices)
    assert stats.visual_tokens_per_layer == [64, 64, 16, 16]
    assert stats.equivalent_visual_tokens == pytest.approx((64 * 2 + 16 * 2) / 4)
    expected = sum(2 * hand_layer_flops(n) + 2 * hand_layer_flops(n - 48) for n in real)
    unpruned = sum(4 * hand_layer_flops(n) for n in real)
    assert stats.prefill_flops == expected and stats.unpruned_prefill_flops == unpruned
    assert stats.flops_ratio == pytest.approx(expected / unpruned)
    # The cache keeps padding slots: after prefill layers 0-1 hold the whole prompt, layers 2-3 48 tokens fewer.
    assert stats.kv_cache_lengths == [length, length, length - 48, length - 48]
    bytes_per_token = 2 * batch * KV_HEADS * HEAD_DIM * torch.tensor([], dtype=torch.float32).element_size()
    assert stats.kv_cache_bytes == bytes_per_token * (2 * length + 2 * (length - 48))
    assert stats.prefill_seconds > 0


def test_pre_llm_statistics_and_history() -> None:
    model, processor = tiny_model("clip", KV_HEADS)
    inputs = tiny_inputs(processor, 1)
    length = inputs["input_ids"].shape[1]
    with vlprune.attach(model, vlprune.pruners.create("fastervlm", keep=0.125)) as session:
        model(**inputs)
        model(**inputs)
    assert len(session.history) == 2
    stats = session.stats
    assert stats.stages[0].visual_out == 8 and stats.visual_tokens_per_layer == [8] * LAYERS
    assert stats.kv_cache_lengths == [length - 56] * LAYERS
    assert stats.flops_ratio == pytest.approx(hand_layer_flops(length - 56) / hand_layer_flops(length))


def test_keep_all_statistics() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create("none")) as session:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert session.stats.flops_ratio == 1.0 and session.stats.stages == []
    assert session.stats.kv_cache_lengths == [inputs["input_ids"].shape[1]] * LAYERS
