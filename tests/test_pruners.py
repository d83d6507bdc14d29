"""Each baseline selects what its definition says, checked against references computed from eager attention weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICE, MODEL_KINDS, tiny_inputs, tiny_model

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners import StageContext
from vlprune.testing import make_test_image


def kept_with(model, inputs, method: str, **options) -> list[list[int]]:
    with vlprune.attach(model, vlprune.pruners.create(method, **options)) as session:
        model(**inputs)
    return session.stats.stages[0].kept_indices


def top_sorted(scores: torch.Tensor, k: int) -> list[list[int]]:
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values.tolist()


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_keeps_what_the_last_token_attends_to_most(vision: str, kv_heads: int, layer: int) -> None:
    """Reference: FastV's definition on eager attention weights of layer K - 1 (last row, head mean, visual columns)."""
    model, processor = tiny_model(vision, kv_heads, attn="eager")
    inputs = tiny_inputs(processor, 2)
    weights = model(**inputs, output_attentions=True).attentions[layer - 1]  # (B, H, L, L)
    last_row = weights[:, :, -1, :].mean(dim=1)  # (B, L)
    visual = inputs["input_ids"] == model.config.image_token_id
    scores = torch.stack([last_row[b, visual[b]] for b in range(2)])
    expected = top_sorted(scores, 10)
    assert kept_with(model, inputs, "fastv", keep=10, layer=layer) == expected
    # SDPA computes the same rows without attention weights.
    sdpa_model, _ = tiny_model(vision, kv_heads, attn="sdpa")
    assert kept_with(sdpa_model, inputs, "fastv", keep=10, layer=layer) == expected


@pytest.mark.parametrize("vision", ["clip", "dinov2"])
def test_fastervlm_keeps_what_the_cls_token_attends_to_most(vision: str) -> None:
    """Reference: [CLS] row of the eager attention at the vision feature layer (-2), head mean, patches only."""
    model, processor = tiny_model(vision, 2, attn="eager")
    inputs = tiny_inputs(processor, 2)
    tower = model.model.vision_tower
    attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    feature_layer = model.config.vision_feature_layer  # -2: the output of the second-to-last layer
    cls_row = attentions[feature_layer][:, :, 0, :].mean(dim=1)  # attentions[i] is layer i, hidden_states[i + 1]
    expected = top_sorted(cls_row[:, 1:], 12)  # LLaVA drops [CLS] before the projector
    assert kept_with(model, inputs, "fastervlm", keep=12) == expected


def test_fastervlm_reads_the_feature_layer_not_the_last() -> None:
    model, processor = tiny_model("clip", 2, attn="eager")
    inputs = tiny_inputs(processor, 1)
    attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    last_layer = top_sorted(attentions[-1][:, :, 0, 1:].mean(dim=1), 12)
    feature = top_sorted(attentions[-2][:, :, 0, 1:].mean(dim=1), 12)
    assert last_layer != feature  # otherwise this test could not tell the layers apart
    assert kept_with(model, inputs, "fastervlm", keep=12) == feature


def test_random_is_seeded_and_batch_invariant() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 2)
    first = kept_with(model, inputs, "random", keep=16, seed=1)
    assert first == kept_with(model, inputs, "random", keep=16, seed=1)
    assert first != kept_with(model, inputs, "random", keep=16, seed=2)
    assert first[0] == first[1] and len(first[0]) == 16 and len(set(first[0])) == 16
    assert all(0 <= i < 64 for i in first[0])


def test_keep_fraction_and_count_agree() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 1)
    assert kept_with(model, inputs, "fastv", keep=0.25) == kept_with(model, inputs, "fastv", keep=16)


