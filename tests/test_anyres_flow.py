"""The multi-crop paths of the two methods that read the vision tower view by view: FlowCut (per-view pruning inside
the tower, then a language-model stage after layer 1) and VFlowOpt (per-view importance maps packed as the features
are, line breaks at importance 1, recycling in grid cells of the base view and the stitched grid apart)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from family_cases import greedy
from test_anyres_engine import FAMILIES, anyres_inputs, anyres_model, num_visual

import vlprune
import vlprune.adapters
from vlprune.geometry import BASE, NEWLINE, batch_geometry, tiled_view
from vlprune.pruners import create
from vlprune.pruners.flowcut import FlowCut, language_flow_scores
from vlprune.pruners.vflowopt import VFlowOpt, cells_of_views, importance_map


@pytest.mark.parametrize("family", FAMILIES)
def test_flowcut_keeps_half_the_budget_per_view_then_cuts_to_the_budget_after_layer_one(family: str) -> None:
    """The reference's anyres path: every view keeps int(T / 2) patches in the tower (the base view, never unpadded,
    exactly that), no line break enters, and the stage at layer 2 keeps T of what is left."""
    model, processor = anyres_model(family)
    inputs = anyres_inputs(processor, 1, size=(40, 30))
    count = num_visual(model, inputs)
    keep = 0.3
    budget = round(keep * count)
    with vlprune.attach(model, create("flowcut", keep=keep)) as session:
        greedy(model, inputs, new_tokens=2)
    first, second = session.stats.stages
    views = first.views_out[0]
    assert first.layer == 0 and views["base"] == budget // 2 and views["newlines"] == 0
    assert 0 < views["tiles"] <= 4 * (budget // 2)  # four tiles, some patches lost to unpadding or down-scaling
    assert second.layer == 2 and second.visual_out == min(budget, first.visual_out)
    assert first.visual_out > budget  # the language-model stage had work to do


def test_flowcut_language_stage_reads_layer_ones_values_and_scores_as_the_reference() -> None:
    """The values the engine hands the stage at layer 2 are layer 1's, and the score is the reference's."""
    captured = {}

    @dataclasses.dataclass
    class Recording(FlowCut):
        name = "flowcut-recording-test"

        def select(self, ctx):
            if ctx.stage_index == 1:
                captured["ctx"] = ctx
            return super().select(ctx)

    model, processor = anyres_model("llava-next")
    inputs = anyres_inputs(processor, 1, size=(40, 30))
    layer = model.model.language_model.layers[1]

    def record_input(module, args, kwargs) -> None:
        captured.setdefault("input", args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(record_input, with_kwargs=True)
    try:
        with vlprune.attach(model, Recording(keep=0.3)) as session, torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    ctx = captured["ctx"]
    attention = layer.self_attn
    normed = layer.input_layernorm(captured["input"])
    values = attention.v_proj(normed).view(1, normed.shape[1], -1, attention.head_dim).transpose(1, 2)
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0])
    kept = session.stats.stages[0].visual_out
    torch.testing.assert_close(ctx.visual_values, values[:, :, start : start + kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx.query_values, values[:, :, -1:], atol=1e-5, rtol=1e-5)
    assert ctx.query_attention.shape[:3] == (1, model.config.text_config.num_attention_heads, 1)


def test_language_flow_scores_equal_the_references_formula_with_repeated_heads() -> None:
    """rel = mean_h softmax over the visual keys, sem = mean_h softmax(v_q V^T / sqrt(d)), times ||mean_h V||_1, with
    grouped-query attention's key-value heads repeated as the reference's repeat_kv does."""
    torch.manual_seed(0)
    heads, kv_heads, dim, visual, other = 4, 2, 8, 6, 3
    query = torch.randn(1, heads, 1, dim)
    keys = torch.randn(1, kv_heads, visual + other, dim)
    values = torch.randn(1, kv_heads, visual, dim)
    last_value = torch.randn(1, kv_heads, 1, dim)
    repeat = heads // kv_heads
    full = torch.softmax(query @ keys.repeat_interleave(repeat, 1).transpose(-1, -2) / dim**0.5, dim=-1)
    engine_attention = full[..., :visual]  # normalised over every key, as the engine hands it
    relation = torch.softmax(query @ keys[:, :, :visual].repeat_interleave(repeat, 1).transpose(-1, -2) / dim**0.5, -1)
    relation = relation.mean(1)[:, 0]
    big_v, big_q = values.repeat_interleave(repeat, 1), last_value.repeat_interleave(repeat, 1)
    semantic = torch.softmax(big_q @ big_v.transpose(-1, -2) / dim**0.5, -1).mean(1)[:, 0]
    information = big_v.mean(1).abs().sum(-1)
    expected = (relation / relation.sum() + semantic / semantic.sum()) * information
    score = language_flow_scores(engine_attention, values, last_value)
    torch.testing.assert_close(score, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_vflowopt_packs_each_views_importance_and_keeps_the_line_breaks(family: str) -> None:
    """VFlowOpt's importance on a multi-crop image is each view's own map (attention from its sink tokens, from the
    tower's eager weights), placed on the tokens by their crop and patch, and 1 at every line break, which stays."""
    captured = {}

    @dataclasses.dataclass
    class Recording(VFlowOpt):
        name = "vflowopt-recording-test"

        def select(self, ctx):
            selection = super().select(ctx)
            captured.setdefault("scores", selection.scores)
            return selection

    model, processor = anyres_model(family, "eager")
    adapter = vlprune.adapters.adapter_for(model)
    inputs = anyres_inputs(processor, 1, size=(60, 20))  # a 1 x 2 grid OneVision does not shrink: a patch per token
    count = num_visual(model, inputs)
    pruner = Recording(keep=0.3)
    with vlprune.attach(model, pruner) as session, torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True).attentions
    per_crop = attentions[adapter.vision_feature_layer_index()].mean(dim=1)
    if adapter.vision_drops_cls:
        per_crop = per_crop[:, 1:, 1:]
    _, sensitivity, _, _ = pruner.settings(count, len(model.model.language_model.layers))
    geometry = adapter.visual_geometry(dict(inputs), [count], torch.device("cpu"))
    expected = geometry.crop_values(importance_map(per_crop, sensitivity)[..., None], fill=1.0)[..., 0]
    torch.testing.assert_close(captured["scores"], expected, atol=1e-6, rtol=1e-4)
    newlines = int(geometry.is_newline.sum())
    assert newlines > 0 and session.stats.stages[0].views_out[0]["newlines"] == newlines


