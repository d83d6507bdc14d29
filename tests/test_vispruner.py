"""VisPruner: the selection against a plain loop over the reference's steps, its per-view path, its options, and its
runs through the engine on the tiny families."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tiny_inputs, tiny_model
from family_cases import CASE, ragged_alone_run

import vlprune
from vlprune.adapters import traits_of
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import Stage, StageContext, create, families_of
from vlprune.pruners.fastervlm import select_fastervlm
from vlprune.pruners.vispruner import VisPruner, select_vispruner


def reference_vispruner(attention: torch.Tensor, features: torch.Tensor, keep: int, ratio: float) -> list[int]:
    """The reference's ``encode_images`` for one sample, step by step on Python lists: the ``int(keep · r)`` most
    attended tokens, then the rest (most attended first) de-duplicated by dropping, ``min(8, R - T_div)`` at a time,
    the a-tokens (``[0::2]``) most similar to any b-token (``[1::2]``); the survivors by descending similarity, then
    the b-tokens. Ties are taken lowest index first; an odd residual has ``ceil(R / 2)`` a-tokens, and a step drops
    at most the a-tokens there are (where the reference's indexing fails)."""
    count = len(attention)
    important = int(keep * ratio)
    diverse = keep - important
    order = sorted(range(count), key=lambda i: -float(attention[i]))
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    cosine = (unit @ unit.T).tolist()
    residual = order[important:]
    while diverse > 0:
        drop = min(8, len(residual) - diverse)
        if drop <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        drop = min(drop, len(a))
        similarity = [max(cosine[i][j] for j in b) for i in a]
        by_similarity = sorted(range(len(a)), key=lambda k: -similarity[k])
        residual = [a[k] for k in by_similarity[drop:]] + b
    return sorted(order[:important] + (residual if diverse > 0 else []))


def random_inputs(batch: int, count: int, width: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    attention = torch.rand(batch, count, generator=generator, dtype=torch.float64)
    features = torch.randn(batch, count, width, generator=generator, dtype=torch.float64)
    return attention, features


@pytest.mark.parametrize(
    "count,keep,ratio",
    [
        (576, 64, 0.5),  # LLaVA-1.5's published setting
        (576, 64, 0.75),  # its README's MME setting
        (576, 192, 0.5),
        (100, 30, 0.5),  # an odd residual (85 tokens)
        (41, 37, 0.3),  # fewer than 8 to drop at once
        (20, 5, 0.0),  # diverse tokens only; the last steps have fewer than 8 a-tokens
        (20, 20, 0.5),  # everything kept
        (10, 3, 1.0),  # important tokens only
        (9, 1, 0.5),  # one diverse token
    ],
)
def test_selection_equals_the_reference_loop(count: int, keep: int, ratio: float) -> None:
    attention, features = random_inputs(2, count, seed=count + keep)
    kept = select_vispruner(attention, features, keep, ratio)
    assert kept.shape == (2, keep) and kept.dtype == torch.long
    assert kept.tolist() == [reference_vispruner(attention[b], features[b], keep, ratio) for b in range(2)]


def test_a_batch_equals_its_samples_alone() -> None:
    attention, features = random_inputs(4, 96, seed=7)
    attention, features = attention.float(), features.float()
    together = select_vispruner(attention, features, 24, 0.5)
    for b in range(4):
        assert torch.equal(together[b : b + 1], select_vispruner(attention[b : b + 1], features[b : b + 1], 24, 0.5))


def test_duplicates_of_other_tokens_are_dropped() -> None:
    """Hand-built: token 0 is the most attended (the one important token), the rest come in attention order 1..16, so
    the a-tokens are 1, 3, ..., 15 and the b-tokens 2, 4, ..., 16. Every token is a distinct unit vector except 3, 7,
    11 and 15, copies of b-tokens: the one step (16 residual tokens down to 12) drops exactly those four."""
    count = 17
    attention = torch.linspace(1.0, 0.1, count)[None]
    features = torch.eye(32)[:count].clone()
    for copy, source in ((3, 10), (7, 2), (11, 16), (15, 4)):
        features[copy] = features[source]
    kept = select_vispruner(attention, features[None], 13, 1 / 13)
    assert kept.tolist() == [[i for i in range(count) if i not in (3, 7, 11, 15)]]


def test_important_tokens_are_the_most_attended_and_always_kept() -> None:
    attention, features = random_inputs(2, 64, seed=3)
    kept = select_vispruner(attention, features, 16, 0.75)
    top = attention.topk(12, dim=-1).indices
    for b in range(2):
        assert set(top[b].tolist()) <= set(kept[b].tolist())
    # All important: FasterVLM's top-k of the same attention.
    assert torch.equal(select_vispruner(attention, features, 16, 1.0), select_fastervlm(attention, 16))


def test_half_precision_and_float32_option() -> None:
    attention, features = random_inputs(2, 64, seed=5)
    half = select_vispruner(attention.half(), features.half(), 16)
    single = select_vispruner(attention.half(), features.half(), 16, float32=True)
    for kept in (half, single):
        assert kept.shape == (2, 16) and all(len(set(row)) == 16 for row in kept.tolist())
    # In float32 the choice is the one made from the float32 similarities of the same (rounded) values.
    assert torch.equal(single, select_vispruner(attention.half(), features.half().float(), 16))


def test_per_view_selection_shares_the_budget_and_keeps_line_breaks_last() -> None:
    """LLaVA-NeXT's layout: a base view of 16 tokens, two tiles of 12 and 4 line breaks. Each view selects from its
    own tokens with its share of the budget (in proportion to its tokens: 8, 6, 6 of 20); line breaks come last."""
    views = torch.tensor([[0] * 16 + [1] * 6 + [-1] + [2] * 6 + [-1] + [1] * 6 + [-1] + [2] * 6 + [-1]])
    count = views.shape[1]
    attention, features = random_inputs(1, count, seed=11)
    attention = attention.masked_fill(views == -1, 0.0)
    features = features.masked_fill((views == -1)[..., None], 0.0)
    expected = []
    for view, share in ((0, 8), (1, 6), (2, 6)):
        members = (views[0] == view).nonzero()[:, 0]
        local = reference_vispruner(attention[0, members], features[0, members], share, 0.5)
        expected += members[local].tolist()
    kept = select_vispruner(attention, features, 20, 0.5, views=views)
    assert kept.tolist() == [sorted(expected)]
    line_breaks = (views[0] == -1).nonzero()[:, 0].tolist()
    everything = select_vispruner(attention, features, 42, 0.5, views=views)[0].tolist()
    assert everything == sorted(set(range(count)) - set(line_breaks[2:]))


@pytest.mark.parametrize("ratio", [1.5, -0.1, True, "half"])
def test_bad_important_ratio_is_refused_naming_the_value(ratio: object) -> None:
    with pytest.raises(VlpruneError, match="important_ratio"):
        VisPruner(keep=16, important_ratio=ratio)
    attention, features = random_inputs(1, 8)
    with pytest.raises(VlpruneError, match="important_ratio"):
        select_vispruner(attention, features, 4, ratio)


def test_bad_options_through_create_and_bad_budgets() -> None:
    with pytest.raises(VlpruneError, match=r"important_ratio=2\.0"):
        create("vispruner", keep=16, important_ratio=2.0)
    with pytest.raises(VlpruneError, match="important_ratio"):
        create("vispruner", keep=16, important_ratio="abc")
    attention, features = random_inputs(1, 8)
    for keep in (0, 9):
        with pytest.raises(VlpruneError, match=f"keep={keep}"):
            select_vispruner(attention, features, keep)


def test_declaration_and_plans() -> None:
    pruner = create("vispruner", keep=64)
    assert (pruner.stage, pruner.default_positions, pruner.cls_substitute) == (Stage.PRE_LLM, "reindex", "received")
    assert pruner.important_ratio == 0.5 and pruner.float32 is False
    [llava] = pruner.plan_for(traits_of("llava"), 576, 32)
    assert (llava.layer, llava.keep, llava.needs) == (0, 64, {Need.CLS_ATTENTION, Need.VISION_FEATURES})
    [qwen] = pruner.plan_for(traits_of("qwen2.5-vl"), 1024, 28)
    assert qwen.needs == {Need.CLS_ATTENTION}  # served as the received attention; the merged tokens are compared
    assert families_of("vispruner") == [
        "llava",
        "llava-next",
        "llava-onevision",
        "qwen2-vl",
        "qwen2.5-vl",
        "qwen3-vl",
    ]


def test_select_on_a_hand_built_context_reads_received_attention_and_hidden_states() -> None:
    """Without [CLS] attention and vision features (Qwen-VL), the received attention and the stage's hidden states."""
    attention, features = random_inputs(2, 30, seed=2)
    ctx = StageContext(
        layer=0,
        keep=9,
        visual_hidden=features,
        visual_positions=torch.arange(30).expand(2, -1),
        visual_origin=torch.arange(30).expand(2, -1),
        vision_received_attention=attention,
    )
    selection = create("vispruner", keep=9, important_ratio=0.4).select(ctx)
    assert selection.keep_index.tolist() == [reference_vispruner(attention[b], features[b], 9, 0.4) for b in range(2)]
    assert selection.scores is attention


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_engine_keeps_what_the_reference_keeps_from_the_tower(ratio: float) -> None:
    """Reference: the [CLS] row of the eager attention at the vision feature layer (-2), head mean, patches only, and
    that layer's patch features (before the projector), through the reference loop."""
    model, processor = tiny_model("clip", 2, attn="eager")
    inputs = tiny_inputs(processor, 2)
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = model.config.vision_feature_layer  # attentions[i] is layer i, whose output is hidden_states[i + 1]
    cls_row = out.attentions[layer][:, :, 0, 1:].mean(dim=1)
    features = out.hidden_states[layer][:, 1:]
    expected = [reference_vispruner(cls_row[b], features[b], 16, ratio) for b in range(2)]
    with vlprune.attach(model, create("vispruner", keep=16, important_ratio=ratio)) as session:
        model(**inputs)
    assert session.stats.positions == "reindex"
    assert session.stats.stages[0].kept_indices == expected


@pytest.mark.skipif(DEVICE != "cpu", reason="the tiled and Qwen-VL cases run on the CPU")
@pytest.mark.parametrize("case_id", ["llava-next", "llava-onevision", "qwen2-vl"])
def test_engine_runs_per_view_and_without_cls_and_a_batch_equals_its_samples(
    case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiled families select view by view (no line break kept at a quarter of the tokens), Qwen-VL on the received
    attention and the merged tokens; each sample of a ragged batch keeps what it keeps alone."""
    case = CASE[case_id]
    together, contexts = ragged_alone_run(case, monkeypatch, VisPruner, "vispruner", 0.25)
    assert together.visual_out_per_sample == [round(0.25 * n) for n in together.visual_in_per_sample]
    [ctx] = contexts[:1]  # a ragged batch is selected sample by sample
    if case.qwen:
        assert ctx.vision_cls_attention is None and ctx.vision_features is None
        assert ctx.vision_received_attention is not None
        return
    assert (ctx.vision_cls_attention is None) == (not case.cls) and ctx.vision_features is not None
    for ctx, kept in zip(contexts[:2], together.kept_indices, strict=True):
        views = ctx.geometry.view[0, kept]
        assert (views >= 0).all()  # no line break
        assert len(set(views.tolist())) > 1  # the base view and the tiles each keep their share
