"""Pre-LLM pruners on hand-built inputs whose right selection is known, and end to end on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from torch import nn

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners import StageContext
from vlprune.pruners.divprune import cosine_distance, greedy_max_min
from vlprune.pruners.groups import crop_quotas, strip_crops, tile_crops
from vlprune.pruners.holov import reference_crop_count
from vlprune.pruners.visionzip import contextual_centres, merge_contextual
from vlprune.pruners.zoo_prune import random_directions, zeroth_order_sensitivity


def context(hidden: torch.Tensor, keep: int, **fields) -> StageContext:
    batch, count = hidden.shape[:2]
    positions = torch.arange(count).expand(batch, -1)
    return StageContext(
        layer=0, keep=keep, visual_hidden=hidden, visual_positions=positions, visual_origin=positions, **fields
    )


def on_circle(degrees: list[float]) -> torch.Tensor:
    """(1, N, 2) unit vectors at the given angles: cosine distances are known in closed form."""
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None].float()


# ---------------------------------------------------------------------------------------------- DivPrune


def test_divprune_starts_from_the_most_isolated_token_and_spreads_out() -> None:
    # 90 degrees is furthest from its nearest neighbour (70 degrees away); then 185 (95 degrees from 90), then 0
    # (1 - cos 90 = 1 from both chosen ones beats 10 degrees: min(1 - cos 80, 1 - cos 175)).
    features = on_circle([0, 10, 20, 90, 180, 185])
    selection = vlprune.pruners.create("divprune", keep=3).select(context(features, 3))
    assert selection.keep_index.tolist() == [[0, 3, 5]]
    assert int(selection.scores.argmax()) == 3


def test_divprune_never_keeps_a_duplicate_while_distinct_tokens_remain() -> None:
    basis = torch.eye(4)
    features = torch.cat([basis, basis[:1].expand(3, -1), basis[1:2].expand(2, -1)])[None]  # e1 x4, e2 x3, e3, e4
    selection = vlprune.pruners.create("divprune", keep=4).select(context(features, 4))
    chosen = features[0, selection.keep_index[0]]
    assert torch.equal(chosen.sum(dim=0), torch.ones(4))  # one of each direction


def test_greedy_max_min_follows_weights_and_distances() -> None:
    distance = cosine_distance(on_circle([0, 1, 2, 180]))
    # Unweighted from token 0: token 3 (opposite), then token 1 or 2 (1 - cos 1 < 1 - cos 2: token 2 is further).
    assert greedy_max_min(distance, torch.tensor([0]), 3).tolist() == [[0, 3, 2]]
    # A zero weight on the opposite token hides it.
    weights = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert greedy_max_min(distance, torch.tensor([0]), 3, weights).tolist()[0][:2] == [0, 2]


def reference_divprune(features: torch.Tensor, keep: int, exclude_chosen: bool = True) -> list[int]:
    """DivPrune's official loop (``llava_arch.py``) on (N, D) features, in their dtype: ``x / ||x||``, one matrix
    product, ``1 - cos``; the first token maximises its second-smallest distance, each next one its smallest distance
    to the chosen ones."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - torch.mm(unit, unit.t())
    chosen: list[int] = []
    for step in range(keep):
        if step == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(distance[torch.tensor(chosen)], dim=0).values
            if exclude_chosen:  # vlprune's one deviation: the reference may pick a token twice (see DivPrune's doc)
                scores[torch.tensor(chosen)] = float("-inf")
        chosen.append(int(torch.argmax(scores)))
    return sorted(chosen)


