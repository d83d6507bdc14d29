"""SCOPE: the selection against a plain transcription of the reference's greedy loop, its per-crop budgets, its
options, and end-to-end runs on the tiny LLaVA-1.5 and LLaVA-NeXT models (eager tower attention as the reference)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, shared_model, tiny_inputs, tiny_model

import vlprune
import vlprune.adapters
from vlprune.errors import VlpruneError
from vlprune.pruners import StageContext, create, families_of, unsupported_reason
from vlprune.pruners.base import Stage
from vlprune.pruners.scope import select_scope
from vlprune.testing import build_tiny_inputs, make_test_image


def reference_scope(features: torch.Tensor, cls_attention: torch.Tensor, keep: int, alpha: float = 1.0) -> list[int]:
    """The reference's ``SCOPE`` for one crop, step by step in plain Python (float64): every unchosen token's gain is
    the sum over all tokens j of max(0, cos(j, i) - covered_j), times its [CLS] attention to the power alpha; the
    first best one is chosen (argmax) and the coverage updated. Returns the chosen indices ascending."""
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    similarity = (unit @ unit.T).tolist()
    weight = [value**alpha for value in cls_attention.double().tolist()]
    count = len(similarity)
    covered = [0.0] * count
    chosen: list[int] = []
    for _ in range(keep):
        best, best_score = -1, float("-inf")
        for i in range(count):
            if i in chosen:
                continue
            gain = sum(max(0.0, similarity[j][i] - covered[j]) for j in range(count))
            if gain * weight[i] > best_score:
                best, best_score = i, gain * weight[i]
        chosen.append(best)
        covered = [max(covered[j], similarity[j][best]) for j in range(count)]
    return sorted(chosen)


def shares(sizes: list[int], keep: int) -> list[int]:
    """Each crop's share of ``keep`` by its size: the floors, then one more each to the largest (first on ties)."""
    total = sum(sizes)
    share = [keep * size // total for size in sizes]
    for crop in sorted(range(len(sizes)), key=lambda c: -sizes[c])[: keep - sum(share)]:
        share[crop] += 1
    return share


def reference_per_crop(features, cls_attention, crops: torch.Tensor, keep: int, alpha: float = 1.0) -> list[int]:
    """One sample's tokens on multi-crop inputs: each crop's share, chosen by the reference inside the crop."""
    labels = sorted({c for c in crops.tolist() if c >= 0})
    members = [torch.nonzero(crops == label)[:, 0] for label in labels]
    kept = []
    for index, take in zip(members, shares([len(m) for m in members], keep), strict=True):
        kept += index[reference_scope(features[index], cls_attention[index], take, alpha)].tolist()
    return sorted(kept)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_equals_the_reference_loop_and_batch_equals_its_samples(alpha: float, seed: int) -> None:
    """Random tokens and attention. (Coverage alone, alpha=0, is left to the exact hand-built case: two tokens that
    only cover each other gain the same sum in a different order, a tie that float rounding settles either way.)"""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 24, 8, generator=generator)
    attention = torch.softmax(3 * torch.randn(3, 24, generator=generator), dim=-1)
    kept = select_scope(features, attention, 7, alpha=alpha)
    assert kept.shape == (3, 7) and kept.dtype == torch.long
    for sample in range(3):
        assert kept[sample].tolist() == reference_scope(features[sample], attention[sample], 7, alpha)
        alone = select_scope(features[sample : sample + 1], attention[sample : sample + 1], 7, alpha=alpha)
        assert alone[0].tolist() == kept[sample].tolist()
    assert torch.equal(select_scope(features, attention, 7, alpha=alpha), kept)  # deterministic


def test_coverage_passes_over_a_salient_duplicate() -> None:
    """Tokens 0 and 1 are the same direction and the most attended; token 2 is another direction. Top-[CLS] keeps
    0 and 1, SCOPE keeps 0 (largest weighted gain) and then 2, as 1 adds no coverage. Equal gains go to the first."""
    features = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    attention = torch.tensor([[0.4, 0.4, 0.15, 0.05]])
    assert select_scope(features, attention, 2).tolist() == [[0, 2]]
    assert select_scope(features, attention, 3).tolist() == [[0, 2, 3]]
    # Coverage alone (alpha=0): 0 and 1 tie on the first step (gain 2), the first wins; then 2 and 3 tie (gain 1).
    assert select_scope(features, attention, 2, alpha=0.0).tolist() == [[0, 2]]


@pytest.mark.parametrize("keep", [5, 12])
def test_each_crop_takes_its_share_and_line_breaks_come_last(keep: int) -> None:
    generator = torch.Generator().manual_seed(3)
    # Two samples: crops 0-2 (sizes 8, 5, 4, a line break after each tile row), crops 3-4 (sizes 9, 6).
    first = [0] * 8 + [1] * 5 + [-1] + [2] * 4 + [-1]
    second = [3] * 9 + [4] * 6 + [-1] * 4
    crops = torch.tensor([first, second])
    features = torch.randn(2, 19, 6, generator=generator)
    attention = torch.rand(2, 19, generator=generator)
    kept = select_scope(features, attention, keep, crops=crops)
    for sample in range(2):
        assert kept[sample].tolist() == reference_per_crop(features[sample], attention[sample], crops[sample], keep)
        assert not any(crops[sample, i] == -1 for i in kept[sample].tolist())
        alone = select_scope(features[sample : sample + 1], attention[sample : sample + 1], keep, crops=crops[[sample]])
        assert torch.equal(alone[0], kept[sample])
    # More than every other token: the first line breaks fill the rest.
    assert select_scope(features, attention, 17, crops=crops)[0].tolist() == [i for i in range(19) if i not in (13, 18)]
    everything = select_scope(features, attention, 18, crops=crops)
    assert everything[0].tolist() == [i for i in range(19) if i != 18]
    assert everything[1].tolist() == list(range(18))


