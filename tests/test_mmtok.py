"""MMTok: the greedy against a loop over the reference kernel's steps, the coverage matrix against a direct
computation, the word filter, batch against alone, its options, and runs through the engine on tiny families."""

from __future__ import annotations

import pytest
import torch
from family_cases import CASE, greedy

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.pruners.mmtok import (
    DEFAULT_QUESTION,
    MMTok,
    coverage_matrix,
    greedy_coverage,
    instruction_words,
    select_mmtok,
    strip_role_markers,
    word_token_ids,
)


def reference_greedy(combined: torch.Tensor, k: int) -> list[int]:
    """``greedy_merged_jit_kernel`` written out with Python loops over one (R, N) matrix."""
    rows, count = combined.shape
    values = combined.tolist()
    best = [0.0] * rows
    taken: list[int] = []
    for _ in range(k):
        gains = [
            float("-inf") if j in taken else sum(max(0.0, values[r][j] - best[r]) for r in range(rows))
            for j in range(count)
        ]
        pick = max(range(count), key=lambda j: (gains[j], -j))  # torch.argmax: the first maximum
        taken.append(pick)
        best = [max(best[r], values[r][pick]) for r in range(rows)]
    return taken


def test_greedy_matches_the_reference_loop():
    generator = torch.Generator().manual_seed(3)
    for rows, count, k in ((5, 9, 4), (12, 20, 20), (3, 30, 7)):
        combined = torch.rand(2, rows, count, generator=generator, dtype=torch.float64)
        picks = greedy_coverage(combined, k)
        for b in range(2):
            assert picks[b].tolist() == reference_greedy(combined[b], k)


def test_greedy_hand_worked():
    combined = torch.tensor([[0.9, 0.8, 0.0, 0.1], [0.0, 0.7, 0.6, 0.0], [0.1, 0.0, 0.6, 0.5]], dtype=torch.float64)
    # Step 1 gains (column sums) 1.0, 1.5, 1.2, 0.6 -> 1; best = (0.8, 0.7, 0.0).
    # Step 2: col 0 -> 0.1 + 0 + 0.1 = 0.2, col 2 -> 0 + 0 + 0.6 = 0.6, col 3 -> 0 + 0 + 0.5 = 0.5 -> 2.
    # Step 3: best = (0.8, 0.7, 0.6): col 0 -> 0.1, col 3 -> 0 -> 0.
    assert greedy_coverage(combined[None], 3)[0].tolist() == [1, 2, 0]
    tie = torch.ones(1, 2, 3, dtype=torch.float64)
    assert greedy_coverage(tie, 2)[0].tolist() == [0, 1]  # ties go to the lowest index


def test_coverage_matrix_is_the_direct_computation():
    generator = torch.Generator().manual_seed(1)
    visual, vision, words = (torch.randn(n, d, generator=generator) for n, d in ((6, 8), (6, 5), (3, 8)))
    combined = coverage_matrix(visual, vision, words, alpha=0.5, tv_temperature=0.02, vv_temperature=0.2)
    v, c, z = (t.double() / t.double().norm(dim=-1, keepdim=True) for t in (visual, vision, words))
    p = torch.exp((z @ v.T) / 0.02)
    p = p / p.sum(dim=1, keepdim=True) / 3
    q = torch.exp((c @ c.T) / 0.2)
    q = q / q.sum(dim=1, keepdim=True) / 6
    assert torch.allclose(combined.double(), torch.cat([p, 0.5 * q]), atol=1e-6)


def test_words():
    assert strip_role_markers("\nWhat colour is the square? ASSISTANT:") == "What colour is the square?"
    assert strip_role_markers("How many cars?\nassistant\n") == "How many cars?"
    assert strip_role_markers("Describe it [/INST]") == "Describe it"
    question = "\nWhat colour is the red car?\nAnswer the question using a single word or phrase. ASSISTANT:"
    assert instruction_words(question) == ["colour", "red", "car"]
    options = "Which one is it?\nA. dog\nB. cat\nAnswer with the option's letter from the given choices directly."
    assert instruction_words(options) == ["one", "dog", "B", "cat"]  # "A" is the stop-word "a"
    # No word survives the stop-words: the reference falls back to the (suffix-stripped) text, split.
    assert instruction_words("What is it? ASSISTANT:") == ["What", "is", "it?"]
    assert instruction_words(" ASSISTANT:") == [
        "see",
        "in",
        "this",
        "image",
    ]  # the reference's default question, filtered
    assert instruction_words("What is the cat?\nassistant\n", "question") == ["Question:", "What", "is", "the", "cat?"]
    assert instruction_words("", "question") == ["Question:", *DEFAULT_QUESTION.split()]
    with pytest.raises(VlpruneError, match="'words'"):
        instruction_words("x", "words")


