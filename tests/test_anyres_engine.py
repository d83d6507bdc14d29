"""What is specific to the tiled families, LLaVA-NeXT and LLaVA-OneVision (base view, tiles, line breaks): statistics
per view, per-view budgets and reads (FasterVLM, HoloV, VisionZip, PTP), the received attention of each crop, and a
count larger than a sample's tokens. The invariants every family shares (keep-all, drop equals mask, batches, ragged
batches, cached decoding, captured, detach, every method runs or refuses) are in ``test_invariants.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import shared_model
from family_cases import COLOUR_QUESTIONS as QUESTIONS
from family_cases import greedy

import vlprune
import vlprune.adapters
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.testing import build_tiny_inputs, make_test_image

FAMILIES = ["llava-next", "llava-onevision"]


def anyres_model(family: str, attn: str = "sdpa"):
    """The shared, cached tiny model of ``family`` (conftest's factory): use it as it is."""
    return shared_model(family, attn_implementation=attn)


def anyres_inputs(processor, batch: int, size: tuple[int, int] = (40, 30)):
    """A batch of 1 or 2 same-sized (wide, so unpadded) images; with 2 the first prompt is left-padded."""
    images = [make_test_image(seed, 96).resize(size) for seed in range(batch)]
    return build_tiny_inputs(processor, images, list(QUESTIONS[:batch]))


def num_visual(model, inputs) -> int:
    return int((inputs["input_ids"][0] == model.config.image_token_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_count_tokens_per_view(family: str) -> None:
    model, processor = anyres_model(family)
    inputs = anyres_inputs(processor, 2)
    with vlprune.attach(model, create("divprune", keep=0.25)) as session:
        greedy(model, inputs, new_tokens=1)
    stats = session.stats
    geometry = vlprune.adapters.adapter_for(model).visual_geometry(
        {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs},
        [stats.visual_tokens] * 2,
        torch.device("cpu"),
    )
    for sample in range(2):
        view = geometry.view[sample]
        expected = {
            "base": int((view == 0).sum()),
            "tiles": int((view > 0).sum()),
            "newlines": int((view == -1).sum()),
            "recycled": 0,
        }
        assert stats.visual_views[sample] == expected and expected["newlines"] > 0
        kept = torch.tensor(stats.stages[0].kept_indices[sample])
        out = stats.stages[0].views_out[sample]
        assert out["base"] == int((view[kept] == 0).sum()) and out["newlines"] == int((view[kept] == -1).sum())
        assert sum(out.values()) == stats.stages[0].visual_out


def test_a_count_larger_than_a_samples_tokens_names_the_sample() -> None:
    model, processor = anyres_model("llava-next")
    images = [make_test_image(1, 96).resize((40, 20)), make_test_image(2, 96).resize((30, 60))]
    batch = build_tiny_inputs(processor, images, list(QUESTIONS))
    with vlprune.attach(model, create("random", keep=158)), pytest.raises(VlpruneError, match="154 visual tokens"):
        greedy(model, batch, new_tokens=1)


def test_fastervlm_keeps_each_views_share_by_its_own_cls_attention() -> None:
    """LLaVA-NeXT path of FasterVLM: the budget is shared among the base view and the tiles by their sizes, each
    view's tokens chosen by its own [CLS] row; line breaks are dropped. Compared with a plain re-implementation from
    the tower's eager attention."""
    model, processor = anyres_model("llava-next")
    inputs = anyres_inputs(processor, 1, size=(40, 30))  # a 2 x 2 grid unpadded: the tiles are cut unequally
    adapter = vlprune.adapters.adapter_for(model)
    count = num_visual(model, inputs)
    keep = 50
    with vlprune.attach(model, create("fastervlm", keep=keep)) as session:
        greedy(model, inputs, new_tokens=1)
    kept = session.stats.stages[0].kept_indices[0]
    # The reference's scores: each crop's [CLS] row at the feature layer, from eager attention weights.
    pixels = inputs["pixel_values"][0]
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    cls_rows = out.attentions[adapter.vision_feature_layer_index()].mean(1)[:, 0, 1:]  # (crops, patches)
    geometry = adapter.visual_geometry(dict(inputs), [count], torch.device("cpu"))
    view, crop, patch = geometry.view[0], geometry.crop[0], geometry.crop_token[0]
    sizes = {v: int((view == v).sum()) for v in sorted(set(view.tolist())) if v >= 0}
    total = sum(sizes.values())
    exact = {v: keep * n / total for v, n in sizes.items()}
    share = {v: int(x) for v, x in exact.items()}
    for v in sorted(exact, key=lambda v: -sizes[v])[: keep - sum(share.values())]:  # the rest to the largest
        share[v] += 1
    expected = []
    for v, take in share.items():
        members = torch.nonzero(view == v)[:, 0]
        scores = cls_rows[crop[members], patch[members]]
        expected += members[scores.topk(take).indices].tolist()
    assert len(kept) == keep and sorted(expected) == kept
    assert not any(view[i] == -1 for i in kept) and len(sizes) == 5 and len(set(sizes.values())) > 1


def test_holov_drops_the_line_breaks_and_prunes_the_rest_as_one_sequence() -> None:
    """HoloV on LLaVA-NeXT equals HoloV run on the same tokens without the line breaks (the reference removes them)."""
    from vlprune.pruners.base import StageContext

    model, processor = anyres_model("llava-next")
    inputs = anyres_inputs(processor, 1, size=(40, 30))
    with vlprune.attach(model, create("holov", keep=40)) as session:
        greedy(model, inputs, new_tokens=1)
    kept = session.stats.stages[0].kept_indices[0]
    geometry = vlprune.adapters.adapter_for(model).visual_geometry(dict(inputs), [num_visual(model, inputs)], "cpu")
    visible = (~geometry.is_newline[0]).nonzero()[:, 0]
    assert len(kept) == 40 and set(kept) <= set(visible.tolist())
    hidden, attention = torch.randn(1, len(geometry.view[0]), 8), torch.rand(1, len(geometry.view[0]))
    pruner = create("holov", keep=40)
    context = StageContext(
        layer=0, keep=40, visual_hidden=hidden, visual_positions=torch.zeros(1, hidden.shape[1], dtype=torch.long),
        visual_origin=torch.arange(hidden.shape[1])[None], geometry=geometry, vision_cls_attention=attention,
    )  # fmt: skip
    plain = dataclasses.replace(
        context, visual_hidden=hidden[:, visible], vision_cls_attention=attention[:, visible], geometry=None
    )
    assert torch.equal(pruner.select(context).keep_index[0], visible[pruner.select(plain).keep_index[0]])


def test_visionzip_gives_each_view_its_dominant_and_contextual_tokens() -> None:
    """VisionZip's LLaVA-NeXT path on a hand-built context: each view's dominant tokens are its own top [CLS]
    tokens, its contextual tokens merge only its own other tokens (checked for the base view with a plain
    computation), and the line breaks are dropped."""
    from vlprune.pruners.base import StageContext

    model, processor = anyres_model("llava-next")
    inputs = anyres_inputs(processor, 1, size=(40, 30))
    count = num_visual(model, inputs)
    geometry = vlprune.adapters.adapter_for(model).visual_geometry(dict(inputs), [count], torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    features, keys = torch.randn(1, count, 6, generator=generator), torch.randn(1, count, 4, generator=generator)
    scores = torch.rand(1, count, generator=generator)
    projector = torch.nn.Linear(6, 6, bias=False)
    torch.nn.init.eye_(projector.weight)
    pruner = create("visionzip", keep=64)
    dominant, contextual = pruner.split(64, count)
    context = StageContext(
        layer=0, keep=dominant, visual_hidden=torch.zeros(1, count, 6), visual_origin=torch.arange(count)[None],
        visual_positions=torch.arange(count)[None] + 5, geometry=geometry, vision_cls_attention=scores,
        vision_keys=keys, vision_features=features, projector=projector,
    )  # fmt: skip
    selection = pruner.select(context)
    kept = set(selection.keep_index[0].tolist())
    view = geometry.view[0]
    assert len(kept) == dominant and not any(view[i] == -1 for i in kept)
    assert selection.recycled.hidden.shape == (1, contextual, 6)
    base = torch.nonzero(view == 0)[:, 0]
    base_kept = [i for i in base.tolist() if i in kept]
    # The base view's dominant tokens are its own highest-scoring ones.
    assert sorted(base_kept) == sorted(base[scores[0, base].topk(len(base_kept)).indices].tolist())
    rest = torch.tensor([i for i in base.tolist() if i not in kept])
    share = sum(1 for p in selection.recycled.positions[0].tolist() if p - 5 in set(base.tolist()))
    step = max(1, len(rest) // share)
    centres = rest[torch.arange(0, len(rest), step)[:share]]
    unit = torch.nn.functional.normalize(keys[0], dim=-1)
    joined = (unit[rest] @ unit[centres].T).argmax(dim=1)
    for c, centre in enumerate(centres.tolist()):
        members = [int(r) for r, j in zip(rest, joined, strict=True) if j == c and int(r) not in centres.tolist()]
        expected = features[0, centre] + (features[0, members].mean(0) if members else 0)
        torch.testing.assert_close(selection.recycled.hidden[0, c], expected, atol=1e-5, rtol=0)
    assert selection.recycled.positions[0, : len(centres)].tolist() == (centres + 5).tolist()


def test_ptp_region_budgets_follow_the_sub_images_saliency() -> None:
    """PTP on tiled inputs: the regions are the base view and the tiles; a hand-built saliency map whose regions'
    means are 4 : 2 : 1 : 1 (line breaks 0) gives budgets in that proportion, each region's tokens by the fused
    score."""
    from vlprune.pruners.base import StageContext

    model, processor = anyres_model("llava-next")
    inputs = anyres_inputs(processor, 1, size=(50, 50))  # base + 2 x 2 whole tiles: five regions of 49 tokens
    count = num_visual(model, inputs)
    geometry = vlprune.adapters.adapter_for(model).visual_geometry(dict(inputs), [count], torch.device("cpu"))
    view = geometry.view[0]
    level = torch.tensor([0.0, 4.0, 2.0, 1.0, 1.0, 0.0])  # by region: line breaks, base, tile 1..4
    region = view.clamp(min=-1) + 1
    noise = torch.rand(count)
    noise = (
        noise - (torch.zeros(6).index_add_(0, region, noise) / torch.bincount(region, minlength=6).clamp(min=1))[region]
    )
    saliency = level[region] * (1 + 0.01 * noise)  # tokens differ, region means stay exact
    relevance = torch.rand(1, 3, count)
    pruner = create("ptp", keep=41, alpha=0.5)
    context = StageContext(
        layer=3, keep=41, visual_hidden=torch.zeros(1, count, 4), visual_origin=torch.arange(count)[None],
        visual_positions=torch.arange(count)[None], geometry=geometry, query_attention=relevance,
        query_mask=torch.ones(1, 3, dtype=torch.bool), vision_received_attention=saliency[None],
    )  # fmt: skip
    kept = pruner.select(context).keep_index[0]
    per_region = torch.bincount(region[kept], minlength=6).tolist()
    assert per_region == [0, 21, 10, 5, 5, 0]  # floors of 41 x 4/8, 2/8, 1/8, 1/8, the remainder to the heaviest
    # Inside a region, the fused score decides.
    fused = 0.5 * (saliency - saliency.min()) / (saliency.max() - saliency.min())
    best = relevance.amax(dim=1)[0]
    fused = fused + 0.5 * (best - best.min()) / (best.max() - best.min())
    base = torch.nonzero(view == 0)[:, 0]
    assert sorted(kept[view[kept] == 0].tolist()) == sorted(base[fused[base].topk(21).indices].tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_received_attention_is_each_crops_eager_attention_mapped_onto_the_tokens(family: str) -> None:
    """What PTP (and HoloV on SigLIP) receive as ``vision_received_attention``: for each visual token, the attention
    its patch receives at the feature layer, averaged over the heads and its own crop's patch queries ([CLS] row and
    column dropped where LLaVA drops [CLS]); 0 for line breaks. Checked against the tower's eager weights."""
    from vlprune.pruners import Pruner, Selection, Stage, StageContext, StagePlan

    captured = {}

    @dataclasses.dataclass
    class ReceivedReader(Pruner):
        name = "received-reader-test"
        stage = Stage.PRE_LLM

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=None, vision_received_attention=True)]

        def select(self, ctx: StageContext) -> Selection:
            captured["received"] = ctx.vision_received_attention
            return Selection(keep_index=torch.arange(ctx.num_visual).expand(ctx.batch_size, -1))

    model, processor = anyres_model(family, "eager")
    adapter = vlprune.adapters.adapter_for(model)
    inputs = anyres_inputs(processor, 1, size=(40, 30))
    with vlprune.attach(model, ReceivedReader()), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True).attentions
    per_crop = attentions[adapter.vision_feature_layer_index()].mean(dim=1)  # (crops, T, T)
    if adapter.vision_drops_cls:
        per_crop = per_crop[:, 1:, 1:]
    received = per_crop.mean(dim=1)  # (crops, patches): mean over the crop's patch queries
    geometry = adapter.visual_geometry(dict(inputs), [num_visual(model, inputs)], torch.device("cpu"))
    crop, patch = geometry.crop[0], geometry.crop_token[0]
    expected = torch.where(crop >= 0, received[crop.clamp(min=0), patch.clamp(min=0)], 0.0)
    torch.testing.assert_close(captured["received"][0], expected, atol=1e-6, rtol=1e-4)
    assert int(crop.max()) == 4 and bool((captured["received"][0][geometry.is_newline[0]] == 0).all())


def test_holov_runs_on_siglip_with_the_received_attention() -> None:
    model, processor = anyres_model("llava-onevision")
    inputs = anyres_inputs(processor, 2)
    with vlprune.attach(model, create("holov", keep=0.25)) as session:
        greedy(model, inputs, new_tokens=1)
    assert session.stats.stages[0].visual_out == round(0.25 * num_visual(model, inputs))
