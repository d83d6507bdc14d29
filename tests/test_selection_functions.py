"""The pre-LLM selections as plain functions (``vlprune.pruners.selection``): known answers on hand-built tensors, the
same answers as the pruners give through the engine on tiny models of each family path, and no dependence on the
engine, the adapters or transformers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, QUESTIONS, shared_model, tiny_inputs, tiny_model
from torch import nn

import vlprune
from vlprune.pruners import StageContext, create, resolve_keep
from vlprune.pruners.selection import (
    LinearActLinear,
    llava_mlp,
    select_divprune,
    select_fastervlm,
    select_holov,
    select_random,
    select_visionzip,
    select_zoo_prune,
    visionzip_split,
)
from vlprune.pruners.zoo_prune import projector_sensitivity, random_directions
from vlprune.testing import build_tiny_inputs, make_test_image
from vlprune.testing_qwen import build_tiny_qwen_inputs

ROOT = Path(__file__).resolve().parents[1]


def on_circle(degrees: list[float]) -> torch.Tensor:
    """(1, N, 2) unit vectors at the given angles: their cosine distances are known in closed form."""
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None].float()


def context(hidden: torch.Tensor, keep: int, **fields) -> StageContext:
    batch, count = hidden.shape[:2]
    positions = torch.arange(count).expand(batch, -1)
    return StageContext(
        layer=0, keep=keep, visual_hidden=hidden, visual_positions=positions, visual_origin=positions, **fields
    )


# ---------------------------------------------------------------------------------------------- no session needed


def test_the_selection_module_loads_nothing_of_the_engine_the_adapters_or_transformers() -> None:
    """Imported and run in a fresh interpreter. The package's own ``vlprune/__init__.py`` imports the engine (the
    session API), so the top package is stood in for by an empty one: what loads is what the selection needs."""
    script = """
import sys, types
package = types.ModuleType("vlprune")
package.__path__ = [sys.argv[1]]
sys.modules["vlprune"] = package
import torch
from vlprune.pruners import selection as s
hidden, attention = torch.randn(1, 16, 8), torch.rand(1, 16)
s.select_random(16, 4)
s.select_fastervlm(attention, 4)
s.select_divprune(hidden, 4)
s.select_holov(hidden, attention, 4)
s.select_zoo_prune(hidden, hidden, 4, torch.nn.Linear(8, 8), directions=4)
s.select_visionzip(attention, torch.randn(1, 16, 4), hidden, 6, 2).in_place(hidden)
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers" or m.startswith(("vlprune.engine",
      "vlprune.adapters"))))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "vlprune")], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------------------------------- known answers


def test_random_keeps_the_top_of_its_seeded_draw_and_equals_the_pruner() -> None:
    draw = torch.rand(10, generator=torch.Generator().manual_seed(7))
    expected = draw.topk(4).indices.sort().values
    kept = select_random(10, 4, batch=2, seed=7)
    assert kept.tolist() == [expected.tolist()] * 2  # every sample the same subset
    selection = create("random", keep=4, seed=7).select(context(torch.randn(2, 10, 3), 4))
    assert torch.equal(selection.keep_index, kept)


def test_fastervlm_keeps_the_most_attended_tokens_in_order() -> None:
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.05], [0.3, 0.0, 0.4, 0.1, 0.2]])
    assert select_fastervlm(attention, 2).tolist() == [[1, 3], [0, 2]]


def test_fastervlm_shares_the_budget_among_the_views_by_their_sizes() -> None:
    # Base view: tokens 0-3; a line break (4) with the highest score; one tile of 2 tokens (5, 6). keep=3 of the six
    # view tokens: shares 3 · 4/6 = 2 and 3 · 2/6 = 1; the line break takes nothing.
    views = torch.tensor([[0, 0, 0, 0, -1, 1, 1]])
    attention = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.9, 0.05, 0.06]])
    assert select_fastervlm(attention, 3, views=views).tolist() == [[1, 2, 6]]
    assert select_fastervlm(attention, 3).tolist() == [[1, 2, 4]]  # without views: one top-k over all


