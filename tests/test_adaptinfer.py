"""AdaptInfer: its selection against the paper's formula on eager attention weights (both stages it can check), the
engine invariants (drop equals mask, batch equals samples alone), composing with VAR, and its plan (layers, budget
table, interpolation, clamps, bad options)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_KINDS, tiny_inputs, tiny_model
from family_cases import MaskOracle, greedy, greedy_under_mask

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.pruners.adaptinfer import AdaptInfer, text_guided_scores
from vlprune.pruners.base import PROBE_TOKENS

# Three stages in the 4-layer tiny model (64 visual tokens): before layers 1, 2 and 3.
OPTIONS = {"layers": [1, 2, 3], "schedule": [32, 16, 8]}


def reference_scores(weights: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(V,) the reference's ``attn_postprocess_topk_with_t2t_weighting`` for one sample, written as in its code.

    weights: (H, L, L) eager attention of one sample; text, visual: slot indices of its text rows and visual tokens.
    """
    t2t = weights[:, text][:, :, text][None]  # (1, H, T, T)
    diag = torch.diagonal(t2t, dim1=-2, dim2=-1)
    t2t_2 = t2t + t2t.transpose(-1, -2) - torch.diag_embed(diag)
    text_importance = t2t_2.sum(dim=2)  # (1, H, T)
    t2v = weights[:, text][:, :, visual][None]  # (1, H, T, V)
    return (text_importance.unsqueeze(-2) @ t2v).squeeze(-2).sum(dim=1)[0]


