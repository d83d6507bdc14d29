"""What is specific to the Qwen-VL families, Qwen2-VL, Qwen2.5-VL and Qwen3-VL (multimodal RoPE, dynamic resolution,
DeepStack, videos, the packed vision encoder): kept tokens keep the model's own (t, h, w) positions, continuations
follow each sample's rope_deltas, reindexed positions are refused, videos are visual tokens with their frames, what
the encoder's last block gives the pruners, pruning inside the encoder, statistics, and the CLI on a Qwen folder. The
invariants every family shares (keep-all, drop equals mask, ragged batches, cached decoding, captured, detach, every
method runs or refuses) are in ``test_invariants.py``."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import shared_model
from family_cases import COLOUR_QUESTIONS as QUESTIONS
from family_cases import greedy, greedy_under_mask

import vlprune
import vlprune.adapters
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.pruners.flowcut import FlowCut
from vlprune.testing import make_test_image
from vlprune.testing_qwen import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, build_tiny_qwen_inputs

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
SIZES = ((48, 32), (32, 64))  # (width, height): different token counts per sample


def qwen_model(family: str, attn: str = "sdpa"):
    """The shared, cached tiny model of ``family`` (conftest's factory): use it as it is."""
    return shared_model(family, attn_implementation=attn)


def qwen_inputs(processor, batch: int, sizes=SIZES):
    images = [make_test_image(seed, 96).resize(sizes[seed]) for seed in range(batch)]
    return build_tiny_qwen_inputs(processor, images, list(QUESTIONS[:batch]))


def visual_counts(model, inputs) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def continuation_logits(model, inputs, pruner) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Three tokens per sample fed in one call through the (pruned) cache after the prompts, at
    ``continuation_position_ids`` (lmms-eval's log-likelihood path), and the same tokens in one pass over prompt +
    continuation without a cache, in which the model numbers every position itself; and the prompts' rope_deltas."""
    import inspect

    steps = torch.tensor([[5, 9, 13], [7, 2, 11]])
    length = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(steps)], dim=1)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with vlprune.attach(model, pruner), torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        deltas = model.model.rope_deltas.flatten().tolist()
        adapter = vlprune.adapters.adapter_for(model)
        positions = adapter.continuation_position_ids(length, steps.shape[1], "cpu", inputs["attention_mask"])
        cache = getattr(prefill, "cache", None) or prefill.past_key_values
        fed = model(input_ids=steps, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache})
        types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(steps)], dim=1)
        images = {key: inputs[key] for key in ("pixel_values", "image_grid_thw")}
        model.model.rope_deltas = None
        ids = torch.cat([inputs["input_ids"], steps], dim=1)
        whole = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **images)
    return fed.logits, whole.logits[:, -steps.shape[1] :], deltas


@pytest.mark.parametrize("method,options", [("none", {}), ("divprune", {"keep": 0.25})])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_continuation_of_a_batch_continues_each_samples_own_positions(family: str, method: str, options: dict):
    """``continuation_position_ids`` on a batch whose images have different extents (4 x 6 and 3 x 8 tokens: one
    prompt length, no padding), so different ``rope_deltas``: the continuation fed through the (pruned) cache gives
    the logits of one pass over prompt + continuation (a selection that ignores the text prunes alike in both). Every
    sample taking sample 0's deltas fails here."""
    model, processor = qwen_model(family)
    images = [make_test_image(seed, 96).resize(size) for seed, size in enumerate(((48, 32), (64, 24)))]
    inputs = build_tiny_qwen_inputs(processor, images, [QUESTIONS[0]] * 2)
    assert bool(inputs["attention_mask"].all())
    fed, whole, deltas = continuation_logits(model, inputs, create(method, **options))
    assert deltas[0] != deltas[1]  # the samples' positions continue from different places
    torch.testing.assert_close(fed, whole, atol=1e-4, rtol=0)