def test_divprune_chooses_by_max_min_distance() -> None:
    # Nearest-neighbour angles: 0 -> 70 (290), 100 and 105 -> 5, 200 -> 90, 290 -> 70: 200 is the most isolated.
    # Then the token furthest from 200 (0, at 160 degrees), then the one furthest from both (100: min(100, 100)
    # beats 105: min(95, 105), and 290: min(90, 70)).
    features = on_circle([0, 100, 105, 200, 290])
    kept = select_divprune(features, 3)
    assert kept.index.tolist() == [[0, 1, 3]]
    assert int(kept.isolation.argmax()) == 3
    torch.testing.assert_close(kept.isolation[0, 3], torch.tensor(1.0), atol=1e-6, rtol=0)  # 1 - cos 90


def test_holov_gives_crop_quotas_by_attention_and_orders_crop_by_crop() -> None:
    # Two raster crops of 4 (crops=2). A crop's score is 1.09 · its mean attention (the variance term is rescaled to
    # it), so the weights are 0.35 : 0.15 = 0.7 : 0.3 and keep=4 gives floor(2.8) + 1 = 3 and floor(1.2) = 1.
    attention = torch.tensor([[0.1, 0.2, 0.7, 0.4, 0.05, 0.35, 0.1, 0.1]])
    features = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(0))
    assert select_holov(features, attention, 4, crops=2).tolist() == [[2, 3, 1, 5]]  # most attended first per crop
    assert select_holov(features, attention, 4, crops=2, reference_order=False).tolist() == [[1, 2, 3, 5]]
    # A line break (here at 4, most attended) is removed first and the rest pruned as one sequence.
    with_break = torch.cat([attention[:, :4], torch.tensor([[0.99]]), attention[:, 4:]], dim=1)
    features = torch.cat([features[:, :4], torch.randn(1, 1, 6), features[:, 4:]], dim=1)
    line_breaks = torch.zeros(1, 9, dtype=torch.bool)
    line_breaks[0, 4] = True
    kept = select_holov(features, with_break, 4, crops=2, line_breaks=line_breaks)
    assert kept.tolist() == [[2, 3, 1, 6]]


def test_zoo_prune_weights_diversity_by_the_projectors_sensitivity() -> None:
    # A plain callable x -> x²: in one dimension its sensitivity is |2x| exactly, so the tokens' are 2, 6, 4, 1 and
    # the normalised weights 0.2, 1, 0.6, 0. Token 1 first; then 0.6 · (1 - cos 90) for token 2 beats 0.2 · 1 for
    # token 0 and 0 for token 3; then token 0.
    features = torch.tensor([[[1.0], [3.0], [2.0], [0.5]]])
    embeddings = on_circle([0, 90, 180, 270])
    kept = select_zoo_prune(features, embeddings, 2, lambda x: x * x, directions=4)
    torch.testing.assert_close(kept.sensitivity, torch.tensor([[2.0, 6.0, 4.0, 1.0]]), atol=1e-3, rtol=0)
    assert kept.index.tolist() == [[1, 2]]
    assert select_zoo_prune(features, embeddings, 3, lambda x: x * x, directions=4).index.tolist() == [[0, 1, 2]]


def test_zoo_prunes_mlp_shortcut_gives_the_generic_paths_numbers() -> None:
    torch.manual_seed(3)
    projector = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5))
    pieces = LinearActLinear(projector[0].weight, projector[0].bias, projector[1], projector[2].weight)
    features, directions = torch.randn(2, 7, 6), random_directions(16, 6, seed=0)
    generic = projector_sensitivity(projector, features, directions, 0.01)
    torch.testing.assert_close(
        projector_sensitivity(projector, features, directions, 0.01, mlp=pieces), generic, rtol=1e-4, atol=1e-5
    )
    assert llava_mlp(projector) is None  # only transformers' LLaVA projector is recognised


