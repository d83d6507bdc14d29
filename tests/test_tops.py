"""TOPS: the greedy against a plain loop of the paper's Algorithm 1 (as the reference notes give it), a hand-built
case, the text-rater rule, the batch against its samples, bad options, the layer-averaged plan, and end-to-end
generation on the tiny LLaVA-1.5 and Qwen2.5-VL models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from family_cases import CASE, greedy, ragged_alone_run

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners import StageContext, create, families_of, stages_of
from vlprune.pruners.base import PROBE_TOKENS
from vlprune.pruners.pyramiddrop import layer_average
from vlprune.pruners.scope import cosine_similarity
from vlprune.pruners.tops import STEPWISE_FROM, TOPS, greedy_tops, rater_relevance, select_tops, text_raters


def reference_tops(features: torch.Tensor, relevance: torch.Tensor, keep: int, alpha: float, lam: float) -> list[int]:
    """Algorithm 1 step by step in plain Python (float64): the seed is the most relevant token; then every
    candidate i scores r_i / mean(r) + alpha * div_i / mean(div) + lam * cov_i / mean(cov), means over the
    candidates (a term with mean 0 counts 0), div_i = 1 - max_{j in S} sim(i, j), cov_i = sum over j not in S of
    max(0, sim(i, j) - max_{k in S} sim(j, k)); the first best one joins S. Returns the chosen indices ascending."""
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    sim = (unit @ unit.T).tolist()
    r = relevance.double().tolist()
    count = len(r)
    chosen = [max(range(count), key=lambda i: (r[i], -i))]
    while len(chosen) < keep:
        candidates = [i for i in range(count) if i not in chosen]
        div = {i: 1 - max(sim[i][j] for j in chosen) for i in candidates}
        cov = {i: sum(max(0.0, sim[i][j] - max(sim[j][k] for k in chosen)) for j in candidates) for i in candidates}

        def normalised(values: dict) -> dict:
            mean = sum(values.values()) / len(values)
            return {i: (value / mean if mean > 0 else 0.0) for i, value in values.items()}

        rn, dn, cn = normalised({i: r[i] for i in candidates}), normalised(div), normalised(cov)
        best, best_score = -1, float("-inf")
        for i in candidates:
            score = rn[i] + alpha * dn[i] + lam * cn[i]
            if score > best_score:
                best, best_score = i, score
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize(("alpha", "lam"), [(0.5, 0.5), (0.5, 1.0), (2.0, 0.0), (0.0, 3.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_the_algorithm_loop_and_batch_equals_its_samples(alpha: float, lam: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 20, 6, generator=generator)
    relevance = torch.softmax(2 * torch.randn(3, 20, generator=generator), dim=-1)
    kept = select_tops(features, 7, relevance=relevance, diversity=alpha, coverage=lam)
    assert kept.shape == (3, 7) and kept.dtype == torch.long
    for sample in range(3):
        assert kept[sample].tolist() == reference_tops(features[sample], relevance[sample], 7, alpha, lam)
        alone = select_tops(features[[sample]], 7, relevance=relevance[[sample]], diversity=alpha, coverage=lam)
        assert torch.equal(alone[0], kept[sample])


def test_duplicates_give_way_to_distinct_tokens_and_weights_zero_rank_by_relevance() -> None:
    """Tokens 0 and 1 are one direction and the most relevant, 2 and 3 two others. Ranking by relevance keeps 0 and
    1; with diversity and coverage the duplicate 1 adds nothing (div 0, cov 0) and 2, then 3, come first."""
    features = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    relevance = torch.tensor([[0.4, 0.4, 0.15, 0.05]])
    for alpha, lam in [(0.5, 0.5), (0.5, 1.0)]:
        assert select_tops(features, 2, relevance=relevance, diversity=alpha, coverage=lam).tolist() == [[0, 2]]
        assert select_tops(features, 3, relevance=relevance, diversity=alpha, coverage=lam).tolist() == [[0, 2, 3]]
    assert select_tops(features, 2, relevance=relevance, diversity=0.0, coverage=0.0).tolist() == [[0, 1]]
    assert select_tops(features, 4, relevance=relevance).tolist() == [[0, 1, 2, 3]]


def test_text_raters_are_the_rows_with_at_least_the_mean_image_mass() -> None:
    # Sample 0: masses 0.1, 0.5, 0.3 over its real rows (mean 0.3) and a padding row; sample 1: one real row.
    rows = torch.tensor(
        [
            [[0.05, 0.05], [0.4, 0.1], [0.1, 0.2], [0.4, 0.1]],
            [[0.3, 0.1], [0.3, 0.1], [0.3, 0.1], [0.3, 0.1]],
        ]
    )
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert text_raters(rows, mask).tolist() == [[False, True, True, False], [True, False, False, False]]
    relevance = rater_relevance(rows, mask)
    torch.testing.assert_close(relevance, torch.tensor([[0.25, 0.15], [0.3, 0.1]]))
    # Equal masses whose float32 mean rounds above each of them: no row passes, so the last real row rates alone.
    equal = torch.full((1, 4, 1), 67 / 97)
    assert text_raters(equal, torch.tensor([[True, True, True, False]])).tolist() == [[False, False, True, False]]
    # No real row (no text after the image): no rater, relevance 0; no row at all alike.
    assert not text_raters(rows[:1], torch.zeros(1, 4, dtype=torch.bool)).any()
    assert rater_relevance(rows[:, :0], mask[:, :0]).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_rater_rows_select_as_their_relevance_and_padding_rows_do_not_count() -> None:
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 12, 5, generator=generator)
    rows = torch.softmax(torch.randn(2, 6, 20, generator=generator), dim=-1)[..., :12]
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    padded = rows.clone()
    padded[1, 4:] = rows[1, 3]  # the engine's padding rows repeat the last real row
    kept = select_tops(features, 5, rows=padded, row_mask=mask)
    by_relevance = select_tops(features, 5, relevance=rater_relevance(rows, mask))
    assert torch.equal(kept, by_relevance)
    alone = select_tops(features[[1]], 5, rows=rows[[1], :4])
    assert torch.equal(alone[0], kept[1])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"diversity": -1}, "diversity=-1"),
        ({"coverage": float("nan")}, "coverage=nan"),
        ({"pre_diversity": float("inf")}, "pre_diversity=inf"),
        ({"pre_coverage": "strong"}, "pre_coverage='strong'"),
        ({"layers": [24, 12]}, r"layers=\[24, 12\]"),
        ({"layers": [12]}, r"layers=\[12\]"),
        ({"layers": [12, 32]}, r"layers=\[12, 32\]"),
    ],
)
def test_bad_options_are_refused_naming_the_value(options: dict, named: str) -> None:
    with pytest.raises(VlpruneError, match=named):
        create("tops", keep=16, **options)


def test_bad_selection_inputs_are_refused_naming_the_value() -> None:
    features, relevance = torch.randn(1, 6, 4), torch.rand(1, 6)
    with pytest.raises(VlpruneError, match=r"keep=7 must be an int count in \[1, 6\]"):
        select_tops(features, 7, relevance=relevance)
    with pytest.raises(VlpruneError, match=r"keep=0"):
        select_tops(features, 0, relevance=relevance)
    with pytest.raises(VlpruneError, match="exactly one of relevance"):
        select_tops(features, 2)
    with pytest.raises(VlpruneError, match=r"relevance \(1, 5\)"):
        select_tops(features, 2, relevance=relevance[:, :5])
    with pytest.raises(VlpruneError, match=r"rows \(1, 3, 5\)"):
        select_tops(features, 2, rows=torch.rand(1, 3, 5))
    with pytest.raises(VlpruneError, match=r"coverage=-0.5"):
        select_tops(features, 2, relevance=relevance, coverage=-0.5)
    with pytest.raises(VlpruneError, match="too shallow"):
        create("tops", keep=16).plan(64, 2)
    with pytest.raises(VlpruneError, match=r"layers=\[12, 30\] .* of a 28-layer model"):
        create("tops", keep=16, layers=[12, 30]).plan_for_family("qwen2.5-vl", 64, 28)


def test_plan_layers_and_counts_average_the_budget() -> None:
    paper = create("tops", keep=76).plan(576, 32)  # the paper's T = 64 on LLaVA-1.5-7B: 128 -> 64 -> 16
    assert [(s.layer, s.keep) for s in paper] == [(0, 128), (12, 64), (24, 16)]
    assert paper[0].needs == {vlprune.needs.Need.CLS_ATTENTION} and paper[0].query_rows is None
    assert all(s.query_rows is vlprune.pruners.QueryRows.TEXT and not s.needs for s in paper[1:])
    budget = create("tops", keep=64).plan(576, 32)
    assert [(s.layer, s.keep) for s in budget] == [(0, 108), (12, 54), (24, 13)]
    assert abs(layer_average(576, [0, 12, 24], [s.keep for s in budget], 32) - 64) < 0.5
    qwen = create("tops", keep=64).plan_for_family("qwen2.5-vl", 1296, 28)  # Table 10: layers 12 and 16 of 28
    assert [s.layer for s in qwen] == [0, 12, 16]
    assert abs(layer_average(1296, [0, 12, 16], [s.keep for s in qwen], 28) - 64) < 0.5
    assert [s.layer for s in create("tops", keep=64).plan_for_family("qwen2.5-vl", 1296, 36)] == [0, 15, 21]
    tiny = create("tops", keep=0.25).plan(64, 4)  # 12 and 24 of 32 scaled to 4 layers
    assert [(s.layer, s.keep) for s in tiny] == [(0, 24), (2, 12), (3, 3)]
    assert [s.layer for s in create("tops", keep=16).plan_for_family("qwen2.5-vl", 64, 4)] == [0, 2, 3]
    assert [s.layer for s in create("tops", keep=16, layers=[8, 16]).plan(64, 32)] == [0, 8, 16]
    assert [s.keep for s in create("tops", keep=64).plan(64, 4)] == [64, 64, 64]  # everything: no pruning
    assert [s.keep for s in create("tops", keep=16).plan(PROBE_TOKENS, 4)] == [PROBE_TOKENS] * 3


def test_registration_positions_and_families() -> None:
    pruner = create("tops", keep=8, diversity="0.25")  # text options (CLI, lmms-eval) are converted
    assert pruner.diversity == 0.25 and pruner.reference_positions() == "reindex"
    assert "from the paper; no public code" in TOPS.reference and TOPS.cls_substitute == "received"
    assert stages_of("tops") == "pre-LLM+in-LLM"
    assert families_of("tops") == ["llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def test_select_reads_the_stage_inputs() -> None:
    """Stage I: the projected tokens with the [CLS] attention (or the received attention); Stage II: the hidden
    states with the text raters' attention."""
    features = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    core = {"visual_positions": torch.arange(4)[None], "visual_origin": torch.arange(4)[None]}
    attention = torch.tensor([[0.4, 0.4, 0.15, 0.05]])
    pruner = create("tops", keep=2)
    first = StageContext(layer=0, keep=2, visual_hidden=features, vision_cls_attention=attention, **core)
    received = StageContext(layer=0, keep=2, visual_hidden=features, vision_received_attention=attention, **core)
    assert pruner.select(first).keep_index.tolist() == [[0, 2]] == pruner.select(received).keep_index.tolist()
    rows = torch.stack([attention[0], torch.tensor([0.0, 0.0, 0.0, 0.01])])[None]  # the second row rates nothing
    second = StageContext(
        layer=2, keep=2, visual_hidden=features, query_attention=rows, query_mask=torch.ones(1, 2, dtype=bool), **core
    )
    selection = pruner.select(second)
    assert selection.keep_index.tolist() == [[0, 2]]
    torch.testing.assert_close(selection.scores, attention)