def test_word_token_ids_drop_the_bos():
    _, processor = CASE["llava-clip"].model()
    tokenizer = processor.tokenizer
    ids = word_token_ids(["red", "car"], tokenizer)
    assert ids == tokenizer(["red", "car"], is_split_into_words=True)["input_ids"][1:]
    assert ids[0] != tokenizer.bos_token_id


def test_batch_equals_alone_and_crops():
    generator = torch.Generator().manual_seed(5)
    visual, vision = torch.randn(2, 12, 8, generator=generator), torch.randn(2, 12, 6, generator=generator)
    words = torch.randn(2, 4, 8, generator=generator)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    batch = select_mmtok(visual, vision, words, mask, 5)
    for b in range(2):
        alone = select_mmtok(visual[b : b + 1], vision[b : b + 1], words[b : b + 1, mask[b]], None, 5)
        assert torch.equal(batch.index[b], alone.index[0])
        combined = coverage_matrix(visual[b], vision[b], words[b, mask[b]])
        assert batch.index[b].tolist() == sorted(reference_greedy(combined.double(), 5))
    crops = torch.tensor([[0] * 4 + [-1] + [1] * 7] * 2)
    tiled = select_mmtok(visual, vision, words, mask, 6, crops=crops)
    for b in range(2):
        kept = tiled.index[b].tolist()
        assert 4 not in kept and len([i for i in kept if i < 4]) == 2  # 4 of 11 tokens: 2 of 6 (crop_quotas)
        first = coverage_matrix(visual[b, :4], vision[b, :4], words[b, mask[b]])
        assert [i for i in kept if i < 4] == sorted(reference_greedy(first.double(), 2))


@pytest.mark.parametrize(
    ("options", "bad"),
    [({"alpha": -1.0}, "alpha=-1.0"), ({"tv_temperature": 0}, "tv_temperature=0"), ({"text": "all"}, "text='all'")],
)
def test_bad_options(options, bad):
    with pytest.raises(VlpruneError, match=bad):
        create("mmtok", keep=4, **options)
    with pytest.raises(VlpruneError, match=r"retain_ratio=1\.5"):
        MMTok(retain_ratio=1.5)
    with pytest.raises(VlpruneError, match="keep=40"):
        select_mmtok(torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.randn(1, 2, 4), None, 40)


def test_select_without_a_tokenizer_says_how_to_bind_one():
    model, processor = CASE["llava-clip"].model()
    inputs = CASE["llava-clip"].inputs(processor)
    with vlprune.attach(model, create("mmtok", keep=4)), pytest.raises(VlpruneError, match="use_tokenizer"):
        greedy(model, inputs, new_tokens=1)


@pytest.mark.parametrize("case_id", ["llava-clip", "qwen2.5-vl", "llava-next"])
def test_engine_runs_and_batch_equals_alone(case_id, monkeypatch):
    case = CASE[case_id]
    model, processor = case.model()
    contexts = []
    select = MMTok.select
    monkeypatch.setattr(MMTok, "select", lambda self, ctx: contexts.append(ctx) or select(self, ctx))
    pruner = create("mmtok", keep=None if case.qwen else 6).use_tokenizer(processor)
    kind = case.prompt_kind
    batch = case.inputs(processor, kind)
    with vlprune.attach(model, pruner) as session:
        tokens, _ = greedy(model, batch, new_tokens=2)
        stage = session.stats.stages[0]
        for index in range(2):
            alone, _ = greedy(model, case.alone(processor, batch, kind, index), new_tokens=2)
            assert torch.equal(alone[0], tokens[index])
            assert session.stats.stages[0].kept_indices[0] == stage.kept_indices[index]
    for ctx in contexts:
        assert ctx.instruction_ids is not None and ctx.input_embeddings is not None
        if case.qwen:  # no keep: the reference's retain ratio, floor(0.2 · n) per sample
            assert ctx.keep == max(1, int(0.2 * ctx.num_visual))
