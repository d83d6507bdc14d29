"""VScan: the scans against loop re-implementations of the reference functions, the merge, the plan, the engine's
early-layer read, and end-to-end runs on the tiny LLaVA, LLaVA-NeXT and Qwen2.5-VL models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, tiny_inputs, tiny_model
from family_cases import CASE, greedy, ragged_alone_run

import vlprune
from vlprune.adapters import adapter_for
from vlprune.engine.vision_bridge import early_vision_layer
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import create
from vlprune.pruners.vscan import (
    VScan,
    local_global_llava,
    local_walk_qwen,
    merge_into_kept,
    qwen_windows,
    window_of_llava,
)


def reference_window_cls(attn: torch.Tensor, visual_token_num: int, window_size: int = 6) -> list[int]:
    """``window_cls_selection`` for one sample, written out."""
    grid = attn.view(24, 24)
    k = visual_token_num // 16
    out = []
    for i in range(4):
        for j in range(4):
            window = grid[i * window_size : (i + 1) * window_size, j * window_size : (j + 1) * window_size]
            for idx in torch.topk(window.reshape(-1), k).indices.tolist():
                dy, dx = divmod(idx, window_size)
                out.append((i * window_size + dy) * 24 + j * window_size + dx)
    return out


def reference_encode(shallow: torch.Tensor, deep: torch.Tensor, t: int) -> list[int]:
    local = reference_window_cls(shallow, int(t * 0.5))
    deep = deep.clone()
    deep[local] = 0
    global_ = torch.topk(deep, t - int(t * 0.5)).indices.tolist()
    return sorted(set(local + global_))


@pytest.mark.parametrize("t", [64, 96, 192])
def test_llava_scans_match_the_reference_loops(t: int) -> None:
    torch.manual_seed(0)
    shallow, deep = torch.rand(3, 576), torch.rand(3, 576)
    index = torch.arange(576)
    windows = window_of_llava(index // 24, index % 24, 24, 24)
    kept = local_global_llava(shallow, deep, windows, t)
    for b in range(3):
        assert kept[b].tolist() == reference_encode(shallow[b], deep[b], t)
        assert kept.shape == (3, t)


def test_windows_are_six_by_six_on_24() -> None:
    index = torch.arange(576)
    windows = window_of_llava(index // 24, index % 24, 24, 24)
    assert windows.view(24, 24)[:6, :6].unique().tolist() == [0]
    assert windows.view(24, 24)[18:, 6:12].unique().tolist() == [13]


def test_merge_averages_each_kept_token_with_its_nearest_pruned() -> None:
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.1, 0.9]]])
    merged = merge_into_kept(features, torch.tensor([[0, 1]]))
    assert torch.allclose(merged[0, 0], (features[0, 0] + features[0, 2]) / 2)
    assert torch.allclose(merged[0, 1], (features[0, 1] + features[0, 3] + features[0, 4]) / 3)


def reference_window_selection(attn: torch.Tensor, num_keep: int, h: int, w: int, window: int = 4) -> list[int]:
    """``window_selection`` (qwen2_5_vl_utils.py), written out."""
    nh, nw = h // window, w // window
    limit = math.ceil(num_keep / (nh * nw))
    counter = torch.zeros(h, w, dtype=torch.int)
    keep = []
    for index in torch.argsort(attn, descending=True).tolist():
        x, y = min((index // w) // window, nh - 1), min((index % w) // window, nw - 1)
        if counter[x, y] < limit:
            counter[x, y] += 1
            keep.append(index)
        if len(keep) >= num_keep:
            break
    return keep


@pytest.mark.parametrize(("h", "w", "k"), [(12, 10, 20), (8, 8, 5), (9, 13, 30)])
def test_qwen_window_walk_matches_the_reference(h: int, w: int, k: int) -> None:
    torch.manual_seed(h * w)
    scores = torch.rand(h * w)
    index = torch.arange(h * w)
    windows, total = qwen_windows(index // w, index % w, torch.zeros_like(index))
    assert total == (h // 4) * (w // 4)
    assert local_walk_qwen(scores, windows, k, total).tolist() == reference_window_selection(scores, k, h, w)


def test_plan_layers_and_counts() -> None:
    plan = VScan(keep=64).plan(576, 32)
    assert [(s.layer, s.keep) for s in plan] == [(0, 96), (16, 32)]
    assert plan[0].needs == {Need.CLS_ATTENTION, Need.EARLY_ATTENTION} and plan[0].early_vision_depth == 5 / 24
    assert Need.OWN_LAYER_ATTENTION in plan[1].needs
    assert [(s.layer, s.keep) for s in VScan().plan(576, 32)] == [(0, 96), (16, 32)]
    tiny = VScan(keep=8).plan(36, 4)
    assert [s.layer for s in tiny] == [0, 2]
    average = (tiny[0].keep * 2 + tiny[1].keep * 2) / 4
    assert abs(average - 8) <= 2
    qwen = VScan().plan_for(vlprune.adapters.traits_of("qwen2.5-vl"), 1296, 28)
    assert [(s.layer, s.keep) for s in qwen] == [(0, int(0.167 * 1296)), (14, int(0.333 * int(0.167 * 1296)))]
    assert Need.RECEIVED_ATTENTION in qwen[0].needs


@pytest.mark.parametrize(("options", "bad"), [({"layer": 40}, "40"), ({"layer": "x"}, "'x'"), ({"keep": 0}, "0")])
def test_bad_options_name_the_value(options: dict, bad: str) -> None:
    with pytest.raises(VlpruneError, match=bad):
        VScan(**options).plan(576, 32)


def test_batch_equals_its_samples_alone() -> None:
    torch.manual_seed(1)
    shallow, deep = torch.rand(4, 576), torch.rand(4, 576)
    index = torch.arange(576)
    windows = window_of_llava(index // 24, index % 24, 24, 24)
    features = torch.randn(4, 576, 8)
    kept = local_global_llava(shallow, deep, windows, 64)
    merged = merge_into_kept(features, kept)
    for b in range(4):
        alone = local_global_llava(shallow[b : b + 1], deep[b : b + 1], windows, 64)
        assert torch.equal(alone, kept[b : b + 1])
        assert torch.allclose(merge_into_kept(features[b : b + 1], alone), merged[b : b + 1])


@pytest.mark.parametrize("vision_layers", [3, 8])  # the early layer on the feature layer's call, and on its own
def test_engine_early_read_equals_eager_cls_row(vision_layers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaVA: the stage's early [CLS] attention is the eager computation of the [CLS] row at the early layer."""
    model, processor = tiny_model("clip", 2, vision_layers=vision_layers)
    inputs = tiny_inputs(processor, 1)
    contexts = []
    select = VScan.select
    monkeypatch.setattr(VScan, "select", lambda self, ctx: contexts.append(ctx) or select(self, ctx))
    with vlprune.attach(model, create("vscan", keep=8)) as session, torch.no_grad():
        model(**inputs)
    ctx = contexts[0]
    adapter = adapter_for(model)
    early = early_vision_layer(adapter, VScan(keep=8), VScan(keep=8).plan(36, 4))
    assert early == min(round(5 / 24 * len(adapter.vision_layers)), adapter.vision_feature_layer_index())
    layer = adapter.vision_layers[early]
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        normed = layer.layer_norm1(out.hidden_states[early])
        attn = layer.self_attn
        heads = attn.num_heads
        q = attn.q_proj(normed).view(1, -1, heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(1, -1, heads, attn.head_dim).transpose(1, 2)
        row = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)[0, 0, 1:]
    assert torch.allclose(ctx.vision_early_attention[0].float(), row.float(), atol=1e-5)
    assert session.stats.positions == "reindex"
    assert [s.layer for s in session.stats.stages] == [0, 2]


@pytest.mark.skipif(DEVICE != "cpu", reason="the tiled and Qwen-VL cases run on the CPU")
@pytest.mark.parametrize("case_id", ["llava-next", "qwen2.5-vl"])
def test_engine_runs_on_llava_next_and_qwen(case_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASE[case_id]
    together, contexts = ragged_alone_run(case, monkeypatch, VScan, "vscan", 0.5)
    assert contexts[0].vision_early_attention is not None
    assert len(together.kept_indices) == 2


def test_generate_on_tiny_llava() -> None:
    model, processor = tiny_model("clip", 2)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, create("vscan", keep=0.25)) as session:
        tokens, _ = greedy(model, inputs)
    assert tokens.shape[0] == 2
    assert [s.layer for s in session.stats.stages] == [0, 2]