def test_fastv_select_on_a_hand_built_context() -> None:
    attention = torch.tensor([[[0.1, 0.5, 0.05, 0.3, 0.05]]])  # (B=1, R=1, N=5)
    ctx = StageContext(
        layer=2,
        keep=2,
        visual_hidden=torch.zeros(1, 5, 8),
        visual_positions=torch.arange(5)[None],
        visual_origin=torch.arange(5)[None],
        query_attention=attention,
    )
    selection = vlprune.pruners.create("fastv", keep=2).select(ctx)
    assert selection.keep_index.tolist() == [[1, 3]]


def test_fastervlm_select_on_a_hand_built_context() -> None:
    ctx = StageContext(
        layer=0,
        keep=3,
        visual_hidden=torch.zeros(2, 4, 8),
        visual_positions=torch.arange(4).expand(2, -1),
        visual_origin=torch.arange(4).expand(2, -1),
        vision_cls_attention=torch.tensor([[0.4, 0.1, 0.2, 0.3], [0.0, 0.9, 0.05, 0.05]]),
    )
    selection = vlprune.pruners.create("fastervlm", keep=3).select(ctx)
    assert selection.keep_index.tolist()[0] == [0, 2, 3]
    assert selection.keep_index.tolist()[1][:2] == [1, 2] or selection.keep_index.tolist()[1][:2] == [1, 3]


def test_fastervlm_with_two_images_per_sample() -> None:
    """Each sample's visual tokens are its images' patches in prompt order; scores must follow the same order."""
    model, processor = tiny_model("clip", 2, attn="eager")
    prompts = ["USER: <image>\n<image>\nWhich is red? ASSISTANT:", "USER: <image>\nAnd <image>\nHow many? ASSISTANT:"]
    images = [make_test_image(seed) for seed in range(4)]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(DEVICE)
    attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    cls_rows = attentions[model.config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)  # (4 images, 64)
    expected = top_sorted(cls_rows.reshape(2, 128), 40)
    assert kept_with(model, inputs, "fastervlm", keep=40) == expected


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
def test_pyramiddrop_first_stage_keeps_what_the_last_token_attends_to_most_at_its_own_layer(
    vision: str, kv_heads: int
) -> None:
    """Reference: the eager attention of the stage's own layer (not the one before), last row, head mean."""
    model, processor = tiny_model(vision, kv_heads, attn="eager", layers=8)
    inputs = tiny_inputs(processor, 2)
    pruner = vlprune.pruners.create("pyramiddrop", layers=[8, 16, 24], ratios=[0.5, 0.25, 0.125])
    weights = model(**inputs, output_attentions=True).attentions[2]  # layer 8 of 32 is layer 2 of 8
    last_row = weights[:, :, -1, :].mean(dim=1)
    visual = inputs["input_ids"] == model.config.image_token_id
    expected = top_sorted(torch.stack([last_row[b, visual[b]] for b in range(2)]), 32)
    with vlprune.attach(model, pruner) as session:
        model(**inputs)
    assert [s.layer for s in session.stats.stages] == [2, 4, 6]
    assert [s.visual_out for s in session.stats.stages] == [32, 16, 8]
    assert session.stats.stages[0].kept_indices == expected
    sdpa_model, _ = tiny_model(vision, kv_heads, attn="sdpa", layers=8)
    assert kept_with(sdpa_model, inputs, "pyramiddrop", layers=[8, 16, 24], ratios=[0.5, 0.25, 0.125]) == expected