def near_ties(seed: int) -> torch.Tensor:
    """(1, 48, 16) float16 features in 6 tight clusters: many distances differ only in their last bits."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 16, generator=generator)
    return (centres.repeat(8, 1) + 0.02 * torch.randn(48, 16, generator=generator)).half()[None]


def test_divprune_in_float16_selects_what_the_float16_reference_selects() -> None:
    differs = repeats = 0
    for seed in range(12):
        features = near_ties(seed)
        expected = reference_divprune(features[0], 12)
        selection = vlprune.pruners.create("divprune", keep=12).select(context(features, 12))
        assert selection.keep_index[0].tolist() == expected, seed
        in_float32 = vlprune.pruners.create("divprune", keep=12, float32=True).select(context(features, 12))
        differs += in_float32.keep_index[0].tolist() != expected
        repeats += len(set(reference_divprune(features[0], 12, exclude_chosen=False))) < 12
    assert differs > 0, "near-ties in float16 must change some selection, or the test shows nothing"
    assert repeats > 0, "the reference's float16 diagonal lets it choose a token twice on these inputs"


def test_divprune_in_float32_selects_what_the_reference_selects_in_float32() -> None:
    features = near_ties(0).float()
    selection = vlprune.pruners.create("divprune", keep=12, float32=True).select(context(features.half(), 12))
    assert selection.keep_index[0].tolist() == reference_divprune(features.half().float()[0], 12)


# ---------------------------------------------------------------------------------------------- ZOO-Prune


def test_zeroth_order_sensitivity_of_a_linear_projector_is_the_exact_directional_norm() -> None:
    torch.manual_seed(0)
    projector = nn.Linear(6, 5)
    features = torch.randn(2, 7, 6)
    directions = random_directions(16, 6, seed=3)
    expected = (directions @ projector.weight.T).norm(dim=-1).mean()  # ||J u|| with J = W for every token
    sensitivity = zeroth_order_sensitivity(projector, features, directions, step=0.01)
    torch.testing.assert_close(sensitivity, expected.expand(2, 7), rtol=1e-4, atol=1e-5)


def test_zeroth_order_sensitivity_matches_exact_jacobian_vector_products() -> None:
    torch.manual_seed(1)
    projector = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5))
    features = torch.randn(1, 9, 6) * 2
    directions = random_directions(32, 6, seed=0)
    exact = torch.stack(
        [torch.stack([torch.func.jvp(projector, (x,), (u,))[1].norm() for u in directions]).mean() for x in features[0]]
    )
    sensitivity = zeroth_order_sensitivity(projector, features, directions, step=0.01)[0]
    torch.testing.assert_close(sensitivity, exact, rtol=1e-3, atol=1e-4)
    assert sensitivity.std() > 0.05 * sensitivity.mean()  # the tokens differ, so the comparison means something


def test_zeroth_order_sensitivity_runs_in_float32_for_a_bfloat16_projector() -> None:
    torch.manual_seed(2)
    projector = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    features = torch.randn(1, 5, 8)
    directions = random_directions(8, 8, seed=0)
    full = zeroth_order_sensitivity(projector, features, directions, 0.01)
    half = zeroth_order_sensitivity(projector.to(torch.bfloat16), features.bfloat16(), directions, 0.01)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)  # only the weights' rounding differs


def test_zoo_prune_starts_from_the_most_sensitive_token() -> None:
    # Projector x -> x * x (elementwise): J = 2 diag(x), so the token with the largest entries is the most sensitive.
    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    features = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [2.0, 2.0], [0.5, 0.5]]])
    hidden = on_circle([0, 90, 45, 180])  # token 1 sensitive, token 3 far from it in the projected space
    pruner = vlprune.pruners.create("zoo-prune", keep=2, directions=16)
    selection = pruner.select(context(hidden, 2, vision_features=features, projector=Square()))
    assert int(selection.scores.argmax()) == 1
    # Ŝ: token 3 has the lowest sensitivity (weight 0), so the second pick is token 0 (weight 0.2, distance 1).
    assert selection.keep_index.tolist() == [[0, 1]]


def test_zoo_prune_is_deterministic_under_its_seed() -> None:
    projector = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    features, hidden = torch.randn(1, 20, 4), torch.randn(1, 20, 4)
    runs = [
        vlprune.pruners.create("zoo-prune", keep=5, seed=seed).select(
            context(hidden, 5, vision_features=features, projector=projector)
        )
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0].scores, runs[1].scores) and torch.equal(runs[0].keep_index, runs[1].keep_index)
    assert not torch.equal(runs[0].scores, runs[2].scores)


@pytest.mark.parametrize("options", [{"directions": 0}, {"directions": 2.5}, {"step": 0}, {"step": -1e-3}])
def test_zoo_prune_rejects_bad_options(options: dict) -> None:
    with pytest.raises(VlpruneError, match=next(iter(options))):
        vlprune.pruners.create("zoo-prune", keep=4, **options)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["divprune", "zoo-prune"])
@pytest.mark.parametrize("vision,text", [("clip", "llama"), ("dinov2", "llama"), ("siglip", "qwen2")])
def test_exactly_keep_tokens_reach_the_language_model(method: str, vision: str, text: str) -> None:
    model, processor = tiny_model(vision, 2, text=text)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create(method, keep=9)) as session:
        model(**inputs)
    stage = session.stats.stages[0]
    assert stage.layer == 0 and stage.visual_out == 9
    assert [len(row) for row in stage.kept_indices] == [9, 9]
    assert session.stats.visual_tokens_per_layer == [9] * len(model.model.language_model.layers)


# ---------------------------------------------------------------------------------------------- HoloV


def test_holov_crop_count_follows_the_reference_rule() -> None:
    assert [reference_crop_count(576, keep) for keep in (64, 128, 192)] == [16, 8, 5]


def test_holov_strips_put_the_remainder_in_the_first_crops() -> None:
    assert strip_crops(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_holov_tiles_cut_the_grid_into_rectangles() -> None:
    expected = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert tile_crops(16, 4).view(4, 4).tolist() == expected
    with pytest.raises(VlpruneError, match="square"):
        tile_crops(15, 4)


def test_holov_budgets_crops_by_attention_and_keeps_their_most_attended_tokens() -> None:
    # Crop means 0.5 / 0.25 / 0.15 / 0.1: quotas floor(w * 4) = 2, 1, 0, 0 and the remainder to crop 0.
    attention = torch.tensor([[0.1, 0.9, 0.6, 0.4, 0.25, 0.2, 0.3, 0.25] + [0.15] * 4 + [0.1] * 4])
    features = torch.randn(1, 16, 8)
    pruner = vlprune.pruners.create("holov", keep=4, crops=4)
    selection = pruner.select(context(features, 4, vision_cls_attention=attention))
    assert selection.keep_index.tolist() == [[1, 2, 3, 6]]


def test_holov_hands_a_full_crops_excess_to_the_others_instead_of_padding() -> None:
    weights = torch.tensor([[0.94, 0.03, 0.02, 0.01]])
    quota = crop_quotas(weights, torch.tensor([4, 4, 4, 4]), keep=8)
    # Crop 0 would take 8 > 4; its extra 4 go to the others by weight: floor(4 * (.03, .02, .01) / .06) = 2, 1, 0,
    # and the one left over to the heaviest of them.
    assert quota.tolist() == [[4, 3, 1, 0]]
    attention = torch.rand(2, 16)
    attention[:, :4] += 10.0
    selection = vlprune.pruners.create("holov", keep=8, crops=4).select(
        context(torch.randn(2, 16, 8), 8, vision_cls_attention=attention)
    )
    assert selection.keep_index.shape == (2, 8)
    assert all(set(range(4)) <= set(row) for row in selection.keep_index.tolist())


def test_holov_rejects_a_bad_crop_count() -> None:
    pruner = vlprune.pruners.create("holov", keep=4, crops=0)
    with pytest.raises(VlpruneError, match="crops=0"):
        pruner.select(context(torch.randn(1, 16, 4), 4, vision_cls_attention=torch.rand(1, 16)))


# ---------------------------------------------------------------------------------------------- VisionZip


def test_visionzip_centres_are_evenly_strided_over_the_remaining_tokens() -> None:
    assert contextual_centres(523, 10).tolist() == list(range(0, 469, 52))  # LLaVA-1.5 at 64: 576 - 53 remaining
    assert contextual_centres(5, 10).tolist() == [0, 1, 2, 3, 4]


def test_visionzip_contextual_token_is_centre_plus_mean_of_members() -> None:
    keys = on_circle([0, 5, 100, 95, 180])  # centres 0 and 2 (every 2nd of 5): 1 -> 0, 3 -> 2, 4 -> 2 (closer to 100)
    features = torch.arange(5, dtype=torch.float32).view(1, 5, 1) * 10
    merged, assignment = merge_contextual(features, keys, torch.tensor([0, 2]))
    assert assignment.tolist() == [[0, 0, 1, 1, 1]]
    assert merged[0, :, 0].tolist() == [0 + 10, 20 + (30 + 40) / 2]


def test_visionzip_splits_the_budget_like_the_reference() -> None:
    assert [vlprune.pruners.create("visionzip", keep=k).split(k, 576) for k in (64, 128, 192)] == [
        (54, 10),
        (108, 20),
        (162, 30),
    ]
    with pytest.raises(VlpruneError, match="contextual=64"):
        vlprune.pruners.create("visionzip", keep=64, contextual=64).split(64, 576)


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_visionzip_feeds_the_language_model_exactly_the_reference_sequence(positions: str) -> None:
    """Oracle: dominant tokens by eager [CLS] attention, contextual tokens merged by hand from the feature layer's
    keys and features, projected, and placed after the dominant ones; the language model run on that sequence."""
    model, processor = tiny_model("clip", 4, attn="eager")
    inputs = tiny_inputs(processor, 1)
    keep, contextual = 12, 3
    with vlprune.attach(
        model, vlprune.pruners.create("visionzip", keep=keep, contextual=contextual), positions=positions
    ) as session:
        pruned_logits = model(**inputs).logits
    assert session.stats.stages[0].visual_out == keep and session.stats.stages[0].recycled == contextual

    tower = model.model.vision_tower
    out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    cls_row = out.attentions[-2][0, :, 0, 1:].mean(dim=0)
    dominant = sorted(torch.topk(cls_row, keep - contextual).indices.tolist())
    assert session.stats.stages[0].kept_indices == [dominant]
    layer = tower.encoder.layers[-2]
    heads = model.config.vision_config.num_attention_heads
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))[0, 1:]
    keys = keys.view(keys.shape[0], heads, -1).mean(dim=1)
    features = out.hidden_states[-2][0, 1:]
    rest = [i for i in range(features.shape[0]) if i not in dominant]
    step = max(1, len(rest) // contextual)
    centres = rest[::step][:contextual]
    unit = torch.nn.functional.normalize(keys, dim=-1)
    groups = {c: [] for c in centres}
    for i in rest:
        if i not in groups:
            groups[max(centres, key=lambda c: (float(unit[i] @ unit[c]), -centres.index(c)))].append(i)
    merged = torch.stack([features[c] + (features[m].mean(0) if m else 0) for c, m in groups.items()])

    projector = model.model.multi_modal_projector
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    first, last = int(visual[0]), int(visual[-1])
    image = projector(features)
    sequence = torch.cat([embeds[:first], image[dominant], projector(merged), embeds[last + 1 :]])
    original = list(range(first)) + [first + i for i in dominant] + [first + c for c in centres]
    original += list(range(last + 1, embeds.shape[0]))
    position_ids = torch.tensor([original if positions == "original" else list(range(len(original)))])
    expected = model(inputs_embeds=sequence[None], position_ids=position_ids).logits
    torch.testing.assert_close(pruned_logits, expected, atol=1e-4, rtol=1e-4)


def test_zeroth_order_sensitivity_of_llavas_projector_takes_a_shortcut_to_the_same_numbers() -> None:
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model, _ = tiny_model("clip")
    projector = model.model.multi_modal_projector
    assert isinstance(projector, LlavaMultiModalProjector)
    generic = nn.Sequential(projector.linear_1, projector.act, projector.linear_2)  # forces the generic path
    features = torch.randn(2, 6, projector.linear_1.in_features)
    directions = random_directions(16, features.shape[-1], seed=0)
    fast = zeroth_order_sensitivity(projector, features, directions, 0.01)
    torch.testing.assert_close(
        fast, zeroth_order_sensitivity(generic, features, directions, 0.01), rtol=1e-3, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------- VFlowOpt

from vlprune.pruners.vflowopt import (  # noqa: E402
    cell_of_tokens,
    importance_map,
    patch_entropy,
    recycle_into_cells,
    solve_last_ratio,
)


def test_vflowopt_importance_is_the_attention_from_relatively_important_tokens() -> None:
    attention = torch.tensor(
        [[[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4], [0.5, 0.1, 0.2, 0.2]]]
    )  # received: 0.475, 0.125, 0.2, 0.2
    # t = 1.5: only token 0 receives more than 1.5 x the mean (0.25), so the importance is its attention row.
    torch.testing.assert_close(importance_map(attention, 1.5), attention[:, 0])
    # t = 0: tokens 0, 2, 3 (above 0 x mean, i.e. all with attention), the mean of their rows... every token.
    torch.testing.assert_close(importance_map(attention, 0.0), attention.mean(dim=1))


def test_vflowopt_patch_entropy_counts_grey_levels() -> None:
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[0, :, :2, 2:] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # top-right patch: half black, half white
    entropy = patch_entropy(pixels, grid=2)
    torch.testing.assert_close(entropy, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_vflowopt_recycles_pruned_tokens_into_their_cells_most_important_one() -> None:
    cells = cell_of_tokens(4, 2.0)  # 4 x 4 tokens, 2 x 2 cells
    assert cells.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    importance = torch.arange(16, dtype=torch.float32)[None] / 16  # token 15 most important
    hidden = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    kept, kept_hidden = recycle_into_cells(importance, hidden, cells, keep=6, room=4)
    # Top 6 - 4 = 2 tokens (15, 14) stay; each cell's best pruned token represents it: 5, 7, 13, 11.
    assert kept.tolist() == [[5, 7, 11, 13, 14, 15]]
    cell_members = {5: [0, 1, 4, 5], 7: [2, 3, 6, 7], 11: [10, 11], 13: [8, 9, 12, 13]}
    for position, token in enumerate(kept[0].tolist()):
        members = torch.tensor(cell_members.get(token, [token]), dtype=torch.float32)
        weights = (members / 16).clamp(min=1e-12)  # importance-weighted; token 0's importance is 0
        expected = (weights * members).sum() / weights.sum()  # hidden state = token index here
        torch.testing.assert_close(kept_hidden[0, position, 0], expected)


def test_vflowopt_makes_room_for_int_n_over_m_squared_recycled_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference prunes ``int(L / m²)`` more tokens to make room (not one per cell): with 36 tokens in cells of
    4 x 4 patches that is 2, although the 6 x 6 grid has 4 (partial) cells."""
    cells = cell_of_tokens(6, 4.0)
    assert int(cells.max()) + 1 == 4
    importance = torch.arange(36, dtype=torch.float32)[None] / 36
    hidden = torch.arange(36, dtype=torch.float32).view(1, 36, 1)
    kept, _ = recycle_into_cells(importance, hidden, cells, keep=8, room=2)
    direct = set(range(30, 36))  # the 8 - 2 most important stay as they are
    assert direct <= set(kept[0].tolist())
    # The other two represent the two cells whose best pruned token is most important: tokens 29 (cell 3) and 27
    # (cell 2, rows 4-5, columns 0-3).
    assert set(kept[0].tolist()) - direct == {29, 27}

    import vlprune.pruners.vflowopt as vflowopt

    rooms = []
    original = vflowopt.recycle_into_cells
    monkeypatch.setattr(
        vflowopt,
        "recycle_into_cells",
        lambda importance, hidden, cells, keep, room: (
            rooms.append((keep, room, int(cells.max()) + 1)) or original(importance, hidden, cells, keep, room)
        ),
    )
    model, processor = tiny_model("clip", 4)  # 8 x 8 = 64 visual tokens
    inputs = tiny_inputs(processor, 1)
    side = 10.0 * 8 / 27  # m = 10 patches of the reference's 27 x 27 grid
    with vlprune.attach(model, vlprune.pruners.create("vflowopt", keep=0.25, recycle=True, cell=10.0)) as session:
        model(**inputs)
    keep, room, num_cells = rooms[0]
    assert room == int(64 / side**2) == 7 and num_cells == 9
    assert session.stats.stages[0].visual_out == keep