def test_llava_generates_with_three_stages_and_a_batch_equals_its_samples() -> None:
    """Tiny LLaVA-1.5 (4 layers, 64 visual tokens, SDPA): stages at layers 0, 2 and 3 keep the planned counts, and
    each left-padded sample of a batch generates and keeps alone what it does in the batch."""
    model, processor = tiny_model("clip", 4)
    batch = tiny_inputs(processor, 2)
    with vlprune.attach(model, create("tops", keep=0.25)) as session:
        tokens, _ = greedy(model, batch, new_tokens=3)
        stages = session.stats.stages
        assert [(s.layer, s.visual_in, s.visual_out) for s in stages] == [(0, 64, 24), (2, 24, 12), (3, 12, 3)]
        assert session.stats.positions == "reindex"
        for index in range(2):
            alone = {key: value[index : index + 1] for key, value in batch.items()}
            real = alone["attention_mask"][0].bool()
            alone["input_ids"], alone["attention_mask"] = alone["input_ids"][:, real], alone["attention_mask"][:, real]
            single, _ = greedy(model, alone, new_tokens=3)
            assert torch.equal(single[0], tokens[index])
            assert [s.kept_indices[0] for s in session.stats.stages] == [s.kept_indices[index] for s in stages]


def test_qwen2_5_vl_runs_its_schedule_on_a_ragged_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny Qwen2.5-VL: Stage I reads the received attention (no [CLS]), Stage II the text rows; each sample of a
    ragged batch keeps alone what it keeps in the batch, with its multimodal positions."""
    together, contexts = ragged_alone_run(CASE["qwen2.5-vl"], monkeypatch, TOPS, "tops", keep=0.3)
    assert together.layer == 0
    layers = sorted({ctx.layer for ctx in contexts})
    assert layers == [0, 2, 3]
    first = [ctx for ctx in contexts if ctx.layer == 0]
    assert all(ctx.vision_received_attention is not None and ctx.vision_cls_attention is None for ctx in first)
    assert all(ctx.query_attention is not None for ctx in contexts if ctx.layer > 0)


def scores_after(similarity: torch.Tensor, relevance: torch.Tensor, prefix: torch.Tensor, alpha: float, lam: float):
    """(N,) Algorithm 1's scores of one sample once ``prefix`` is chosen, recomputed in float64."""
    similarity, relevance = similarity.double(), relevance.double()
    taken = torch.zeros(relevance.shape[0], dtype=torch.bool)
    taken[prefix] = True
    closest = similarity[prefix].max(dim=0).values
    gain = ((similarity - closest[None, :]).clamp(min=0) * (~taken).double()[None, :]).sum(dim=-1)

    def normalised(values: torch.Tensor) -> torch.Tensor:
        mean = values[~taken].mean()
        return values / mean if mean > 0 else torch.zeros_like(values)

    return normalised(relevance) + alpha * normalised(1 - closest) + lam * normalised(gain)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("diversity,coverage", [(0.5, 1.0), (0.0, 0.5)])
