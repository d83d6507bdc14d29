"""DART: the selection against a loop over the reference's code path, the count rule, batches, bad options, and the
engine's inputs (final norm, keys of the layer before) against the same loop on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vlprune
import vlprune.pruners.dart
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.pruners.dart import dart_count, select_dart


def reference_dart(normed: torch.Tensor, keys: torch.Tensor, start: int, length: int, budget: int) -> list[int]:
    """The reference's ``get_retained_image_token`` for one sample (normed (L, D), keys (L, heads * d)), with its
    set-order pivot loop replaced by ascending order (the documented deviation). Indices among the visual tokens."""
    per_pivot = budget // 8
    image_norms = keys[start : start + length].abs().sum(-1)
    text_norms = keys[start + length :].abs().sum(-1)
    image_pivots = (image_norms.topk(4).indices + start).tolist()
    text_pivots = (text_norms.topk(4).indices + start + length).tolist()
    kept = set(image_pivots + text_pivots)
    valid = sorted(set(range(start, start + length)) - set(image_pivots))
    for pivot in sorted(kept):
        dissimilarity = -torch.nn.functional.cosine_similarity(normed[pivot], normed[valid], dim=-1)
        picked = [valid[i] for i in dissimilarity.topk(per_pivot).indices.tolist()]
        kept.update(picked)
        valid = [i for i in valid if i not in picked]
    kept.difference_update(text_pivots)
    return sorted(i - start for i in kept)


def _random_sample(generator: torch.Generator, length: int, texts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    start = 3
    total = start + length + texts
    return torch.randn(total, 8, generator=generator), torch.randn(total, 12, generator=generator), start


def _select(samples: list[tuple[torch.Tensor, torch.Tensor, int]], length: int, budget: int) -> torch.Tensor:
    """select_dart over samples padded to one text length (padding repeats the last real row, as the engine's)."""
    texts = max(normed.shape[0] - start - length for normed, _, start in samples)
    rows = []
    for normed, keys, start in samples:
        real = normed.shape[0] - start - length
        order = list(range(real)) + [real - 1] * (texts - real)
        text = start + length + torch.tensor(order)
        mask = torch.arange(texts) < real
        rows.append((normed[start : start + length], normed[text], keys[start : start + length], keys[text], mask))
    visual, text, visual_keys, text_keys, mask = (torch.stack(parts) for parts in zip(*rows, strict=True))
    keep = dart_count(budget, length)
    return select_dart(visual, text, visual_keys.abs().sum(-1), text_keys.abs().sum(-1), mask, keep, budget // 8)


@pytest.mark.parametrize(("length", "budget"), [(40, 16), (64, 24), (30, 26)])
def test_selection_matches_the_reference_loop(length: int, budget: int) -> None:
    generator = torch.Generator().manual_seed(length + budget)
    for texts in (4, 7, 11):
        sample = _random_sample(generator, length, texts)
        expected = reference_dart(*sample[:2], sample[2], length, budget)
        assert _select([sample], length, budget)[0].tolist() == expected


def test_a_batch_equals_its_samples_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = [_random_sample(generator, 36, texts) for texts in (5, 9, 6)]
    batch = _select(samples, 36, 16)
    for index, sample in enumerate(samples):
        assert batch[index].tolist() == _select([sample], 36, 16)[0].tolist()


def test_a_sample_with_few_text_tokens_reuses_its_last_one() -> None:
    generator = torch.Generator().manual_seed(1)
    short, long = _random_sample(generator, 32, 2), _random_sample(generator, 32, 8)
    kept = _select([short, long], 32, 16)
    assert kept.shape == (2, dart_count(16, 32)) and all(len(set(row.tolist())) == kept.shape[1] for row in kept)


def test_count_rule_is_the_references() -> None:
    assert dart_count(128, 576) == 132 and dart_count(64, 576) == 68 and dart_count(192, 576) == 196
    assert dart_count(7, 576) == 4  # fewer than one token per pivot: the image pivots alone
    assert dart_count(576, 576) == 576  # more than present: everything
    plan = create("dart", keep=128).plan(576, 32)
    assert [(stage.layer, stage.keep) for stage in plan] == [(2, 132)]
    assert create("dart", keep=0.25).plan(576, 32)[0].keep == 4 + 8 * (144 // 8)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pivot_image_tokens": 0}, "pivot_image_tokens=0"),
        ({"pivot_text_tokens": 2.5}, "pivot_text_tokens=2.5"),
        ({"layer": 0}, "0"),
        ({"layer": 40}, "40"),
    ],
)
def test_bad_options_are_refused_naming_the_value(options: dict, named: str) -> None:
    with pytest.raises(VlpruneError, match=named):
        create("dart", keep=16, **options).plan(64, 32)


def _reference_on_model(model, inputs, layer: int, budget: int) -> list[int]:
    """The reference run by hand on the unpruned model: the layer's input through the final norm, and the keys of
    the layer before recomputed from its attention's input (post-RoPE, key-value heads repeated)."""
    attention = model.model.language_model.layers[layer - 1].self_attn
    captured = {}

    def keep_input(module, args, kwargs):
        captured.update(hidden=kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    handle = attention.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad():
            states = model(**inputs, output_hidden_states=True).hidden_states[layer][0]
            hidden = captured["hidden"]
            keys = attention.k_proj(hidden).view(*hidden.shape[:2], -1, attention.head_dim).transpose(1, 2)
            _, keys = apply_rotary_pos_emb(keys, keys, *captured["rope"])
            keys = keys.repeat_interleave(attention.num_key_value_groups, dim=1)[0].transpose(0, 1).flatten(1)
            normed = model.model.language_model.norm(states)
    finally:
        handle.remove()
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    return reference_dart(normed, keys, int(visual[0]), len(visual), budget)


@pytest.mark.parametrize(("vision", "kv_heads"), [("clip", 4), ("dinov2", 2)])
def test_engine_matches_the_reference_on_a_tiny_model(vision: str, kv_heads: int) -> None:
    """With SDPA (no attention map), the engine's final norm and keys of layer K - 1 pick what the reference picks,
    for each sample alone and in a left-padded batch of two."""
    model, processor = tiny_model(vision, kv_heads)
    batch = tiny_inputs(processor, 2)
    expected = []
    for index in range(2):
        alone = {key: value[index : index + 1] for key, value in batch.items()}
        real = alone["attention_mask"][0].bool()
        alone["input_ids"], alone["attention_mask"] = alone["input_ids"][:, real], alone["attention_mask"][:, real]
        expected.append(_reference_on_model(model, alone, 2, 16))
    # Mask-aware positions, as generate() passes them: post-RoPE keys, unlike the hidden states, depend on absolute
    # positions, so a left-padded sample at shifted positions would pick other pivots than alone.
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with vlprune.attach(model, create("dart", keep=16)) as session, torch.no_grad():
        model(**batch, position_ids=positions)
    (stage,) = session.stats.stages
    assert stage.layer == 2 and stage.visual_out == dart_count(16, 64) == 20
    assert stage.kept_indices == expected