def test_pyramiddrop_budgets_reproduce_the_layer_average() -> None:
    from vlprune.pruners.pyramiddrop import geometric_ratio, layer_average, stage_floor

    # The maintainer's 64-token recipe (issue #29): layers 2, 8, 16 and λ = 0.19.
    assert round(geometric_ratio(576, 64, [2, 8, 16], 32), 2) == 0.19
    assert [round(geometric_ratio(576, k, [2, 8, 16], 32), 3) for k in (192, 128, 64)] == [0.560, 0.420, 0.192]
    assert vlprune.pruners.create("pyramiddrop", keep=64).schedule(576, 32) == ([2, 8, 16], [110, 21, 4])
    # The floor: no stage keeps fewer than ceil(N / 144) tokens, so LLaVA's 11.1% never ends in one token.
    assert stage_floor(576) == 4 and stage_floor(256) == 2
    for num_visual, keep in ((576, 0.111), (256, 0.111), (256, 0.08)):
        layers, counts = vlprune.pruners.create("pyramiddrop", keep=keep).schedule(num_visual, 32)
        assert min(counts) >= stage_floor(num_visual)
        assert abs(layer_average(num_visual, layers, counts, 32) - round(keep * num_visual)) < 1.5
    pruner = vlprune.pruners.create("pyramiddrop")
    layers, counts = pruner.schedule(576, 32)
    assert (layers, counts) == ([8, 16, 24], [288, 144, 72])
    assert layer_average(576, layers, counts, 32) == 270
    layers, counts = vlprune.pruners.create("pyramiddrop", keep=128).schedule(576, 32)
    assert abs(layer_average(576, layers, counts, 32) - 128) < 1.5  # int() per stage, as the reference
    with pytest.raises(VlpruneError, match="keep=100"):
        vlprune.pruners.create("pyramiddrop", keep=100, layers=[8, 16, 24]).schedule(576, 32)


def test_sparsevlm_raters_are_the_text_tokens_most_relevant_to_the_image() -> None:
    from vlprune.pruners.sparsevlm import select_raters

    visual = torch.tensor([[[1.0, 0.0], [0.9, 0.1]]])  # both visual tokens point along the first axis
    text = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 0.0]]])  # 0 and 2 align with the image
    mask = torch.tensor([[True, True, True, False]])  # the last text slot is padding
    assert select_raters(visual, text, mask).tolist() == [[True, False, True, False]]


def test_sparsevlm_density_peak_clustering_merges_each_group_into_its_mean() -> None:
    from vlprune.pruners.sparsevlm import density_peak_merge

    group_a = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    group_b = torch.tensor([[5.0, 5.0], [5.2, 5.0], [5.0, 5.2]])
    tokens = torch.cat([group_a, group_b])[None]
    merged, centres = density_peak_merge(tokens, 2)
    means = sorted([group_a.mean(0).tolist(), group_b.mean(0).tolist()])
    got = sorted(merged[0].tolist())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(means))
    assert {int(c) < 4 for c in centres[0]} == {True, False}  # one centre in each group


def test_sparsevlm_distances_are_exact_differences_with_a_zero_diagonal() -> None:
    """The reference takes ``(x1 - x2).norm(-1)``; cdist's matrix-product path leaves a non-zero diagonal on wide
    tokens of large norm, which changes densities."""
    from vlprune.pruners.sparsevlm import pairwise_distance

    tokens = 3 * torch.randn(2, 154, 576, generator=torch.Generator().manual_seed(0))
    distance = pairwise_distance(tokens)
    assert torch.equal(distance.diagonal(dim1=1, dim2=2), torch.zeros(2, 154))
    assert torch.cdist(tokens, tokens).diagonal(dim1=1, dim2=2).abs().max() > 1e-4  # the shortcut's error
    explicit = (tokens[:, :, None] - tokens[:, None]).norm(dim=-1)
    torch.testing.assert_close(distance, explicit, atol=1e-4, rtol=1e-5)