def test_the_step_by_step_coverage_update_picks_what_recomputing_it_picks(
    monkeypatch: pytest.MonkeyPatch, seed: int, diversity: float, coverage: float
) -> None:
    """The eager path updates the coverage gains from the changed columns; under torch.compile they are recomputed
    in full each step. Both choose the same tokens in the same order, up to the first near-tie (two candidates whose
    scores, recomputed in float64, differ by less than 1e-5 of the score), where float rounding may decide."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, STEPWISE_FROM + 64, 24, generator=generator)
    similarity = cosine_similarity(features)
    relevance = torch.rand(2, features.shape[1], generator=generator)
    stepwise = greedy_tops(similarity, relevance, 300, diversity, coverage)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    recomputed = greedy_tops(similarity, relevance, 300, diversity, coverage)
    for sample in range(2):
        differ = (stepwise[sample] != recomputed[sample]).nonzero()
        if len(differ) == 0:
            continue
        step = int(differ[0])
        scores = scores_after(similarity[sample], relevance[sample], recomputed[sample, :step], diversity, coverage)
        one, other = scores[stepwise[sample, step]], scores[recomputed[sample, step]]
        assert abs(float(one - other)) < 1e-5 * float(other.abs()), (sample, step)


@pytest.mark.parametrize("seed", [2, 3, 4])  # seeds where the residues, unguarded, change the picks
def test_covered_tokens_gain_exactly_nothing_so_relevance_decides(seed: int) -> None:
    """24 groups of 24 identical tokens: once every group has a chosen token, no token gains coverage; the
    step-by-step sums must then give exactly 0 (their rounding leaves residues of about 1e-5 here, which the mean
    normalisation would blow up), so the remaining picks follow relevance alone, as Algorithm 1 recomputed gives."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(1, 24, 16, generator=generator)
    similarity = cosine_similarity(centres.repeat_interleave(24, dim=1))
    relevance = torch.rand(1, 576, generator=generator)
    chosen = greedy_tops(similarity, relevance, 100, 0.0, 1.0)[0]
    assert len(set((chosen[:24] // 24).tolist())) == 24  # coverage first takes one token of every group
    rest = relevance[0].clone()
    rest[chosen[:24]] = -1
    assert torch.equal(chosen[24:], rest.topk(76).indices)