def test_vflowopt_on_an_untiled_image_is_a_plain_top_k_as_the_reference() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 2)

    def run(**options):
        with vlprune.attach(model, vlprune.pruners.create("vflowopt", keep=0.25, **options)) as session:
            logits = model(**inputs).logits
        return logits, session.stats.stages[0].kept_indices

    default, explicit, recycled = run(), run(recycle=False), run(recycle=True)
    assert vlprune.pruners.create("vflowopt").recycle is None  # off on untiled images, on for multi-crop ones
    torch.testing.assert_close(default[0], explicit[0], atol=0, rtol=0)
    assert default[1] == explicit[1]
    assert (default[0] - recycled[0]).abs().max() > 1e-4  # recycling, the multi-crop path's, changes the output


def test_vflowopt_defaults_reproduce_the_released_last_ratios() -> None:
    # The released R3 values (0.6011, 0.87733, 0.487) come from the same constraint up to their rounding.
    assert abs(solve_last_ratio(0.10, 0.11662, 1.0, 9, 18, 28) - 0.6011) < 0.001
    assert abs(solve_last_ratio(0.25, 0.26510, 0.98334, 9, 18, 28) - 0.87733) < 0.01
    assert abs(solve_last_ratio(0.50, 0.72332, 0.74875, 9, 18, 28) - 0.487) < 0.005
    with pytest.raises(VlpruneError, match="budget"):
        solve_last_ratio(0.10, 0.5, 1.0, 9, 18, 28)