def layout(inputs, image_token_id: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the visual tokens and of the real text tokens after the image, for sample ``b``."""
    visual = inputs["input_ids"][b] == image_token_id
    real = inputs["attention_mask"][b].bool()
    after = torch.arange(visual.shape[0], device=visual.device) > visual.nonzero()[0, 0]
    return visual.nonzero()[:, 0], (real & ~visual & after).nonzero()[:, 0]


def top_sorted(scores: torch.Tensor, k: int) -> list[int]:
    return torch.topk(scores, k).indices.sort().values.tolist()


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
def test_both_first_stages_keep_the_reference_formula_on_eager_attention(vision: str, kv_heads: int) -> None:
    """Stage 1 from the vanilla eager attention of layer 0; stage 2 from the eager attention of layer 1 with stage 1's
    pruned tokens masked out as keys (drop equals mask), over the tokens stage 1 kept. A padded batch of two."""
    model, processor = tiny_model(vision, kv_heads, attn="eager")
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, create("adaptinfer", **OPTIONS), positions="original") as session:
        model(**inputs)
    stages = session.stats.stages
    assert [(s.layer, s.visual_out) for s in stages] == [(1, 32), (2, 16), (3, 8)]
    image_token = model.config.image_token_id

    first = model(**inputs, output_attentions=True).attentions[0]  # layer 0 feeds the stage at layer 1
    expected = []
    for b in range(2):
        visual, text = layout(inputs, image_token, b)
        expected.append(top_sorted(reference_scores(first[b], text, visual), 32))
    assert stages[0].kept_indices == expected

    oracle = MaskOracle(model, inputs["input_ids"], [(1, stages[0].kept_indices)], (image_token,))
    try:
        second = model(**inputs, output_attentions=True).attentions[1]  # layer 1 on the stage-1 tokens
    finally:
        oracle.remove()
    for b in range(2):
        visual, text = layout(inputs, image_token, b)
        kept = torch.tensor(stages[0].kept_indices[b], device=visual.device)
        scores = reference_scores(second[b], text, visual[kept])
        assert stages[1].kept_indices[b] == kept[top_sorted(scores, 16)].tolist()


def test_padded_rows_get_no_weight_and_count_in_no_sum() -> None:
    """A sample padded with a copy of its last row (as the engine pads) scores as it does alone."""
    torch.manual_seed(1)
    heads, rows, tokens = 3, 4, 6
    logits = torch.randn(1, heads, rows, rows + tokens)
    causal = torch.ones(rows, rows).tril().bool()
    logits[..., :rows] = logits[..., :rows].masked_fill(~causal, float("-inf"))
    attention = logits.softmax(dim=-1)
    text, visual = attention[..., :rows], attention[..., rows:]
    alone = text_guided_scores(visual, text, torch.ones(1, rows, dtype=torch.bool))
    # By hand: w[j] = column sum + row sum - diagonal, then heads summed.
    weight = text.sum(dim=2) + text.sum(dim=3) - text.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(alone, (weight[..., None] * visual).sum(dim=(1, 2)))
    # Pad to 6 rows by repeating the last: as rows and as columns (the column of row 5 is row 3's token again).
    index = torch.tensor([0, 1, 2, 3, 3, 3])
    padded_text = text[:, :, index][..., index]
    mask = torch.tensor([[True, True, True, True, False, False]])
    padded = text_guided_scores(visual[:, :, index], padded_text, mask)
    torch.testing.assert_close(padded, alone)
    unmasked = text_guided_scores(visual[:, :, index], padded_text, torch.ones_like(mask))
    assert (unmasked - alone).abs().max() > 1e-3  # the copies would count otherwise


def test_a_batch_of_two_equals_each_sample_alone() -> None:
    model, processor = tiny_model("dinov2", 2)
    batch = tiny_inputs(processor, 2)
    assert not bool(batch["attention_mask"].all())  # the shorter question is left-padded
    with vlprune.attach(model, create("adaptinfer", **OPTIONS)) as session:
        tokens, logits = greedy(model, batch)
        kept = [s.kept_indices for s in session.stats.stages]
        for index in range(2):
            alone = {key: value[index : index + 1] for key, value in batch.items()}
            real = alone["attention_mask"][0].bool()
            alone["input_ids"] = alone["input_ids"][:, real]
            alone["attention_mask"] = alone["attention_mask"][:, real]
            single_tokens, single_logits = greedy(model, alone)
            assert [s.kept_indices[0] for s in session.stats.stages] == [k[index] for k in kept]
            assert torch.equal(single_tokens[0], tokens[index])
            torch.testing.assert_close(single_logits[:, 0], logits[:, index], atol=1e-4, rtol=0)


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_equals_mask_with_original_positions(vision: str, kv_heads: int, attn: str) -> None:
    model, processor = tiny_model(vision, kv_heads, attn)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, create("adaptinfer", **OPTIONS), positions="original") as session:
        tokens, logits = greedy(model, inputs)
    stages = [(s.layer, s.kept_indices) for s in session.stats.stages]
    assert [(layer, len(kept[0])) for layer, kept in stages] == [(1, 32), (2, 16), (3, 8)]
    oracle_tokens, oracle_logits = greedy_under_mask(model, inputs, stages)
    _, vanilla_logits = greedy(model, inputs)
    assert torch.equal(tokens, oracle_tokens)
    torch.testing.assert_close(logits, oracle_logits, atol=1e-4, rtol=0)
    assert (logits - vanilla_logits).abs().max() > 1e-3  # pruning changed something


def test_reindexed_positions_are_the_default_keep_the_first_selection_and_change_the_output() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 2)
    results = {}
    for positions in ("original", "reindex"):
        with vlprune.attach(model, create("adaptinfer", **OPTIONS), positions=positions) as session:
            logits = model(**inputs).logits
        results[positions] = (logits, session.stats.stages[0].kept_indices)
    assert results["original"][1] == results["reindex"][1]  # stage 1 is scored before any renumbering
    assert (results["original"][0] - results["reindex"][0]).abs().max() > 1e-4
    # The reference renumbers, and that is what a session without an explicit mode runs.
    assert AdaptInfer.default_positions == "reindex"
    with vlprune.attach(model, create("adaptinfer", **OPTIONS)) as session:
        torch.testing.assert_close(model(**inputs).logits, results["reindex"][0], atol=0, rtol=0)
    assert session.stats.positions == "reindex"


def test_adaptinfer_with_var_composes_and_runs() -> None:
    model, processor = tiny_model("clip", 2, layers=6)
    inputs = tiny_inputs(processor, 2)
    options = {"layers": [2, 3, 4], "schedule": [32, 16, 8]}
    pruner = create("adaptinfer+var", dimensions=[5], tau=2.0, rho=1.0, summ=0.0, **options)
    assert pruner.name == "adaptinfer" and pruner.modifier is not None
    with vlprune.attach(model, create("adaptinfer", **options)):
        alone = model(**inputs).logits
    with vlprune.attach(model, pruner) as session:
        tokens, logits = greedy(model, inputs)
    assert [(s.layer, s.visual_out) for s in session.stats.stages] == [(2, 32), (3, 16), (4, 8)]
    assert tokens.shape == (2, 5) and bool(torch.isfinite(logits).all())
    assert (logits[0] - alone[:, -1]).abs().max() > 1e-3  # VAR changed the pruned model


def test_default_plan_follows_the_reference_layers_and_table() -> None:
    plan = create("adaptinfer", keep=64).plan(576, 32)
    assert [s.layer for s in plan] == [2, 11, 21]
    assert [s.keep for s in plan] == [133, 27, 3]
    assert all(s.query_rows == "text" and s.per_head_attention and s.query_row_attention for s in plan)
    assert [s.keep for s in create("adaptinfer", keep=128).plan(576, 32)] == [290, 72, 18]
    assert [s.keep for s in create("adaptinfer", keep=48).plan(576, 32)] == [80, 24, 2]
    assert [s.keep for s in create("adaptinfer", keep=32).plan(576, 32)] == [40, 12, 1]  # the reference's 0 -> 1
    # Between rows the counts are linear on the budget (80 is a quarter of the way from 64 to 128) ...
    assert [s.keep for s in create("adaptinfer", keep=80).plan(576, 32)] == [172, 38, 7]
    # ... above 128 towards no pruning at 576, below 32 the 32 row scaled.
    assert [s.keep for s in create("adaptinfer", keep=352).plan(576, 32)] == [433, 324, 297]
    assert [s.keep for s in create("adaptinfer", keep=16).plan(576, 32)] == [20, 6, 1]
    # Other token counts: the budget and the counts scale by N / 576; a fraction is a share of N.
    # keep=8 of 64 is a budget of 72 of 576: [152.6, 32.6, 4.9] between the 64 and 128 rows, / 9 -> [17, 4, 1].
    assert [s.keep for s in create("adaptinfer", keep=8).plan(64, 32)] == [17, 4, 1]
    assert create("adaptinfer", keep=1 / 9).plan(576, 32) == plan
    assert create("adaptinfer", keep=0.25).plan(64, 32) == create("adaptinfer", keep=16).plan(64, 32)


def test_layers_scale_with_depth_and_probe_plans_give_layers_only() -> None:
    assert [s.layer for s in create("adaptinfer").plan(PROBE_TOKENS, 32)] == [2, 11, 21]
    assert [s.layer for s in create("adaptinfer").plan(PROBE_TOKENS, 16)] == [2, 6, 11]  # scoring layer >= 1
    assert [s.layer for s in create("adaptinfer").plan(PROBE_TOKENS, 8)] == [2, 3, 6]  # strictly increasing
    probe = create("adaptinfer", keep=64).plan(PROBE_TOKENS, 40)
    assert [s.layer for s in probe] == [2, 13, 26] and all(s.query_row_attention for s in probe)
    assert [s.keep for s in create("adaptinfer", **OPTIONS).plan(64, 4)] == [32, 16, 8]
    assert [s.layer for s in create("adaptinfer", layers=[-3, -1], schedule=[10, 5]).plan(64, 4)] == [1, 3]
    with pytest.raises(VlpruneError, match="deeper language model than 4 layers"):
        create("adaptinfer", keep=16).plan(64, 4)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"keep": 16, "layers": [0, 2, 3]}, r"layer=0 for adaptinfer is out of range.*1\.\.3"),
        ({"keep": 16, "layers": [1, 4, 3]}, r"layer=4 for adaptinfer is out of range"),
        ({"keep": 16, "layers": [2, 2, 3]}, r"layers=\[2, 2, 3\] for adaptinfer must be strictly increasing"),
        ({"keep": 16, "layers": [1, 2]}, r"budget table has 3 counts.*schedule="),
        ({"layers": [1, 2, 3], "schedule": [32, 16]}, r"schedule=\[32, 16\] .* one count per stage layer \[1, 2, 3\]"),
        ({"layers": [1, 2, 3], "schedule": [80, 16, 8]}, r"more than the model's 64 visual tokens"),
        ({"keep": 65, "layers": [1, 2, 3]}, r"keep=65"),
        ({"layers": [1, 2, 3]}, r"needs a budget"),
    ],
)
def test_bad_plans_fail_with_a_clear_message(options: dict, message: str) -> None:
    with pytest.raises(VlpruneError, match=message):
        create("adaptinfer", **options).plan(64, 4)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"schedule": [32, 16, 0]}, r"at least 1, got 0"),
        ({"schedule": [16, 32, 8]}, r"must not increase"),
        ({"schedule": []}, r"at least one count"),
        ({"layers": []}, r"at least one stage layer"),
        ({"schedule": ["a"]}, r"schedule"),
    ],
)
def test_bad_options_fail_when_created(options: dict, message: str) -> None:
    with pytest.raises(VlpruneError, match=message):
        create("adaptinfer", **options)


def test_the_engine_hands_the_rows_the_plan_asks_for_on_any_backend() -> None:
    """SDPA and eager select the same tokens: the rows come from the engine's wrapper, not from attention weights."""
    inputs = None
    kept = []
    for attn in ("eager", "sdpa"):
        model, processor = tiny_model("clip", 4, attn=attn)
        inputs = tiny_inputs(processor, 2) if inputs is None else inputs
        with vlprune.attach(model, create("adaptinfer", **OPTIONS)) as session:
            model(**inputs)
        kept.append([s.kept_indices for s in session.stats.stages])
    assert kept[0] == kept[1]
