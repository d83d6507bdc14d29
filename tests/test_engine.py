"""Engine behaviour on tiny random LLaVA-1.5 models that the invariant suite (``test_invariants.py``, which runs
keep-all, drop-equals-mask, batch, cache, captured and detach invariants over every family) does not cover: reindexed
positions, text-only calls, what reaches a pruner (text rows, initial embeddings, the vision tower's attention map),
in-place replacement of kept tokens, multi-token steps through a pruned cache, and half precision."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DEVICE, tiny_inputs, tiny_model
from family_cases import greedy, greedy_under_mask

import vlprune
from vlprune.kernels import gather_tokens
from vlprune.pruners import Pruner, QueryRows, Selection, Stage, StageContext, StagePlan

NEW_TOKENS = 5


def test_reindex_changes_positions_but_not_selection() -> None:
    model, processor = tiny_model("clip", 2)
    inputs = tiny_inputs(processor, 2)
    results = {}
    for positions in ("original", "reindex"):
        with vlprune.attach(model, vlprune.pruners.create("fastv", keep=16), positions=positions) as session:
            results[positions] = (greedy(model, inputs)[1], session.stats.stages[0].kept_indices)
    assert results["original"][1] == results["reindex"][1]
    assert (results["original"][0] - results["reindex"][0]).abs().max() > 1e-4


def test_a_text_only_call_inside_a_session_is_untouched() -> None:
    model, processor = tiny_model("clip", 4)
    ids = processor.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt").to(DEVICE)
    vanilla = model(**ids).logits
    with vlprune.attach(model, vlprune.pruners.create("fastv", keep=8)) as session:
        pruned = model(**ids).logits
    assert torch.equal(vanilla, pruned) and session.stats is None


class RecordingPruner(Pruner):
    """Keeps the first ``keep`` tokens and records what the engine handed it."""

    name = "recording"
    stage = Stage.IN_LLM

    def __init__(self, keep: int, layer: int) -> None:
        self.keep, self.layer, self.contexts = keep, layer, []

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [
            StagePlan(
                layer=self.layer, keep=self.keep, query_rows=QueryRows.TEXT, text_tokens=True, initial_embeddings=True
            )
        ]

    def select(self, ctx: StageContext) -> Selection:
        self.contexts.append(ctx)
        return Selection(keep_index=torch.arange(ctx.keep, device=ctx.visual_hidden.device).expand(ctx.batch_size, -1))


def test_text_rows_and_text_tokens_reach_the_pruner() -> None:
    """The attention of every instruction token to the visual tokens, against eager attention weights."""
    model, processor = tiny_model("dinov2", 2, attn="eager")
    inputs = tiny_inputs(processor, 2)
    outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    weights = outputs.attentions[1].mean(dim=1)  # (B, L, L), layer 1 feeds a stage at layer 2
    pruner = RecordingPruner(keep=8, layer=2)
    with vlprune.attach(model, pruner):
        model(**inputs)
    (ctx,) = pruner.contexts
    visual = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    for b in range(2):
        after_image = torch.arange(visual.shape[1], device=visual.device) > visual[b].nonzero()[0, 0]
        text = (real[b] & ~visual[b] & after_image).nonzero()[:, 0]
        count = len(text)
        assert int(ctx.text_mask[b].sum()) == count and bool(ctx.text_mask[b, :count].all())
        expected_rows = weights[b][text][:, visual[b]]  # (T, N)
        torch.testing.assert_close(ctx.query_attention[b, :count], expected_rows, atol=1e-5, rtol=0)
        # Layer-2 input hidden states are the output of layer 1 (hidden_states[2]).
        torch.testing.assert_close(ctx.text_hidden[b, :count], outputs.hidden_states[2][b, text], atol=1e-5, rtol=0)
        # The input embeddings (hidden_states[0]) of the same text and of the visual tokens, whatever the stage layer.
        embeddings = outputs.hidden_states[0][b]
        torch.testing.assert_close(ctx.initial_text_hidden[b, :count], embeddings[text], atol=0, rtol=0)
        torch.testing.assert_close(ctx.initial_visual_hidden[b], embeddings[visual[b]], atol=0, rtol=0)


class ReplacingPruner(Pruner):
    """Pre-LLM: keeps the visual tokens ``kept`` and gives them new hidden states (in-place merging)."""

    name = "replacing"
    stage = Stage.PRE_LLM

    def __init__(self, kept: list[int]) -> None:
        self.kept, self.keep = kept, len(kept)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self.keep)]

    def select(self, ctx: StageContext) -> Selection:
        index = torch.tensor(self.kept, device=ctx.visual_hidden.device).expand(ctx.batch_size, -1)
        replaced = gather_tokens(ctx.visual_hidden, index) * 0.5 + 1.0
        return Selection(keep_index=index, kept_hidden=replaced)


def test_kept_hidden_replaces_the_kept_tokens_in_place() -> None:
    """Oracle: the language model run on inputs_embeds where the kept tokens hold the new values and the others are
    gone, at the original positions."""
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 1)
    kept = [3, 10, 11, 40]
    with vlprune.attach(model, ReplacingPruner(kept)):
        logits = model(**inputs).logits
    out = model(**inputs, output_hidden_states=True)
    embeddings = out.hidden_states[0][0]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    keep_slots = visual[kept]
    sequence = embeddings.clone()
    sequence[keep_slots] = sequence[keep_slots] * 0.5 + 1.0
    stays = torch.ones(len(embeddings), dtype=torch.bool)
    stays[visual] = False
    stays[keep_slots] = True
    positions = stays.nonzero()[:, 0]
    expected = model(inputs_embeds=sequence[stays][None], position_ids=positions[None]).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- gaps found in review


@pytest.mark.parametrize("positions", ["original", "reindex"])
@pytest.mark.parametrize("method", ["random", "fastv", "visionzip"])
def test_a_multi_token_step_through_a_pruned_cache_equals_one_token_at_a_time(positions: str, method: str) -> None:
    """lmms-eval's log-likelihood path feeds a whole continuation in one call after a pruned prefill; each of its
    rows must equal the same token fed alone through the same pruned cache."""
    model, processor = tiny_model("clip", 2)
    inputs = tiny_inputs(processor, 1)
    length = inputs["input_ids"].shape[1]
    steps = torch.tensor([[5, 9, 13, 2]], device=inputs["input_ids"].device)

    def step(cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        return model(
            input_ids=ids,
            attention_mask=torch.ones(1, start + ids.shape[1], dtype=torch.long, device=ids.device),
            position_ids=torch.arange(start, start + ids.shape[1], device=ids.device)[None],
            past_key_values=cache,
            use_cache=True,
        ).logits[0]

    with vlprune.attach(model, vlprune.pruners.create(method, keep=16), positions=positions), torch.no_grad():
        together = step(model(**inputs, use_cache=True).past_key_values, steps, length)
        cache = model(**inputs, use_cache=True).past_key_values
        alone = torch.stack([step(cache, steps[:, i : i + 1], length + i)[-1] for i in range(steps.shape[1])])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_the_vision_attention_map_is_the_feature_layers_eager_attention_without_cls() -> None:
    """What PTP and VFlowOpt receive as ``vision_attention``: the head mean of the feature layer's softmax attention
    among the image's patches (rows: queries), normalised over every token of the tower, [CLS] included."""
    captured = {}

    @dataclasses.dataclass
    class MapReader(Pruner):
        name = "map-reader-test"
        stage = Stage.PRE_LLM

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=None, vision_attention=True)]

        def select(self, ctx: StageContext) -> Selection:
            captured.setdefault("maps", []).append(ctx.vision_attention)  # a stage of keep=None runs per sample
            index = torch.arange(ctx.num_visual, device=ctx.visual_hidden.device).expand(ctx.batch_size, -1)
            return Selection(keep_index=index)

    model, processor = tiny_model("clip", 4, attn="eager")
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, MapReader()), torch.no_grad():
        model(**inputs)
    captured["map"] = torch.cat(captured["maps"])
    tower = model.model.vision_tower
    with torch.no_grad():
        attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    # LLaVA reads hidden_states[-2], the output of the second-to-last layer, whose attention is attentions[-2].
    assert model.config.vision_feature_layer == -2
    expected = attentions[-2].mean(dim=1)[:, 1:, 1:]  # (B, N, N) without the [CLS] row and column
    torch.testing.assert_close(captured["map"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(captured["map"], captured["map"].transpose(1, 2), atol=1e-3)  # a transpose would fail
    assert (captured["map"].sum(dim=-1) < 1).all()  # [CLS] holds part of every row's mass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["fastv", "fastervlm", "visionzip"])
def test_the_engine_runs_in_half_precision(dtype: torch.dtype, method: str) -> None:
    """The CLI offers float16 and bfloat16: keep-all equals vanilla exactly, and pruning equals masking within the
    dtype's rounding (drop equals mask holds for the methods without recycling)."""
    model, processor = tiny_model("clip", 2, private=True)  # its own: the test changes its dtype
    model = model.to(dtype)
    inputs = tiny_inputs(processor, 2)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    vanilla_tokens, vanilla_logits = greedy(model, inputs)
    with vlprune.attach(model, vlprune.pruners.create("none")):
        tokens, logits = greedy(model, inputs)
    assert torch.equal(tokens, vanilla_tokens) and torch.equal(logits, vanilla_logits)
    with vlprune.attach(model, vlprune.pruners.create(method, keep=16), positions="original") as session:
        tokens, logits = greedy(model, inputs)
    assert next(model.parameters()).dtype == dtype and torch.isfinite(logits).all()
    assert session.stats.stages[0].visual_out == 16
    if method == "visionzip":
        return  # its merged tokens exist in no mask of the original sequence
    _, oracle_logits = greedy_under_mask(model, inputs, [(s.layer, s.kept_indices) for s in session.stats.stages])
    torch.testing.assert_close(logits[0].float(), oracle_logits[0].float(), atol=5e-2, rtol=0)
