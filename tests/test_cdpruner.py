"""CDPruner: the fast-MAP DPP against brute force, the selection against a plain loop over the reference's steps, its
per-crop path, its options, and its runs through the engine on the tiny families."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, tiny_inputs, tiny_model
from family_cases import CASE, ragged_alone_run

import vlprune
from vlprune.adapters import traits_of
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import Stage, StageContext, create, families_of
from vlprune.pruners.cdpruner import CDPruner, dpp_greedy, select_cdpruner


def greedy_log_det(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the token that makes ``det(L_S)`` largest (float64 determinants)."""
    kernel = kernel.double()
    chosen: list[int] = []
    for _ in range(k):
        gains = {
            i: float(torch.linalg.det(kernel[[*chosen, i]][:, [*chosen, i]]))
            for i in range(len(kernel))
            if i not in chosen
        }
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))
    return chosen


def reference_loop(
    visual: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    keep: int,
    theta: float | None = None,
    per_sample: bool = False,
) -> list[list[int]]:
    """The reference's ``encode_images`` on Python floats, with the relevance of the embeddings variant: cosines, one
    min-max over the batch (or per sample), the optional exponent, the kernel, and Chen et al.'s incremental
    Cholesky greedy written out per sample with scalar loops."""
    batch, count = visual.shape[:2]
    unit = [[v / max(v.norm(), 1e-30) for v in visual[b].double()] for b in range(batch)]
    means = [text[b][mask[b]].double().mean(dim=0) for b in range(batch)]
    relevance = [[float(u @ (means[b] / means[b].norm())) for u in unit[b]] for b in range(batch)]

    def normalised(values: list[float], low: float, high: float) -> list[float]:
        return [(r - low + 1e-6) / (high - low) for r in values]

    if per_sample:
        relevance = [normalised(r, min(r), max(r)) for r in relevance]
    else:
        flat = [r for row in relevance for r in row]
        relevance = [normalised(r, min(flat), max(flat)) for r in relevance]
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        relevance = [[math.exp(alpha * r) for r in row] for row in relevance]
    out = []
    for b in range(batch):
        r = relevance[b]
        kernel = [[r[i] * float(unit[b][i] @ unit[b][j]) * r[j] for j in range(count)] for i in range(count)]
        gains = [kernel[i][i] for i in range(count)]
        factors: list[list[float]] = []
        picks = []
        for _ in range(keep):
            j = max(range(count), key=lambda i: (gains[i], -i))
            picks.append(j)
            e = [(kernel[j][n] - sum(c[j] * c[n] for c in factors)) / math.sqrt(gains[j]) for n in range(count)]
            factors.append(e)
            gains = [g - x * x for g, x in zip(gains, e, strict=True)]
            gains[j] = float("-inf")
        out.append(sorted(picks))
    return out


def random_inputs(batch: int, count: int, width: int = 24, text: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, count, width, generator=generator)
    words = torch.randn(batch, text, width, generator=generator)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[0, -2:] = False  # a shorter instruction, padded
    return visual, words, mask


def test_dpp_greedy_on_a_hand_built_kernel() -> None:
    """Token 1 is a near-copy of token 0 and token 3 is orthogonal to everything but weakly weighted: the greedy takes
    0 (the heaviest), then 2 (1 adds almost no volume), then 3 before 1 (4 is close to 2)."""
    features = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.1, 0.98, 0.17]])
    features = features / features.norm(dim=-1, keepdim=True)
    weights = torch.tensor([1.0, 0.95, 0.9, 0.5, 0.85])
    kernel = weights[:, None] * (features @ features.T) * weights[None]
    picks = dpp_greedy(kernel[None], 4)[0].tolist()
    assert picks == greedy_log_det(kernel, 4) == [0, 2, 3, 4]