def test_visionzip_splits_dominant_and_contextual_and_merges_by_keys() -> None:
    # keep=4 with 2 contextual: dominant 0 and 2 (highest scores); the rest 1, 3, 4, 5, every 4 // 2 = 2nd one a
    # centre (1 and 4); 3's key is nearest 1's, 5's nearest 4's: contextual tokens 10 + 30 and 40 + 50.
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.05]])
    keys = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    tokens = torch.tensor([[[1.0], [10.0], [2.0], [30.0], [40.0], [50.0]]])
    zipped = select_visionzip(scores, keys, tokens, 4, 2)
    assert zipped.index.tolist() == [[0, 2]]
    assert zipped.centres.tolist() == [[1, 4]]
    assert zipped.merged.tolist() == [[[40.0], [90.0]]]
    index, hidden = zipped.in_place(tokens)  # Qwen-VL: each contextual token in its centre's place
    assert index.tolist() == [[0, 1, 2, 4]] and hidden[0, :, 0].tolist() == [1.0, 40.0, 2.0, 90.0]
    assert select_visionzip(scores, keys, tokens, 4, 0).merged is None
    assert visionzip_split(64, 576) == (54, 10) and visionzip_split(64, 576, qwen=True) == (36, 28)


def test_visionzip_gives_each_view_its_own_dominant_and_contextual_tokens() -> None:
    # Base view 0-3, a line break (4), a tile 5-8. keep=4 with 2 contextual: each view one dominant token (its
    # highest) and one centre (its first other token), which every other token of the view joins.
    views = torch.tensor([[0, 0, 0, 0, -1, 1, 1, 1, 1]])
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 1.0, 0.4, 0.1, 0.8, 0.2]])
    keys = torch.randn(1, 9, 3, generator=torch.Generator().manual_seed(1))
    tokens = torch.arange(9.0)[None, :, None] * 10
    zipped = select_visionzip(scores, keys, tokens, 4, 2, views=views)
    assert zipped.index.tolist() == [[1, 7]]
    assert zipped.centres.tolist() == [[0, 5]]
    assert zipped.merged[0, :, 0].tolist() == [0 + (20 + 30) / 2, 50 + (60 + 80) / 2]


# ---------------------------------------------------------------------------------------------- equal to the engine


def recorded_run(model, inputs, method: str, **options):
    """Run ``method`` through the engine; return each stage's context and selection, and the statistics."""
    pruner = create(method, **options)
    calls = []
    select = pruner.select

    def recording(ctx):
        selection = select(ctx)
        calls.append((ctx, selection))
        return selection

    pruner.select = recording
    with torch.no_grad(), vlprune.attach(model, pruner) as session:
        model(**inputs)
    return calls, session.stats


def anyres_inputs(processor, sizes=((40, 30), (30, 60))):
    """Two images of different shapes: one wide (tiles cut unequally by unpadding), one tall."""
    images = [make_test_image(seed + 1, 96).resize(size) for seed, size in enumerate(sizes)]
    return build_tiny_inputs(processor, images, list(QUESTIONS)).to(DEVICE)


def qwen_inputs(processor):
    images = [make_test_image(seed, 96).resize(size) for seed, size in enumerate(((48, 32), (32, 64)))]
    return build_tiny_qwen_inputs(processor, images, list(QUESTIONS)).to(DEVICE)