def test_a_continuation_of_a_left_padded_batch_continues_each_samples_own_positions() -> None:
    """With the prompt's attention mask, a left-padded sample continues from its own length (start + its
    rope_deltas alone would be off by its padding)."""
    model, processor = qwen_model("qwen2-vl")
    inputs = qwen_inputs(processor, 2)  # the first prompt is 8 tokens shorter: left-padded
    assert not bool(inputs["attention_mask"].all())
    fed, whole, _ = continuation_logits(model, inputs, create("none"))
    torch.testing.assert_close(fed, whole, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_the_models_own_multimodal_positions(family: str) -> None:
    """The rotation every later layer applies to a kept token is the one of its (t, h, w) position in the model's
    ``get_rope_index`` numbering of the full prompt (not a renumbering of the shortened sequence)."""
    model, processor = qwen_model(family)
    inputs = qwen_inputs(processor, 2)
    seen = {}
    layer = model.model.language_model.layers[3]

    def record(module, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0]

    with vlprune.attach(model, create("random", keep=0.3)) as session, torch.no_grad():
        # Registered after the engine's hooks, so it sees what the layer receives.
        handle = layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        **({"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}),
    )
    positions = positions[-3:]  # (3, B, L): temporal, height, width (a leading text row is not a rotation)
    cos, _ = model.model.language_model.rotary_emb(seen["cos"], positions)
    kept = session.stats.stages[0].kept_indices
    visual = inputs["input_ids"] == model.config.image_token_id
    for sample in range(2):
        slots = visual[sample].nonzero()[:, 0]
        keep = torch.zeros_like(visual[sample])
        keep[~visual[sample]] = True
        keep[slots[kept[sample]]] = True
        expected = cos[sample, keep]
        got = seen["cos"][sample, -len(expected) :]  # shorter samples of the pruned batch are left-filled
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert len(set(positions[1, sample, slots].tolist())) > 1  # the height row really varies over the image


def test_reindexed_positions_are_refused_with_the_reason() -> None:
    model, _ = qwen_model("qwen2-vl")
    with pytest.raises(VlpruneError, match="multimodal RoPE"):
        vlprune.attach(model, create("fastv", keep=0.25), positions="reindex")


def video_inputs(processor):
    """A batch of an image sample (48 x 32) and a video sample (four 32 x 32 frames: two temporal patches)."""
    frames = [make_test_image(seed, 32) for seed in range(4)]
    image = make_test_image(5, 96).resize(SIZES[0])
    return build_tiny_qwen_inputs(processor, [image], ["What colour is the square?", "What moves?"], videos=[frames])


@pytest.mark.parametrize("family", FAMILIES)
def test_video_tokens_are_visual_tokens_with_their_frames(family: str) -> None:
    """A video's tokens are visual tokens: keep-all equals vanilla, pruning equals masking on a batch of an image and
    a video (Qwen3-VL puts timestamps between the frames and DeepStack planes on both), and the geometry numbers each
    token's frame."""
    model, processor = qwen_model(family)
    inputs = video_inputs(processor)
    tokens, logits = greedy(model, inputs)
    with vlprune.attach(model, create("none")):
        same_tokens, same_logits = greedy(model, inputs)
    assert torch.equal(tokens, same_tokens)
    torch.testing.assert_close(same_logits, logits, atol=1e-6, rtol=0)
    with vlprune.attach(model, create("random", keep=0.3)) as session:
        pruned_tokens, pruned_logits = greedy(model, inputs)
    [stage] = session.stats.stages
    assert session.stats.visual_tokens_per_sample == [24, 32]
    masked_tokens, masked_logits = greedy_under_mask(model, inputs, [(0, stage.kept_indices)])
    assert torch.equal(pruned_tokens, masked_tokens)
    torch.testing.assert_close(pruned_logits, masked_logits, atol=1e-4, rtol=0)
    adapter = vlprune.adapters.adapter_for(model)
    geometry = adapter.visual_geometry(dict(inputs), [24, 32], torch.device("cpu"))
    assert geometry.frame[0].tolist() == [0] * 24 + [-1] * 8  # the image sample is padded to the video's 32
    assert geometry.frame[1].tolist() == [0] * 16 + [1] * 16
    assert geometry.row[1].tolist() == [r for _ in range(2) for r in range(4) for _ in range(4)]
    assert geometry.crop[0, :24].tolist() == [0] * 24  # the image is the encoder's first chunk,
    assert geometry.crop[1].tolist() == [1] * 16 + [2] * 16  # the video's time steps the next two
    assert geometry.num_crops == 3


@pytest.mark.parametrize(
    "method", ["fastv", "divprune", "sparsevlm", "holov", "ptp", "zoo-prune", "vflowopt", "flowcut", "visionzip"]
)
def test_a_batch_of_an_image_and_a_video_equals_its_samples_alone(method: str) -> None:
    model, processor = qwen_model("qwen2.5-vl")
    batch = video_inputs(processor)
    with vlprune.attach(model, create(method, keep=0.3)) as session:
        tokens, logits = greedy(model, batch)
        together = session.stats
        frames = [make_test_image(seed, 32) for seed in range(4)]
        singles = [
            build_tiny_qwen_inputs(
                processor, [make_test_image(5, 96).resize(SIZES[0])], ["What colour is the square?"]
            ),
            build_tiny_qwen_inputs(processor, [], ["What moves?"], videos=[frames]),
        ]
        for index, single in enumerate(singles):
            single_tokens, single_logits = greedy(model, single)
            assert torch.equal(single_tokens[0], tokens[index])
            torch.testing.assert_close(single_logits[:, 0], logits[:, index], atol=1e-4, rtol=0)
            assert session.stats.stages[0].kept_indices[0] == together.stages[0].kept_indices[index]


def test_a_qwen_folder_runs_through_load_and_the_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vlprune.load(<a local Qwen2.5-VL folder>)`` answers a batch of two image sizes as it answers each alone, and
    ``vlprune run --model <folder>`` prints the answer with the statistics."""
    from vlprune.cli import main

    model, processor = build_tiny_qwen2_5_vl()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    images = [make_test_image(seed, 96).resize(SIZES[seed]) for seed in range(2)]
    pipeline = vlprune.load(str(tmp_path / "model"), method="fastv", keep=0.25)
    together = pipeline(images, list(QUESTIONS), max_new_tokens=3)
    singles = [pipeline(image, question, max_new_tokens=3) for image, question in zip(images, QUESTIONS, strict=True)]
    assert together.text == [r.text for r in singles]
    images[0].save(tmp_path / "image.png")
    folder, image = str(tmp_path / "model"), str(tmp_path / "image.png")
    options = ["--method", "fastv", "--keep", "0.25", "--max-new-tokens", "2", "--json"]
    code = main(["run", "--model", folder, "--image", image, "--question", "What?", *options])
    out = capsys.readouterr().out
    assert code == 0 and '"positions": "original"' in out


@pytest.mark.parametrize("family", FAMILIES)
def test_received_attention_is_each_images_last_block_attention_pooled_in_raster_order(family: str) -> None:
    """What HoloV and PTP read on Qwen-VL: the attention each patch receives at the last vision block (a
    full-attention block, image by image, heads and queries averaged), pooled over its 2 x 2 merge group and put
    back from the encoder's window order (Qwen2.5-VL) into the raster order of the language model's tokens.
    Recomputed from the block's own inputs and projections."""
    from vlprune.pruners import Pruner, Selection, Stage, StageContext, StagePlan

    captured = {}

    class ReceivedReader(Pruner):
        name = "received-reader-qwen-test"
        stage = Stage.PRE_LLM

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=None, vision_received_attention=True)]

        def select(self, ctx: StageContext) -> Selection:
            captured.setdefault("received", []).append(ctx.vision_received_attention[0])
            return Selection(keep_index=torch.arange(ctx.num_visual).expand(ctx.batch_size, -1))

    model, processor = qwen_model(family)
    inputs = qwen_inputs(processor, 2)
    maps = last_block_maps(model, inputs, ReceivedReader())
    for image, weights in enumerate(maps):
        expected = to_tokens(model, family, weights.mean(dim=0), inputs["image_grid_thw"][image])
        torch.testing.assert_close(captured["received"][image], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_keys_are_each_images_last_block_keys_pooled_in_raster_order(family: str) -> None:
    """What VisionZip merges by on Qwen-VL: the last vision block's post-RoPE keys, averaged over the heads and each
    merge group, in the raster order of the language model's tokens. Recomputed from the block's own projections."""

    from vlprune.pruners import Pruner, Selection, Stage, StageContext, StagePlan

    captured = []

    class KeyReader(Pruner):
        name = "key-reader-qwen-test"
        stage = Stage.PRE_LLM

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=None, vision_keys=True)]

        def select(self, ctx: StageContext) -> Selection:
            captured.append(ctx.vision_keys)
            return Selection(keep_index=torch.arange(ctx.num_visual).expand(ctx.batch_size, -1))

    model, processor = qwen_model(family)
    inputs = qwen_inputs(processor, 2)
    [(_, key, bounds)] = last_block_projections(model, inputs, KeyReader())
    counts = visual_counts(model, inputs)
    for image, (start, end) in enumerate(bounds):
        per_patch = key[start:end].float().mean(dim=1)  # (n, d), heads averaged
        expected = torch.stack(
            [to_tokens(model, family, column, inputs["image_grid_thw"][image]) for column in per_patch.T], -1
        )
        torch.testing.assert_close(captured[image][0, : counts[image]], expected, atol=1e-5, rtol=1e-4)