@pytest.mark.parametrize("seed", range(6))
def test_dpp_greedy_equals_brute_force_greedy_log_det(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    kernel = weights[:, None] * (features @ features.T) * weights[None]
    for k in range(1, 6):
        assert dpp_greedy(kernel[None], k)[0].tolist() == greedy_log_det(kernel, k)


def test_dpp_greedy_keeps_distinct_picks_when_the_rank_is_spent() -> None:
    """Rank 2 with 6 tokens: after two picks no volume is left; the rest are still distinct tokens, no NaN."""
    features = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    kernel = features @ features.T
    picks = dpp_greedy(kernel[None], 6)[0].tolist()
    assert sorted(picks) == list(range(6)) and picks[:2] == greedy_log_det(kernel, 2)


@pytest.mark.parametrize(
    "count,keep,theta,per_sample",
    [(40, 8, None, False), (40, 8, 0.5, False), (32, 16, None, True), (20, 20, 0.3, False), (12, 1, None, False)],
)
def test_selection_equals_the_reference_loop(count: int, keep: int, theta: float | None, per_sample: bool) -> None:
    visual, text, mask = random_inputs(2, count, seed=count + keep)
    normalise = "sample" if per_sample else "batch"
    kept = select_cdpruner(visual, text, mask, keep, relevance_weight=theta, normalise=normalise)
    assert kept.index.shape == (2, keep) and kept.index.dtype == torch.long
    assert kept.index.tolist() == reference_loop(visual, text, mask, keep, theta, per_sample)


def test_batch_normalisation_couples_samples_and_sample_normalisation_does_not() -> None:
    visual, text, mask = random_inputs(4, 48, seed=7)
    together = select_cdpruner(visual, text, mask, 12, normalise="sample").index
    for b in range(4):
        alone = select_cdpruner(visual[b : b + 1], text[b : b + 1], mask[b : b + 1], 12, normalise="sample").index
        assert torch.equal(together[b : b + 1], alone)
    # The reference's one min-max over the batch: a sample alone is normalised over itself only.
    assert select_cdpruner(visual, text, mask, 12).index.tolist() == reference_loop(visual, text, mask, 12)


def test_padded_instruction_tokens_are_ignored() -> None:
    visual, text, mask = random_inputs(1, 30, seed=3)
    mask[0, -2:] = False
    noisy = text.clone()
    noisy[0, -2:] = 100.0
    assert torch.equal(select_cdpruner(visual, text, mask, 9).index, select_cdpruner(visual, noisy, mask, 9).index)


def test_negative_relevance_flips_the_cosine() -> None:
    visual, text, mask = random_inputs(1, 30, seed=4)
    flipped = select_cdpruner(visual, text, mask, 9, negative_relevance=True)
    assert torch.equal(flipped.index, select_cdpruner(visual, -text, mask, 9).index)


def test_per_crop_selection_keeps_line_breaks_and_shares_the_budget() -> None:
    """A base view of 16 tokens, two tiles of 12 and 4 line breaks: line breaks kept, the rest (20 - 4 = 16) shared
    by size (16, 12, 12 tokens): floor(6.4, 4.8, 4.8) and the remainder to the largest crops, 7, 5, 4, each crop by
    its own DPP on one batch-wide normalisation."""
    crops = torch.tensor([[0] * 16 + [1] * 6 + [-1] + [2] * 6 + [-1] + [1] * 6 + [-1] + [2] * 6 + [-1]])
    count = crops.shape[1]
    visual, text, mask = random_inputs(1, count, seed=11)
    visual = visual.masked_fill((crops == -1)[..., None], 0.0)
    kept = select_cdpruner(visual, text, mask, 20, crops=crops)
    relevance = kept.relevance[0]
    line_breaks = (crops[0] == -1).nonzero()[:, 0].tolist()
    expected = list(line_breaks)
    unit = visual[0] / visual[0].norm(dim=-1, keepdim=True).clamp_min(1e-30)
    for crop, share in ((0, 7), (1, 5), (2, 4)):
        members = (crops[0] == crop).nonzero()[:, 0]
        r = relevance[members]
        kernel = r[:, None] * (unit[members] @ unit[members].T) * r[None]
        expected += members[greedy_log_det(kernel, share)].tolist()
    assert kept.index.tolist() == [sorted(expected)]
    # The normalisation spans the crops together: min 1e-6 / spread, max about 1, none at line breaks.
    real = relevance[crops[0] >= 0]
    assert float(real.max()) == pytest.approx(1.0, abs=1e-5) and float(real.min()) < 1e-3
    assert relevance[line_breaks].eq(0).all()
    # A budget no larger than the line breaks drops them.
    small = select_cdpruner(visual, text, mask, 4, crops=crops).index[0].tolist()
    assert not set(small) & set(line_breaks) and len(set(small)) == 4


@pytest.mark.parametrize("theta", [0.0, 1.0, 1.5, -0.2, True, "half"])
def test_bad_relevance_weight_is_refused_naming_the_value(theta: object) -> None:
    with pytest.raises(VlpruneError, match="relevance_weight"):
        CDPruner(keep=16, relevance_weight=theta)
    visual, text, mask = random_inputs(1, 8)
    with pytest.raises(VlpruneError, match="relevance_weight"):
        select_cdpruner(visual, text, mask, 4, relevance_weight=theta)


def test_bad_options_and_budgets_are_refused() -> None:
    with pytest.raises(VlpruneError, match="normalise='global'"):
        create("cdpruner", keep=16, normalise="global")
    with pytest.raises(VlpruneError, match=r"relevance='clip'.*not implemented"):
        create("cdpruner", keep=16, relevance="clip")
    with pytest.raises(VlpruneError, match="relevance='siglip'"):
        create("cdpruner", keep=16, relevance="siglip")
    visual, text, mask = random_inputs(1, 8)
    for keep in (0, 9):
        with pytest.raises(VlpruneError, match=f"keep={keep}"):
            select_cdpruner(visual, text, mask, keep)


def test_declaration_and_plans() -> None:
    pruner = create("cdpruner", keep=64)
    assert (pruner.stage, pruner.default_positions) == (Stage.PRE_LLM, "reindex")
    assert (pruner.relevance_weight, pruner.normalise, pruner.negative_relevance, pruner.relevance) == (
        None,
        "sample",
        False,
        "embeddings",
    )
    [plan] = pruner.plan_for(traits_of("llava"), 576, 32)
    assert (plan.layer, plan.keep, plan.needs) == (0, 64, {Need.INITIAL_EMBEDDINGS})
    assert families_of("cdpruner") == [
        "llava",
        "llava-next",
        "llava-onevision",
        "qwen2-vl",
        "qwen2.5-vl",
        "qwen3-vl",
    ]


def test_select_on_a_hand_built_context() -> None:
    visual, text, mask = random_inputs(2, 30, seed=2)
    ctx = StageContext(
        layer=0,
        keep=9,
        visual_hidden=visual,
        visual_positions=torch.arange(30).expand(2, -1),
        visual_origin=torch.arange(30).expand(2, -1),
        initial_text_hidden=text,
        initial_text_mask=mask,
    )
    selection = create("cdpruner", keep=9, relevance_weight=0.5).select(ctx)
    assert selection.keep_index.tolist() == reference_loop(visual, text, mask, 9, 0.5)
    assert selection.scores.shape == (2, 30)


def test_engine_keeps_what_the_reference_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaVA-1.5: the stage sees the projector's output and the instruction's input embeddings, and keeps what the
    reference loop keeps from them."""
    model, processor = tiny_model("clip", 2)
    inputs = tiny_inputs(processor, 2)
    contexts: list[StageContext] = []
    select = CDPruner.select
    monkeypatch.setattr(CDPruner, "select", lambda self, ctx: contexts.append(ctx) or select(self, ctx))
    with vlprune.attach(model, create("cdpruner", keep=16)) as session, torch.no_grad():
        model(**inputs)
    [ctx] = contexts
    with torch.no_grad():
        projected = model.get_image_features(pixel_values=inputs["pixel_values"])
    projected = getattr(projected, "pooler_output", projected)  # newer transformers return an output object
    projected = projected if isinstance(projected, torch.Tensor) else torch.stack(list(projected))
    assert torch.allclose(ctx.visual_hidden.float(), projected.reshape(ctx.visual_hidden.shape).float(), atol=1e-5)
    # The default normalises each sample on its own: the reference's relevance at its batch of one.
    expected = reference_loop(
        ctx.visual_hidden, ctx.initial_text_hidden, ctx.initial_text_mask.bool(), 16, per_sample=True
    )
    assert session.stats.positions == "reindex"
    assert session.stats.stages[0].kept_indices == expected


@pytest.mark.skipif(DEVICE != "cpu", reason="the tiled and Qwen-VL cases run on the CPU")
@pytest.mark.parametrize("case_id", ["llava-next", "qwen2-vl"])
def test_engine_runs_per_crop_and_on_qwen_and_a_ragged_batch_equals_its_samples(
    case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiled families keep their line breaks and select crop by crop; a ragged batch is selected sample by sample,
    so each sample keeps what it keeps alone."""
    case = CASE[case_id]
    together, contexts = ragged_alone_run(case, monkeypatch, CDPruner, "cdpruner", 0.5)
    assert together.visual_out_per_sample == [round(0.5 * n) for n in together.visual_in_per_sample]
    if case.qwen:
        return
    for ctx, kept in zip(contexts[:2], together.kept_indices, strict=True):
        line_breaks = set(ctx.geometry.is_newline[0].nonzero()[:, 0].tolist())
        assert line_breaks and line_breaks <= set(kept)  # the reference always keeps image_newline
        assert len(set(ctx.geometry.crop[0, kept].tolist()) - {-1}) > 1  # every crop takes its share