def test_bad_options_name_the_value() -> None:
    features, attention = torch.randn(1, 6, 4), torch.rand(1, 6)
    with pytest.raises(VlpruneError, match=r"alpha=-1"):
        create("scope", keep=4, alpha=-1)
    with pytest.raises(VlpruneError, match=r"alpha=nan"):
        create("scope", keep=4, alpha=float("nan"))
    with pytest.raises(VlpruneError, match=r"alpha='strong'"):
        create("scope", keep=4, alpha="strong")
    with pytest.raises(VlpruneError, match=r"keep=7 must be an int count in \[1, 6\]"):
        select_scope(features, attention, 7)
    with pytest.raises(VlpruneError, match=r"keep=0"):
        select_scope(features, attention, 0)
    with pytest.raises(VlpruneError, match=r"alpha=inf"):
        select_scope(features, attention, 2, alpha=float("inf"))
    with pytest.raises(VlpruneError, match=r"saliency \(1, 5\)"):
        select_scope(features, attention[:, :5], 2)


def test_registration_stage_positions_and_families() -> None:
    pruner = create("scope", keep=8, alpha="0.5")  # text options (CLI, lmms-eval) are converted
    assert pruner.alpha == 0.5 and pruner.stage is Stage.PRE_LLM and pruner.reference_positions() == "reindex"
    assert families_of("scope") == ["llava", "llava-next"]
    from vlprune.adapters.registry import traits_of

    for family in ("llava-onevision", "qwen2.5-vl"):
        assert "[CLS]" in unsupported_reason(pruner, traits_of(family))


def test_select_on_a_hand_built_context_reads_features_and_cls_attention() -> None:
    features = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    ctx = StageContext(
        layer=0,
        keep=2,
        visual_hidden=torch.randn(1, 4, 5),  # the projected tokens: not what SCOPE compares
        visual_positions=torch.arange(4)[None],
        visual_origin=torch.arange(4)[None],
        vision_cls_attention=torch.tensor([[0.4, 0.4, 0.15, 0.05]]),
        vision_features=features,
    )
    selection = create("scope", keep=2).select(ctx)
    assert selection.keep_index.tolist() == [[0, 2]] and not selection.ordered


def tower_reads(model, pixel_values: torch.Tensor, feature_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops, P, F) patch features and (crops, P) head-mean [CLS] rows at the feature layer, from eager attention."""
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = previous
    # attentions[i] is layer i, whose output is hidden_states[i + 1]; LLaVA drops [CLS] before the projector.
    return out.hidden_states[feature_index + 1][:, 1:], out.attentions[feature_index].mean(1)[:, 0, 1:]


def test_llava_keeps_the_reference_selection_per_image() -> None:
    """LLaVA-1.5: one selection per image from the tower's own features and [CLS] rows; two images in one prompt
    share the budget (the reference divides it over the images it encodes together)."""
    model, processor = tiny_model("clip", 2, attn="eager")
    adapter = vlprune.adapters.adapter_for(model)
    feature_index = adapter.vision_feature_layer_index()
    inputs = tiny_inputs(processor, 2)
    features, cls_rows = tower_reads(model, inputs["pixel_values"], feature_index)
    with vlprune.attach(model, create("scope", keep=12)) as session:
        model(**inputs)
    assert session.stats.stages[0].kept_indices == [reference_scope(features[b], cls_rows[b], 12) for b in range(2)]

    prompts = ["USER: <image>\n<image>\nWhich is red? ASSISTANT:", "USER: <image>\nAnd <image>\nHow many? ASSISTANT:"]
    images = [make_test_image(seed) for seed in range(4)]
    pair = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(DEVICE)
    features, cls_rows = tower_reads(model, pair["pixel_values"], feature_index)
    with vlprune.attach(model, create("scope", keep=21)) as session:
        model(**pair)
    patches = features.shape[1]
    expected = []
    for sample in range(2):
        first, second = 2 * sample, 2 * sample + 1
        kept = reference_scope(features[first], cls_rows[first], 11)  # 21 = 11 + 10, the odd one to the first
        kept += [patches + i for i in reference_scope(features[second], cls_rows[second], 10)]
        expected.append(kept)
    assert session.stats.stages[0].kept_indices == expected


def test_llava_next_gives_each_crop_its_share() -> None:
    """LLaVA-NeXT: the base view and each (unpadded) tile take their share of the budget by size and choose by
    their own features and [CLS] row; the line breaks are dropped."""
    model, processor = shared_model("llava-next", attn_implementation="sdpa")
    inputs = build_tiny_inputs(processor, [make_test_image(0, 96).resize((40, 30))], ["What colour is the square?"])
    adapter = vlprune.adapters.adapter_for(model)
    count = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    keep = 50
    with vlprune.attach(model, create("scope", keep=keep)) as session:
        model(**inputs)
    kept = session.stats.stages[0].kept_indices[0]
    features, cls_rows = tower_reads(model, inputs["pixel_values"][0], adapter.vision_feature_layer_index())
    geometry = adapter.visual_geometry(dict(inputs), [count], torch.device("cpu"))
    crop, patch = geometry.crop[0], geometry.crop_token[0]
    token_features = features[crop.clamp(min=0), patch.clamp(min=0)]
    token_rows = cls_rows[crop.clamp(min=0), patch.clamp(min=0)]
    assert kept == reference_per_crop(token_features, token_rows, crop, keep)
    sizes = [int((crop == c).sum()) for c in sorted(set(crop.tolist())) if c >= 0]
    assert len(kept) == keep and not any(crop[i] == -1 for i in kept) and len(sizes) == 5 and len(set(sizes)) > 1