def test_sparsevlm_first_stage_keeps_what_the_raters_attend_to_at_the_pruning_layer() -> None:
    """Reference: raters from the input embeddings, eager attention of the layer before the stage, rater rows, head
    mean, then the mean over raters; top-k in original order."""
    from vlprune.pruners.sparsevlm import select_raters

    model, processor = tiny_model("clip", 4, attn="eager")
    inputs = tiny_inputs(processor, 2)
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    pruner = vlprune.pruners.create("sparsevlm", keep=0.3, recycle=False)
    first = pruner.plan(64, 4)[0]
    weights = out.attentions[first.layer - 1].mean(dim=1)  # (B, L, L)
    visual = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    expected = []
    for b in range(2):
        after = torch.arange(visual.shape[1]) > visual[b].nonzero()[0, 0]
        text = (real[b] & ~visual[b] & after).nonzero()[:, 0]
        embeddings = out.hidden_states[0][b]
        raters = select_raters(
            embeddings[visual[b]][None], embeddings[text][None], torch.ones(1, len(text), dtype=bool)
        )
        rows = text[raters[0]]
        relevance = weights[b][rows][:, visual[b]].mean(dim=0)
        expected.append(sorted(torch.topk(relevance, first.keep).indices.tolist()))
    with vlprune.attach(model, pruner) as session:
        model(**inputs)
    assert session.stats.stages[0].kept_indices == expected


def test_sparsevlm_recycles_the_most_relevant_pruned_tokens_into_clusters() -> None:
    model, processor = tiny_model("dinov2", 2)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create("sparsevlm", keep=0.3)) as session:
        model(**inputs)
    visual_in = 64
    for stage in session.stats.stages:
        pruned = stage.visual_in - (stage.visual_out - stage.recycled)
        assert stage.recycled == int((int(0.3 * pruned) + 1) / 10) + 1
        assert stage.visual_in == visual_in
        visual_in = stage.visual_out
    assert session.stats.stages[-1].visual_out < 64


def test_sparsevlm_plus_gravity_is_the_rope_logit_of_all_ones_vectors() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vlprune.pruners.sparsevlm import rope_gravity

    model, _ = tiny_model("clip", 4)
    rotary_module = model.model.language_model.rotary_emb
    probe = torch.zeros(1, 1, model.config.text_config.hidden_size)

    def rotary(positions: torch.Tensor):
        return rotary_module(probe, positions)

    queries, keys = torch.tensor([[40, 41]]), torch.tensor([[3, 10, 39]])
    gravity = rope_gravity(rotary, queries, keys)
    dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    ones_q, ones_k = torch.ones(1, 1, 2, dim), torch.ones(1, 1, 3, dim)
    rotated_q, _ = apply_rotary_pos_emb(ones_q, ones_q, *rotary(queries))
    _, rotated_k = apply_rotary_pos_emb(ones_k, ones_k, *rotary(keys))
    expected = (rotated_q @ rotated_k.transpose(-1, -2))[0, 0] / dim**0.5
    torch.testing.assert_close(gravity[0], expected, atol=1e-5, rtol=1e-5)
    # Only the distance matters.
    torch.testing.assert_close(rope_gravity(rotary, queries + 7, keys + 7), gravity, atol=1e-4, rtol=1e-4)


def test_sparsevlm_plus_reads_the_priority_heads() -> None:
    from vlprune.pruners.sparsevlm import priority_head_relevance

    attention = torch.full((1, 4, 2, 5), 0.01)  # (B, H, T, N)
    attention[0, 2, :, 3] = 0.9  # head 2 looks at token 3, and has the most rater-to-visual attention
    attention[0, 0, :, 1] = 0.2
    raters = torch.tensor([[True, True]])
    relevance = priority_head_relevance(attention, raters, torch.ones(1, 2, 5), heads=1)
    assert int(relevance.argmax()) == 3
    torch.testing.assert_close(relevance[0, 3], torch.tensor(0.9))
    with pytest.raises(VlpruneError, match="recycle"):
        vlprune.pruners.create("sparsevlm", keep=64, version=2, recycle=True)


@pytest.mark.parametrize(
    "method,options", [("pyramiddrop", {"keep": 16}), ("sparsevlm", {"keep": 16}), ("vflowopt", {"keep": 16})]
)
def test_budgeted_multi_stage_methods_attach_before_the_token_count_is_known(method: str, options: dict) -> None:
    """``attach`` without ``num_visual`` asks the plan for its layers only; the budget is resolved at the prefill."""
    model, processor = tiny_model("clip", 4, layers=32)
    inputs = tiny_inputs(processor, 1)
    with vlprune.attach(model, vlprune.pruners.create(method, **options)) as session:
        model(**inputs)
    assert abs(session.stats.equivalent_visual_tokens - 16) < 4  # the layer-averaged budget