def last_block_projections(model, inputs, pruner) -> list[tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]]:
    """Per encoder call (the images', then the videos'), the last vision block's post-RoPE queries and keys
    (patches, H, d) recomputed from the block's own inputs and projections during a pruned forward pass, and each
    chunk's (start, end) patches (an image, or a video's time step)."""
    import sys

    attention = model.model.visual.blocks[-1].attn
    calls = []

    def record(module, args, kwargs) -> None:
        calls.append((args[0] if args else kwargs["hidden_states"], kwargs))

    handle = attention.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with vlprune.attach(model, pruner), torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    module = sys.modules[type(attention).__module__]
    projections = []
    for hidden, kwargs in calls:
        with torch.no_grad():
            query, key, _ = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1).unbind(1)
            query, key = module.apply_rotary_pos_emb_vision(query, key, *kwargs["position_embeddings"])
        projections.append((query, key, list(itertools.pairwise(kwargs["cu_seqlens"].tolist()))))
    return projections


def last_block_maps(model, inputs, pruner) -> list[torch.Tensor]:
    """Each chunk's head-mean attention map at the last vision block (processing order), recomputed."""
    scaling = model.model.visual.blocks[-1].attn.scaling
    maps = []
    for query, key, bounds in last_block_projections(model, inputs, pruner):
        for start, end in bounds:
            q, k = query[start:end].transpose(0, 1), key[start:end].transpose(0, 1)  # (H, n, d)
            maps.append(torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1).mean(dim=0))
    return maps