def test_holov_hands_its_tokens_over_crop_by_crop_most_attended_first_as_the_reference() -> None:
    """The reference concatenates each crop's ``topk`` (descending attention); a crop kept whole stays in raster
    order. Crop 0 keeps 3 of [0.1, 0.4, 0.9, 0.6]; crop 1 (tokens 4-7) keeps 1; crops 2 and 3 none."""
    attention = torch.tensor([[0.1, 0.4, 0.9, 0.6, 0.25, 0.2, 0.3, 0.25] + [0.15] * 4 + [0.1] * 4])
    features = torch.randn(1, 16, 8)
    selection = vlprune.pruners.create("holov", keep=4, crops=4).select(
        context(features, 4, vision_cls_attention=attention)
    )
    assert selection.ordered and selection.keep_index.tolist() == [[2, 3, 1, 6]]
    raster = vlprune.pruners.create("holov", keep=4, crops=4, reference_order=False)
    plain = raster.select(context(features, 4, vision_cls_attention=attention))
    assert not plain.ordered and plain.keep_index.tolist() == [[1, 2, 3, 6]]
    whole = torch.tensor([[5.0, 6.0, 7.0, 8.0] + [0.1] * 12])  # crop 0 takes its whole quota of 4: raster order
    full = vlprune.pruners.create("holov", keep=5, crops=4).select(context(features, 5, vision_cls_attention=whole))
    assert full.keep_index.tolist()[0][:4] == [0, 1, 2, 3]