def test_ptp_budgets_regions_by_saliency_and_fuses_instruction_relevance() -> None:
    from vlprune.pruners.ptp import instruction_relevance, region_quotas

    # 4 x 4 tokens, 2 x 2 regions of 4: the top-left region (tokens 0, 1, 4, 5) is three times as salient.
    received = torch.full((1, 16), 1.0)
    received[0, [0, 1, 4, 5]] = 3.0
    region_of = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    assert region_quotas(received, region_of, keep=6).tolist() == [[3, 1, 1, 1]]
    rows = torch.tensor([[[0.1] * 16, [0.0] * 16]])
    rows[0, 1, 9] = 0.9  # the second instruction token looks at token 9
    valid = torch.tensor([[True, True]])
    assert int(instruction_relevance(rows, valid).argmax()) == 9
    ctx = StageContext(
        layer=3,
        keep=6,
        visual_hidden=torch.zeros(1, 16, 4),
        visual_positions=torch.arange(16)[None],
        visual_origin=torch.arange(16)[None],
        query_attention=rows,
        query_mask=valid,
        vision_received_attention=received / 16,
    )
    kept = vlprune.pruners.create("ptp", keep=6).select(ctx).keep_index[0].tolist()
    # Region 0 keeps 3 of its 4 equally salient tokens (ties to the lowest index), region 2 its instruction-relevant
    # token 9, regions 1 and 3 their first token.
    assert kept == [0, 1, 2, 4, 9, 10]


def test_sparsevlm_rank_rule_counts_from_the_rank_of_the_raters_attention() -> None:
    # Seven rater rows over 64 visual tokens, of rank 5 (two rows repeat others): 64 of 576 -> (scale 0.8, bias 0),
    # int(5 x 0.8) = 4 tokens; 192 of 576 -> (13.5, 0): min(67, 63) = 63.
    torch.manual_seed(0)
    rows = torch.rand(5, 64)
    attention = torch.cat([rows, rows[:2] * 2])[None]  # (1, 7, 64)
    raters = torch.ones(1, 7, dtype=torch.bool)
    ctx = StageContext(
        layer=3,
        keep=64,
        visual_hidden=torch.zeros(1, 64, 4),
        visual_positions=torch.arange(64)[None],
        visual_origin=torch.arange(64)[None],
        query_attention=attention,
    )
    assert vlprune.pruners.create("sparsevlm", keep=64 / 576, rule="rank").rank_count(ctx, raters) == 4
    assert vlprune.pruners.create("sparsevlm", keep=192 / 576, rule="rank").rank_count(ctx, raters) == 63
    with pytest.raises(VlpruneError, match="rank rule"):
        vlprune.pruners.create("sparsevlm", keep=64, rule="rank", version=2)


def test_sparsevlm_rank_rule_runs_its_four_stages_with_the_budget_of_the_original_tokens() -> None:
    model, processor = tiny_model("clip", 4, layers=32)
    inputs = tiny_inputs(processor, 1)
    with vlprune.attach(model, vlprune.pruners.create("sparsevlm", keep=16, rule="rank")) as session:
        model(**inputs)
    stages = session.stats.stages
    assert [s.layer for s in stages] == [3, 7, 16, 20]
    assert all(later.visual_in == earlier.visual_out for earlier, later in itertools.pairwise(stages))