def to_tokens(model, family: str, per_patch: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per-patch values (processing order) as one value per merged token (the mean of its 2 x 2 patches), in raster
    order (Qwen2.5-VL's window permutation undone)."""
    from transformers.vision_utils import get_vision_window_index

    per_token = per_patch.view(-1, 4).mean(dim=1)
    if family == "qwen2.5-vl":
        visual = model.model.visual
        window_index, _ = get_vision_window_index(grid[None], 2, visual.window_size, visual.patch_size)
        assert not torch.equal(window_index, torch.arange(len(window_index)))
        per_token = per_token[torch.argsort(window_index)]
    return per_token


@pytest.mark.parametrize("family", FAMILIES)
def test_vflowopt_reads_each_images_sink_map_pooled_over_its_merge_groups(family: str) -> None:
    from vlprune.pruners.vflowopt import VFlowOpt, importance_map

    scores = []

    class Recording(VFlowOpt):
        name = "vflowopt-qwen-test"

        def select(self, ctx):
            selection = super().select(ctx)
            if ctx.stage_index == 0:
                scores.append(selection.scores[0])
            return selection

    model, processor = qwen_model(family)
    inputs = qwen_inputs(processor, 2)
    pruner = Recording(keep=0.3)
    maps = last_block_maps(model, inputs, pruner)
    for image, weights in enumerate(maps):
        count = int(visual_counts(model, inputs)[image])
        _, sensitivity, _, _ = pruner.settings(count, len(model.model.language_model.layers))
        importance = importance_map(weights[None], sensitivity)[0]
        expected = to_tokens(model, family, importance, inputs["image_grid_thw"][image])
        torch.testing.assert_close(scores[image], expected, atol=1e-6, rtol=1e-4)


def test_ptp_regions_are_tiles_of_each_images_own_grid() -> None:
    from vlprune.geometry import batch_geometry, single_view
    from vlprune.pruners.ptp import spatial_regions

    geometry = batch_geometry([single_view(4, 6)], [24], torch.device("cpu"))
    regions = spatial_regions(geometry, 0, 4).view(4, 6)
    expected = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2)
    assert torch.equal(regions, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_tokens_features_through_its_projector_give_its_input_embedding(family: str) -> None:
    """What ZOO-Prune perturbs on Qwen-VL: each token's merger input (its 2 x 2 patches, in raster order after
    Qwen2.5-VL's window permutation is undone); the merger as that token's projector gives back the embedding the
    language model received for it."""
    from vlprune.pruners import Pruner, Selection, Stage, StageContext, StagePlan

    checked = []

    class FeatureReader(Pruner):
        name = "feature-reader-qwen-test"
        stage = Stage.PRE_LLM

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=None, vision_features=True)]

        def select(self, ctx: StageContext) -> Selection:
            embedded = ctx.projector(ctx.vision_features)
            torch.testing.assert_close(embedded, ctx.visual_hidden, atol=1e-5, rtol=1e-5)
            checked.append(ctx.num_visual)
            return Selection(keep_index=torch.arange(ctx.num_visual).expand(ctx.batch_size, -1))

    model, processor = qwen_model(family)
    for inputs in (qwen_inputs(processor, 2), video_inputs(processor)):  # two images; an image and a video
        checked.clear()
        with vlprune.attach(model, FeatureReader()), torch.no_grad():
            model(**inputs)
        assert checked == [24, 32]