def test_an_ordered_selection_enters_the_language_model_in_that_order() -> None:
    """With re-indexed positions the kept tokens follow HoloV's order in the sequence, numbered contiguously: the
    logits equal a plain run of the language model on the embeddings laid out that way."""
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 1)
    embeddings = []
    first = model.model.language_model.layers[0]
    hook = first.register_forward_pre_hook(
        lambda _, args, kwargs: embeddings.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    with vlprune.attach(model, vlprune.pruners.create("holov", keep=16)) as session, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    [kept] = session.stats.stages[0].kept_indices
    assert session.stats.positions == "reindex" and kept != sorted(kept)  # the order is HoloV's, not raster
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    start, end = int(visual[0]), int(visual[-1]) + 1
    sequence = embeddings[0][0]
    laid_out = torch.cat([sequence[:start], sequence[start:end][torch.tensor(kept)], sequence[end:]])[None]
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=laid_out).last_hidden_state
        expected = model.lm_head(hidden)[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_visionzip_qwen_path_merges_contextual_tokens_into_their_centres_in_place() -> None:
    """The reference's Qwen2.5-VL rule written out by hand: 5% of the tokens contextual, the top-received rest
    dominant, centres strided over the rest and kept in place with centre + mean of its members' embeddings."""
    torch.manual_seed(3)
    batch, count, width = 2, 40, 6
    hidden, keys, received = torch.randn(batch, count, width), torch.randn(batch, count, 5), torch.rand(batch, count)
    pruner = vlprune.pruners.create("visionzip", keep=10)
    [stage] = pruner.plan_for_family("qwen2.5-vl", count, 4)
    assert (stage.keep, stage.vision_received_attention, stage.vision_keys) == (10, True, True)
    assert stage.vision_cls_attention is False and stage.vision_features is False
    selection = pruner.select(
        context(hidden, 10, vision_received_attention=received, vision_keys=keys, vision_cls_attention=None)
    )
    for sample in range(batch):
        contextual = 2  # max(int(0.05 * 40), 1)
        dominant = received[sample].topk(10 - contextual).indices.tolist()
        rest = [i for i in range(count) if i not in dominant]
        centres = rest[:: len(rest) // contextual][:contextual]
        unit = torch.nn.functional.normalize(keys[sample], dim=-1)
        expected = {i: hidden[sample, i] for i in dominant}
        for centre in centres:
            members = [
                i for i in rest if i not in centres and centres[int((unit[i] @ unit[centres].T).argmax())] == centre
            ]
            mean = hidden[sample, members].mean(dim=0) if members else torch.zeros(width)
            expected[centre] = hidden[sample, centre] + mean
        assert selection.keep_index[sample].tolist() == sorted(expected)
        torch.testing.assert_close(selection.kept_hidden[sample], torch.stack([expected[i] for i in sorted(expected)]))