def test_sparsevlm_recycles_the_most_relevant_pruned_share_at_its_centres_position(monkeypatch) -> None:
    """30 visual tokens, 10 kept: of the 20 pruned, the int(0.3 · 20) + 1 = 7 most relevant are merged into
    int(7 / 10) + 1 = 1 token, their mean. With one cluster every density ties (the k = 1 nearest neighbour is the
    token itself), so the first in relevance order is the density peak: the merged token takes the RoPE position of
    the most relevant pruned token."""
    import vlprune.pruners.sparsevlm as sparsevlm

    monkeypatch.setattr(sparsevlm, "select_raters", lambda visual, text, mask: mask)  # every text token rates
    generator = torch.Generator().manual_seed(0)
    relevance = torch.randperm(30, generator=generator).float()[None] / 30  # distinct, in a shuffled order
    hidden = torch.randn(1, 30, 8, generator=generator)
    positions = 100 + 3 * torch.arange(30)[None]  # not the indices, so a position cannot pass for an index
    ctx = StageContext(
        layer=2,
        keep=10,
        visual_hidden=hidden,
        visual_positions=positions,
        visual_origin=torch.arange(30)[None],
        query_attention=relevance[:, None, :].expand(1, 2, 30),  # two rater rows, the same relevance
        query_mask=torch.ones(1, 2, dtype=torch.bool),
        initial_visual_hidden=hidden,
        initial_text_hidden=torch.randn(1, 2, 8, generator=generator),
        initial_text_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    selection = vlprune.pruners.create("sparsevlm", keep=0.3, schedule=[10, 8, 6]).select(ctx)
    order = relevance[0].argsort(descending=True)
    assert selection.keep_index[0].tolist() == sorted(order[:10].tolist())
    merged_from = order[10:17]  # the 7 most relevant of the pruned
    assert selection.recycled is not None and selection.recycled.hidden.shape == (1, 1, 8)
    torch.testing.assert_close(selection.recycled.hidden[0, 0], hidden[0, merged_from].mean(dim=0))
    assert selection.recycled.positions.tolist() == [[int(positions[0, order[10]])]]


def test_sparsevlm_merged_tokens_keep_their_centres_positions_through_the_later_stages() -> None:
    """With original positions, the layers after the first stage see the kept tokens at their own positions and each
    merged token at its centre's (its rotary cos/sin), and the next stage scores the merged tokens as visual ones."""
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 1)
    pruner = vlprune.pruners.create("sparsevlm", keep=0.3)
    selections, seen = [], {}
    select = pruner.select

    def recording(ctx):
        selection = select(ctx)
        selections.append((ctx, selection))
        return selection

    pruner.select = recording
    with vlprune.attach(model, pruner, positions="original") as session:
        first_layer = session.pruner.plan(64, 4)[0].layer
        layer = model.model.language_model.layers[first_layer]
        hook = layer.register_forward_pre_hook(
            lambda _, args, kwargs: seen.update(cos=kwargs["position_embeddings"][0]), with_kwargs=True
        )
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
    ctx, selection = selections[0]
    assert selection.recycled is not None and selection.recycled.positions.shape[1] >= 1
    kept_positions = torch.gather(ctx.visual_positions, 1, selection.keep_index.sort(dim=-1).values)
    visual_positions = torch.cat([kept_positions, selection.recycled.positions], dim=1)[0]
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0])
    expected = torch.cat(
        [torch.arange(start), visual_positions, torch.arange(start + 64, inputs["input_ids"].shape[1])]
    )
    probe = torch.zeros(1, 1, model.config.text_config.hidden_size)
    cos, _ = model.model.language_model.rotary_emb(probe, expected[None])
    torch.testing.assert_close(seen["cos"][0], cos[0])
    # The merged tokens are visual tokens of the next stage: it sees kept + merged, flagged as recycled (origin -1).
    second_ctx, _ = selections[1]
    recycled = selection.recycled.positions.shape[1]
    assert second_ctx.num_visual == selection.keep_index.shape[1] + recycled
    assert (second_ctx.visual_origin[0, -recycled:] == -1).all()
    torch.testing.assert_close(second_ctx.visual_positions[0], visual_positions)