@pytest.mark.parametrize("family", FAMILIES)
def test_flowcut_prunes_whole_merge_groups_inside_the_encoder_then_cuts_after_layer_one(family: str) -> None:
    """The reference's Qwen2-VL path: 2T tokens (8T patches) leave the encoder, pruned as whole 2 x 2 merge groups
    image by image; the blocks after a cut attend over the kept patches per image (Qwen2.5-VL's windowed blocks:
    within the windows that still hold patches); the stage after language-model layer 1 keeps T."""
    model, processor = qwen_model(family)
    inputs = qwen_inputs(processor, 2)
    counts = visual_counts(model, inputs)
    budgets = [round(0.3 * count) for count in counts]
    merger_rows = []
    merger = model.model.visual.merger

    def record(module, args) -> None:
        merger_rows.append(args[0].shape[0])

    with vlprune.attach(model, create("flowcut", keep=0.3)) as session, torch.no_grad():
        handle = merger.register_forward_pre_hook(record)
        try:
            model(**inputs)
        finally:
            handle.remove()
    first, second = session.stats.stages
    assert first.visual_out_per_sample == [min(2 * t, n) for t, n in zip(budgets, counts, strict=True)]
    assert second.layer == 2 and second.visual_out_per_sample == budgets
    assert merger_rows == [4 * sum(first.visual_out_per_sample)]  # the encoder's output: whole merge groups only