def test_vflowopt_grid_cells_keep_the_base_view_and_the_stitched_grid_apart() -> None:
    """Cells of side m on the base view's grid and, separately, on the stitched grid whose line-break column is one
    more column (as the reference's ``local_w``); tokens of one cell lie within m patches of each other."""
    patches = 7
    image = tiled_view(patches, (2, 2), torch.arange(14), torch.arange(3, 11))  # 14 x 8 after unpadding
    geometry = batch_geometry([image], [len(image)], torch.device("cpu"))
    cells = cells_of_views(geometry, patches, cell=4.0)[0]
    view = geometry.view[0]
    base, stitched = cells[view == BASE], cells[view != BASE]
    assert not set(base.tolist()) & set(stitched.tolist())
    assert len(set(base.tolist())) == 4  # a 7 x 7 grid in cells of 4: 2 x 2
    assert len(set(stitched.tolist())) == 4 * 3  # 14 rows -> 4 cell rows; 8 columns + the line break -> 3
    line_breaks, tiles = cells[view == NEWLINE], cells[view > BASE]
    assert not set(line_breaks.tolist()) & set(tiles.tolist())  # column 8 starts the third cell column
    rows = torch.where(view == BASE, geometry.row[0], geometry.full_row[0])
    for cell in cells.unique():
        members = rows[cells == cell]
        assert int(members.max() - members.min()) < 4


def test_flowcut_on_a_shrunk_onevision_grid_blends_only_the_kept_patches() -> None:
    """OneVision shrinks a large stitched grid by bilinear interpolation; a token whose nearest patch the tower kept
    enters as the interpolation of the kept patches alone (the dropped ones, zeros, carry no weight)."""
    captured = {}

    @dataclasses.dataclass
    class Recording(FlowCut):
        name = "flowcut-shrunk-test"

        def select(self, ctx):
            if ctx.stage_index == 0:
                captured["hidden"], captured["kept"] = ctx.visual_hidden, ctx.vision_kept
            return super().select(ctx)

    model, processor = anyres_model("llava-onevision")
    inputs = anyres_inputs(processor, 1, size=(40, 30))  # a 2 x 2 grid, shrunk under anyres_max_2
    base = model.model
    with vlprune.attach(model, Recording(keep=0.5)), torch.no_grad():
        # Registered after the engine's hook, so it sees the crops as the model packs them (zeros where dropped).
        handle = base.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.setdefault("crops", out))
        try:
            model(**inputs)
        finally:
            handle.remove()
        crops = captured["crops"]
        dropped = crops.abs().sum(dim=-1) == 0
        sizes, ratio = inputs["image_sizes"], model.config.vision_aspect_ratio
        features, _ = base.pack_image_features(
            [crops], sizes, image_newline=base.image_newline, vision_aspect_ratio=ratio
        )
        mask = (~dropped).float()[..., None]
        share, _ = base.pack_image_features([mask], sizes, image_newline=torch.zeros(1), vision_aspect_ratio=ratio)
    kept = captured["kept"][0]
    expected = features[0][kept] / share[0][kept]
    torch.testing.assert_close(captured["hidden"][0][kept], expected, atol=1e-5, rtol=1e-5)
    blended = share[0][kept, 0]
    assert bool(dropped.any()) and bool(((blended > 0) & (blended < 1)).any())