def check_against_engine(method: str, calls, stats, options: dict) -> None:
    """The public function on the values of each recorded context gives the pruner's selection, and the engine kept
    those tokens."""
    kept_rows = []
    for ctx, selection in calls:
        geometry = ctx.geometry
        views = geometry.view if geometry is not None and geometry.has_tiles else None
        attention = ctx.vision_cls_attention
        recycled, kept_hidden = None, None
        if method == "random":
            seed, device = options.get("seed", 0), ctx.visual_hidden.device
            index = select_random(ctx.num_visual, ctx.keep, batch=ctx.batch_size, seed=seed, device=device)
        elif method == "fastervlm":
            index = select_fastervlm(attention, ctx.keep, views=views)
        elif method == "divprune":
            index = select_divprune(ctx.visual_hidden, ctx.keep).index
        elif method == "holov":
            line_breaks = geometry.is_newline if geometry is not None and geometry.has_newlines else None
            scores = attention if attention is not None else ctx.vision_received_attention
            index = select_holov(ctx.visual_hidden, scores, ctx.keep, line_breaks=line_breaks)
        elif method == "zoo-prune":
            index = select_zoo_prune(
                ctx.vision_features, ctx.visual_hidden, ctx.keep, ctx.projector, mlp=llava_mlp(ctx.projector)
            ).index
        elif attention is not None:  # VisionZip on LLaVA: merged before the projector, at the centres' positions
            keep = resolve_keep(options["keep"], ctx.num_visual)
            _, contextual = visionzip_split(keep, ctx.num_visual)
            zipped = select_visionzip(attention, ctx.vision_keys, ctx.vision_features, keep, contextual, views=views)
            index = zipped.index
            merged = ctx.projector(zipped.merged.to(next(ctx.projector.parameters()).dtype))
            recycled = (merged, torch.gather(ctx.visual_positions, 1, zipped.centres))
        else:  # VisionZip on Qwen-VL: merged after the merger, in the centres' places
            _, contextual = visionzip_split(ctx.keep, ctx.num_visual, qwen=True)
            zipped = select_visionzip(
                ctx.vision_received_attention, ctx.vision_keys, ctx.visual_hidden, ctx.keep, contextual
            )
            index, kept_hidden = zipped.in_place(ctx.visual_hidden)
        assert torch.equal(index, selection.keep_index)
        if recycled is not None:
            assert torch.equal(recycled[0], selection.recycled.hidden)
            assert torch.equal(recycled[1], selection.recycled.positions)
        if kept_hidden is not None:
            assert torch.equal(kept_hidden, selection.kept_hidden)
        for sample, row in enumerate(index):  # HoloV's crop-by-crop order stays (re-indexed positions)
            origin = ctx.visual_origin[sample, row].tolist()
            kept_rows.append(origin if selection.ordered else sorted(origin))
    assert kept_rows == stats.stages[0].kept_indices


LLAVA_CASES = [
    ("random", {"keep": 0.3, "seed": 5}),
    ("fastervlm", {"keep": 0.25}),
    ("divprune", {"keep": 0.25}),
    ("holov", {"keep": 0.25}),
    ("zoo-prune", {"keep": 0.25}),
    ("visionzip", {"keep": 0.25}),
]


@pytest.mark.parametrize("method,options", LLAVA_CASES)
def test_the_functions_equal_the_pruners_through_the_engine_on_llava(method: str, options: dict) -> None:
    """LLaVA-1.5 (CLIP, with [CLS]): a left-padded batch of two."""
    model, processor = tiny_model()
    calls, stats = recorded_run(model, tiny_inputs(processor, 2), method, **options)
    assert len(calls) == 1 and calls[0][0].batch_size == 2
    check_against_engine(method, calls, stats, options)


@pytest.mark.parametrize("method,options", LLAVA_CASES)
def test_the_functions_equal_the_pruners_through_the_engine_on_llava_next(method: str, options: dict) -> None:
    """LLaVA-NeXT: tiled images (per-view FasterVLM and VisionZip, line breaks dropped by HoloV), a ragged batch
    (each sample's selection alone)."""
    model, processor = shared_model("llava-next", device=DEVICE)
    calls, stats = recorded_run(model, anyres_inputs(processor), method, **options)
    assert len(calls) == 2 and calls[0][0].geometry.has_tiles and calls[0][0].geometry.has_newlines
    check_against_engine(method, calls, stats, options)


@pytest.mark.parametrize("method,options", [case for case in LLAVA_CASES if case[0] in ("holov", "divprune")])
def test_the_functions_equal_the_pruners_through_the_engine_on_llava_onevision(method: str, options: dict) -> None:
    """LLaVA-OneVision: a SigLIP tower without [CLS] (HoloV reads the attention each token receives)."""
    model, processor = shared_model("llava-onevision", device=DEVICE)
    calls, stats = recorded_run(model, anyres_inputs(processor, ((40, 30), (40, 30))), method, **options)
    check_against_engine(method, calls, stats, options)


QWEN_CASES = [case for case in LLAVA_CASES if case[0] != "fastervlm"]


@pytest.mark.parametrize("method,options", QWEN_CASES)
def test_the_functions_equal_the_pruners_through_the_engine_on_qwen2_5_vl(method: str, options: dict) -> None:
    """Qwen2.5-VL: received attention, the merger as ZOO-Prune's projector, VisionZip merged in place, a ragged
    batch."""
    model, processor = shared_model("qwen2.5-vl", device=DEVICE)
    calls, stats = recorded_run(model, qwen_inputs(processor), method, **options)
    check_against_engine(method, calls, stats, options)