class DropEveryOtherGroup(FlowCut):
    """FlowCut that, after encoder block 0, drops every other merge group of each image (a known cut to check what
    the later blocks attend over), then prunes as FlowCut."""

    name = "flowcut-drop-every-other-group-test"

    def select_in_vision(self, ctx):
        if ctx.layer > 0:
            return super().select_in_vision(ctx)
        groups = ctx.real.view(ctx.real.shape[0], -1, 4).clone()
        groups[:, 1::2] = False
        return groups.view_as(ctx.real)


def test_windowed_blocks_after_a_cut_attend_within_the_windows_that_keep_patches() -> None:
    """After dropping patches inside Qwen2.5-VL's encoder, a windowed block gets one chunk per window that still holds
    patches, each as long as the window's kept patches (here: every other merge group dropped after block 0)."""
    from transformers.vision_utils import get_vision_window_index

    model, processor = qwen_model("qwen2.5-vl")
    inputs = qwen_inputs(processor, 2)
    visual = model.model.visual
    seen = []

    def record(module, args, kwargs) -> None:
        seen.append(kwargs["cu_seqlens"].tolist())

    with vlprune.attach(model, DropEveryOtherGroup(keep=0.2)), torch.no_grad():
        handle = visual.blocks[1].register_forward_pre_hook(record, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    _, windows = get_vision_window_index(inputs["image_grid_thw"], 2, visual.window_size, visual.patch_size)
    windows = torch.as_tensor(windows).unique_consecutive().tolist()
    expected = [0]
    for start, end in itertools.pairwise(windows):
        groups = range(start // 4, end // 4)  # processing-order groups of this window
        kept = sum(4 for group in groups if (group - image_start(group, inputs)) % 2 == 0)
        if kept:
            expected.append(expected[-1] + kept)
    assert 1 not in visual.fullatt_block_indexes and len(expected) > 3  # block 1 is windowed; several windows left
    assert seen == [expected]


def image_start(group: int, inputs) -> int:
    """The first processing-order group of the image that ``group`` belongs to."""
    starts = torch.cumsum(inputs["image_grid_thw"].prod(-1) // 4, 0).tolist()
    return max([0] + [start for start in starts if start <= group])


class CutAfterBlockZero(DropEveryOtherGroup):
    """A cut before the last vision block (the tiny towers' own FlowCut prunes nothing there, their attention being
    nearly flat): after block 0 every other merge group of each image is dropped, and the last block keeps all that
    is left (the budget is that count), so blocks 1 and 2 run on the kept patches alone."""

    name = "flowcut-cut-after-block-zero-test"

    def vision_budget(self, family: str, image_tokens: int, view_patches: int, views: int) -> int:
        return (image_tokens + 1) // 2  # the groups at even places of each image

    def select_in_vision(self, ctx):
        if ctx.layer == 0:
            return super().select_in_vision(ctx)
        return ctx.real if ctx.layer == ctx.feature_layer - 1 else None


def every_other_group(grids: torch.Tensor) -> torch.Tensor:
    """(P,) processing-order indices of the patches of every other merge group of each image (the first kept)."""
    kept, start = [], 0
    for count in grids.prod(-1).tolist():
        groups = torch.arange(0, count // 4, 2)
        kept.append(start + (4 * groups[:, None] + torch.arange(4)).reshape(-1))
        start += count
    return torch.cat(kept)


def tower_on_kept_patches(visual, pixels: torch.Tensor, grids: torch.Tensor, kept: torch.Tensor) -> tuple:
    """The oracle of a cut after block 0: the unpruned tower's block 0 output at the ``kept`` patches, then blocks 1..
    on those patches alone, each with the kept patches' own rotary rows and the chunks (images, windows, time steps)
    the block attends within in the unpruned run, cut to their kept patches. Returns the last block's output and the
    merger's."""
    calls = []

    def record(module, args, kwargs, output) -> None:
        calls.append((kwargs, output))

    handles = [block.register_forward_hook(record, with_kwargs=True) for block in visual.blocks]
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grids)
    finally:
        for handle in handles:
            handle.remove()
    hidden = calls[0][1][kept]
    cos, sin = calls[0][0]["position_embeddings"]
    for block, (kwargs, _) in zip(list(visual.blocks)[1:], calls[1:], strict=True):
        chunk = torch.bucketize(kept, kwargs["cu_seqlens"][1:].long(), right=True)  # the chunk of each kept patch
        lengths = torch.unique_consecutive(chunk, return_counts=True)[1]
        bounds = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        with torch.no_grad():
            hidden = block(
                hidden,
                cu_seqlens=bounds,
                max_seqlen=int(lengths.max()),
                position_embeddings=(cos[kept], sin[kept]),
            )
    with torch.no_grad():
        return hidden, visual.merger(hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_after_a_cut_compute_the_tower_on_the_kept_patches_alone(family: str) -> None:
    """After a cut inside the packed encoder (here after block 0 of 3), the later blocks compute what the tower computes
    on the kept patches alone, with their own rotary rows (taking the first P rows instead changes the logits by
    ~0.07) and their images' (windows') chunks; the merger's tokens land at the kept groups' places."""
    model, processor = qwen_model(family)
    inputs = qwen_inputs(processor, 2)
    visual, pixels, grids = model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"]
    kept = every_other_group(grids)
    expected_hidden, expected_tokens = tower_on_kept_patches(visual, pixels, grids, kept)
    with vlprune.attach(model, CutAfterBlockZero(keep=0.5)), torch.no_grad():
        out = visual(pixels, grid_thw=grids)
    assert out.last_hidden_state.shape[0] == len(kept) < pixels.shape[0]
    # The same blocks on the same inputs: equal to the last bit today. The first P rotary rows differ by 6e-5 to 2e-4
    # in these hidden states (which hold values up to ~0.9) and by 1e-5 to 2e-5 in the merged tokens (up to ~0.08).
    torch.testing.assert_close(out.last_hidden_state, expected_hidden, atol=1e-6, rtol=0)
    units = kept[::4] // 4  # each kept merge group's token among the call's tokens, in processing order
    if family == "qwen2.5-vl":  # the tower returns its tokens in raster order: undo the window permutation
        from transformers.vision_utils import get_vision_window_index

        units = get_vision_window_index(grids, 2, visual.window_size, visual.patch_size)[0][units]
    torch.testing.assert_close(out.pooler_output[units], expected_tokens, atol=1e-6, rtol=0)
    dropped = torch.ones(len(out.pooler_output), dtype=torch.bool)
    dropped[units] = False
    assert not out.pooler_output[dropped].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_videos_received_attention_is_read_time_step_by_time_step(family: str) -> None:
    """On a video the encoder attends one temporal patch at a time; each of its tokens reads the attention its patches
    receive within their own time step (after the image's, in the encoder's order of calls)."""
    from vlprune.pruners import Pruner, Selection, Stage, StageContext, StagePlan

    captured = []

    class ReceivedReader(Pruner):
        name = "received-reader-video-test"
        stage = Stage.PRE_LLM

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=None, vision_received_attention=True)]

        def select(self, ctx: StageContext) -> Selection:
            captured.append(ctx.vision_received_attention[0])
            return Selection(keep_index=torch.arange(ctx.num_visual).expand(ctx.batch_size, -1))

    model, processor = qwen_model(family)
    inputs = video_inputs(processor)
    maps = last_block_maps(model, inputs, ReceivedReader())
    grids = [inputs["image_grid_thw"][0]] + [torch.tensor([1, 8, 8])] * 2  # the image, then the video's two steps
    expected = [to_tokens(model, family, weights.mean(dim=0), grid) for weights, grid in zip(maps, grids, strict=True)]
    torch.testing.assert_close(captured[0], expected[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(captured[1], torch.cat(expected[1:]), atol=1e-6, rtol=1e-4)


def test_after_a_cut_a_videos_time_steps_still_attend_apart() -> None:
    """Qwen2-VL's full-attention blocks attend within an image or within one temporal patch of a video; after patches
    are dropped inside the encoder, the later blocks keep that: one chunk per time step, of its kept patches."""
    model, processor = qwen_model("qwen2-vl")
    inputs = video_inputs(processor)
    seen = []

    def record(module, args, kwargs) -> None:
        seen.append(kwargs["cu_seqlens"].tolist())

    with vlprune.attach(model, DropEveryOtherGroup(keep=0.2)), torch.no_grad():
        handle = model.model.visual.blocks[1].register_forward_pre_hook(record, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    # The image: 24 groups -> 12 kept; the video: two steps of 16 groups each -> every other group of the video's 32.
    assert seen == [[0, 48], [0, 32, 64]]


def test_sweep_and_bench_run_on_a_qwen_folder(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vlprune sweep`` and ``vlprune bench --model <a local Qwen2-VL folder>``: every cell is measured pruned (fewer
    tokens and FLOPs, the family's original positions); bench prints its timing table."""
    import json

    from vlprune.cli import main

    model, processor = build_tiny_qwen2_vl()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--model",
            str(folder),
            "--dataset",
            "shapes",
            "--split",
            "test",
            "--limit",
            "2",
            "--methods",
            "fastv,holov",
            "--keep",
            "0.25",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    pruned = [row for row in rows if row["method"] != "none"]
    assert {row["method"] for row in pruned} == {"fastv", "holov"} and len(pruned) == 4  # two samples each
    assert all(row["positions"] == "original" and row["flops_ratio"] < 1 for row in pruned)
    unpruned = {row["visual_tokens"] for row in rows if row["method"] == "none"}
    assert len(unpruned) == 1 and all(row["equivalent_visual_tokens"] < min(unpruned) for row in pruned)
    capsys.readouterr()
    code = main(
        ["bench", "--model", str(folder), "--method", "fastv", "--keep", "0.25", "--warmup", "0", "--repeats", "1"]
    )
    assert code == 0 and "fastv" in capsys.readouterr().out


def test_statistics_count_each_samples_real_tokens_and_each_layers_cache() -> None:
    """FLOPs from each sample's own real counts (a ragged batch keeps 25% of each sample's tokens) and the KV cache's
    lengths and bytes per layer, against hand computations from the tiny model's shape."""
    model, processor = qwen_model("qwen2.5-vl")
    inputs = qwen_inputs(processor, 2)
    counts, real = visual_counts(model, inputs), inputs["attention_mask"].sum(1).tolist()
    length = inputs["input_ids"].shape[1]
    text = model.config.text_config
    hidden, ffn, heads, kv_heads = text.hidden_size, text.intermediate_size, text.num_attention_heads, 2
    head_dim = hidden // heads

    def hand_layer_flops(n: int) -> int:
        projections = 2 * (2 * n * hidden * heads * head_dim) + 2 * (2 * n * hidden * kv_heads * head_dim)
        return projections + 2 * (2 * n * n * heads * head_dim) + 3 * (2 * n * hidden * ffn)

    with vlprune.attach(model, create("fastv", keep=0.25, layer=2)) as session:
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    stats = session.stats
    kept = [int(0.25 * count) for count in counts]
    assert counts[0] != counts[1] and stats.visual_tokens_per_sample == counts
    assert stats.stages[0].visual_out_per_sample == kept
    pruned_real = [r - c + k for r, c, k in zip(real, counts, kept, strict=True)]
    assert stats.prefill_flops == sum(2 * hand_layer_flops(n) for n in real + pruned_real)
    assert stats.unpruned_prefill_flops == sum(4 * hand_layer_flops(n) for n in real)
    # Layers 0-1 cache the whole padded prompt; after the stage, padding included, the batch is as long as its
    # longest pruned sample (the shorter one is left-filled).
    pruned_length = max(length - c + k for c, k in zip(counts, kept, strict=True))
    assert stats.kv_cache_lengths == [length, length, pruned_length, pruned_length]
    bytes_per_token = 2 * 2 * kv_heads * head_dim * torch.tensor([], dtype=model.dtype).element_size()
    assert stats.kv_cache_bytes == bytes_per_token * (2 * length + 2 * pruned_length)
