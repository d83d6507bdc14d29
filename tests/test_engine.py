"""Engine invariants on tiny random models: keep-all equals vanilla, drop equals mask, batches equal single samples,
cached decoding equals recomputation, and detaching restores the model."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import DEVICE, MODEL_KINDS, tiny_inputs, tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vlprune
from vlprune.kernels import gather_tokens
from vlprune.pruners import Pruner, QueryRows, Selection, Stage, StageContext, StagePlan

NEW_TOKENS = 5


def greedy(model, inputs, new_tokens: int = NEW_TOKENS):
    """Greedy generation returning (tokens (B, T), logits (T, B, V))."""
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt:], torch.stack(out.logits)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_none_is_identical_to_vanilla(vision: str, kv_heads: int, attn: str, batch: int) -> None:
    model, processor = tiny_model(vision, kv_heads, attn)
    inputs = tiny_inputs(processor, batch)
    tokens, logits = greedy(model, inputs)
    with vlprune.attach(model, vlprune.pruners.create("none")) as session:
        pruned_tokens, pruned_logits = greedy(model, inputs)
    assert torch.equal(tokens, pruned_tokens)
    torch.testing.assert_close(pruned_logits, logits, atol=1e-6, rtol=0)
    assert session.stats.visual_tokens == 64
    assert session.stats.stages == []


class MaskOracle:
    """Vanilla model, but from each stage's layer on the visual tokens it pruned cannot be seen as keys (prefill and
    decode). ``stages``: (layer, kept original visual indices per sample) in layer order."""

    def __init__(self, model, input_ids: torch.Tensor, stages: list[tuple[int, list[list[int]]]], visual_ids: tuple):
        visual = torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device))
        self.pruned_from: dict[int, torch.Tensor] = {}
        for layer, kept in stages:
            pruned = torch.zeros_like(visual)
            for b, keep in enumerate(kept):
                slots = visual[b].nonzero()[:, 0]
                drop = torch.ones(len(slots), dtype=torch.bool, device=slots.device)
                drop[keep] = False
                pruned[b, slots[drop]] = True
            self.pruned_from[layer] = pruned
        layers = model.model.language_model.layers
        self.handles = [
            layers[index].register_forward_pre_hook(functools.partial(self.hook, index), with_kwargs=True)
            for index in range(stages[0][0], len(layers))
        ]

    def pruned(self, index: int) -> torch.Tensor:
        return self.pruned_from[max(layer for layer in self.pruned_from if layer <= index)]

    def hook(self, index: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, q_len = hidden.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:  # SDPA without padding: causal over the cache plus the new tokens
            k_len = kwargs["cache"].get_seq_length(index) + q_len
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=hidden.device).tril(k_len - q_len)
            mask = causal[None, None].expand(batch, 1, q_len, k_len)
        pruned_keys = self.pruned(index)[:, None, None, :]
        pruned_keys = torch.nn.functional.pad(pruned_keys, (0, mask.shape[-1] - pruned_keys.shape[-1]))
        if mask.dtype == torch.bool:
            kwargs["attention_mask"] = mask & ~pruned_keys
        else:
            kwargs["attention_mask"] = mask.masked_fill(pruned_keys, torch.finfo(mask.dtype).min)
        return args, kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def greedy_under_mask(model, inputs, stages: list[tuple[int, list[list[int]]]]):
    """``greedy`` on the unpruned model with the pruned tokens masked from each stage layer on (``stages``: the
    (layer, kept_indices) of a pruned run's statistics): what pruning must equal with original positions."""
    visual_ids = tuple(
        int(token) for token in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if token
    )  # a video's tokens are visual tokens too (Qwen-VL)
    oracle = MaskOracle(model, inputs["input_ids"], stages, visual_ids)
    try:
        return greedy(model, inputs)
    finally:
        oracle.remove()


PRUNING_CASES = [
    ("fastv", {"keep": 16, "layer": 2}, 2),
    ("random", {"keep": 20}, 0),
    ("random", {"keep": 12, "layer": 1, "seed": 4}, 1),
    ("fastervlm", {"keep": 16}, 0),
    ("divprune", {"keep": 16}, 0),
    ("zoo-prune", {"keep": 16, "directions": 8}, 0),
    ("holov", {"keep": 16}, 0),
    ("holov", {"keep": 16, "crops": 4, "tiles": True}, 0),
    ("ptp", {"keep": 16}, 3),
]
# Several stages inside the language model (layers of a 32-layer model scaled to the tiny model's 4: 1, 2, 3).
MULTI_STAGE_CASES = [
    ("pyramiddrop", {"layers": [8, 16, 24], "ratios": [0.5, 0.25, 0.125]}),
    ("pyramiddrop", {"keep": 20}),
    ("sparsevlm", {"keep": 0.3, "recycle": False}),
    ("sparsevlm", {"keep": 0.3, "version": 2}),
    ("vflowopt", {"keep": 0.25, "recycle": False}),
]
# Methods that recycle pruned tokens add new ones, so no mask of the original sequence reproduces them.
RECYCLING_CASES = [("visionzip", {"keep": 16}), ("sparsevlm", {"keep": 0.3}), ("vflowopt", {"keep": 0.25})]


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,options,layer", PRUNING_CASES)
def test_drop_equals_mask(vision: str, kv_heads: int, attn: str, method: str, options: dict, layer: int) -> None:
    model, processor = tiny_model(vision, kv_heads, attn)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create(method, **options), positions="original") as session:
        tokens, logits = greedy(model, inputs)
    stage = session.stats.stages[0]
    assert stage.layer == layer and stage.visual_out == options["keep"]
    stages = [(s.layer, s.kept_indices) for s in session.stats.stages]
    oracle_tokens, oracle_logits = greedy_under_mask(model, inputs, stages)
    _, vanilla_logits = greedy(model, inputs)
    assert torch.equal(tokens, oracle_tokens)
    torch.testing.assert_close(logits, oracle_logits, atol=1e-4, rtol=0)
    # The invariant is only meaningful if pruning changed something.
    assert (logits - vanilla_logits).abs().max() > 1e-3


@pytest.mark.parametrize("vision,kv_heads", MODEL_KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
# The rank rule's count comes from each sample's data (a stage with keep=None runs sample by sample).
@pytest.mark.parametrize(
    "method,options",
    [*MULTI_STAGE_CASES, ("sparsevlm", {"keep": 0.111, "rule": "rank", "recycle": False, "layers": [2, 6, 15]})],
)
def test_multi_stage_drop_equals_mask(vision: str, kv_heads: int, attn: str, method: str, options: dict) -> None:
    model, processor = tiny_model(vision, kv_heads, attn)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create(method, **options), positions="original") as session:
        tokens, logits = greedy(model, inputs)
    stages = [(s.layer, s.kept_indices) for s in session.stats.stages]
    per_sample = [[len(row) for row in kept] for _, kept in stages]
    assert len(stages) >= 3 and per_sample == [s.visual_out_per_sample for s in session.stats.stages]
    oracle_tokens, oracle_logits = greedy_under_mask(model, inputs, stages)
    assert torch.equal(tokens, oracle_tokens)
    torch.testing.assert_close(logits, oracle_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,options", [(m, o) for m, o, _ in PRUNING_CASES] + MULTI_STAGE_CASES + RECYCLING_CASES)
def test_batch_of_two_equals_samples_alone(method: str, options: dict) -> None:
    model, processor = tiny_model("dinov2", 2)
    batch = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create(method, **options)) as session:
        tokens, logits = greedy(model, batch)
        kept = session.stats.stages[0].kept_indices
        for index in range(2):
            alone = {key: value[index : index + 1] for key, value in batch.items()}
            real = alone["attention_mask"][0].bool()
            alone["input_ids"] = alone["input_ids"][:, real]
            alone["attention_mask"] = alone["attention_mask"][:, real]
            single_tokens, single_logits = greedy(model, alone)
            assert session.stats.stages[0].kept_indices[0] == kept[index]
            assert torch.equal(single_tokens[0], tokens[index])
            torch.testing.assert_close(single_logits[:, 0], logits[:, index], atol=1e-4, rtol=0)


TEXT_INDEPENDENT_CASES = [
    ("random", {"keep": 20}),
    ("random", {"keep": 12, "layer": 2}),
    ("visionzip", {"keep": 16}),  # with recycling: merged tokens enter the cache too
    ("fastervlm", {"keep": 16}),
    ("divprune", {"keep": 16}),
    ("holov", {"keep": 16}),
    ("flowcut", {"keep": 16}),
]


@pytest.mark.parametrize("positions", ["original", "reindex"])
@pytest.mark.parametrize("method,options", TEXT_INDEPENDENT_CASES)
def test_cached_decoding_equals_recomputation(positions: str, method: str, options: dict) -> None:
    """These selections do not depend on the text, so re-running the whole sequence without a cache prunes the same
    tokens: each cached decode step must give the logits of that full recomputation."""
    model, processor = tiny_model("clip", 2)
    inputs = tiny_inputs(processor, 2)
    pruner = vlprune.pruners.create(method, **options)
    with vlprune.attach(model, pruner, positions=positions):
        tokens, logits = greedy(model, inputs)
        for step in range(NEW_TOKENS):
            ids = torch.cat([inputs["input_ids"], tokens[:, :step]], dim=1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :step])], dim=1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                pixel_values=inputs["pixel_values"],
                use_cache=False,
            )
            torch.testing.assert_close(out.logits[:, -1], logits[step], atol=1e-4, rtol=0)


def test_reindex_changes_positions_but_not_selection() -> None:
    model, processor = tiny_model("clip", 2)
    inputs = tiny_inputs(processor, 2)
    results = {}
    for positions in ("original", "reindex"):
        with vlprune.attach(model, vlprune.pruners.create("fastv", keep=16), positions=positions) as session:
            results[positions] = (greedy(model, inputs)[1], session.stats.stages[0].kept_indices)
    assert results["original"][1] == results["reindex"][1]
    assert (results["original"][0] - results["reindex"][0]).abs().max() > 1e-4


def test_detach_restores_the_model_exactly() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 2)
    before = greedy(model, inputs)  # first: transformers adds its own output-capturing hooks on first use
    hooks, mapping = hook_count(model), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    session = vlprune.attach(model, vlprune.pruners.create("fastv", keep=8))
    assert hook_count(model) > hooks
    during = greedy(model, inputs)
    session.detach()
    after = greedy(model, inputs)
    assert hook_count(model) == hooks and ALL_ATTENTION_FUNCTIONS._local_mapping == mapping
    assert not torch.equal(during[1], before[1])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])

    with pytest.raises(KeyError), vlprune.attach(model, vlprune.pruners.create("fastervlm", keep=8)):
        greedy(model, inputs)
        raise KeyError("user code failed inside the session")
    assert hook_count(model) == hooks and ALL_ATTENTION_FUNCTIONS._local_mapping == mapping
    assert torch.equal(greedy(model, inputs)[1], before[1])


class FailingPruner(Pruner):
    name = "failing"
    stage = Stage.IN_LLM

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=1, keep=4)]

    def select(self, ctx: StageContext) -> Selection:
        raise ZeroDivisionError("scoring failed")


def test_an_exception_inside_a_hook_leaves_no_trace() -> None:
    model, processor = tiny_model("clip", 4)
    inputs = tiny_inputs(processor, 1)
    before = greedy(model, inputs)
    hooks = hook_count(model)
    with pytest.raises(ZeroDivisionError), vlprune.attach(model, FailingPruner()):
        greedy(model, inputs)
    assert hook_count(model) == hooks
    after = greedy(model, inputs)
    assert torch.equal(after[1], before[1])


def test_a_text_only_call_inside_a_session_is_untouched() -> None:
    model, processor = tiny_model("clip", 4)
    ids = processor.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt").to(DEVICE)
    vanilla = model(**ids).logits
    with vlprune.attach(model, vlprune.pruners.create("fastv", keep=8)) as session:
        pruned = model(**ids).logits
    assert torch.equal(vanilla, pruned) and session.stats is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,options,layer", [("fastv", {"keep": 16}, 2), ("random", {"keep": 24}, 0)])
def test_drop_equals_mask_on_siglip_and_qwen2(attn: str, method: str, options: dict, layer: int) -> None:
    model, processor = tiny_model("siglip", 2, attn, text="qwen2")
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create(method, **options), positions="original") as session:
        tokens, logits = greedy(model, inputs)
    oracle_tokens, oracle_logits = greedy_under_mask(model, inputs, [(layer, session.stats.stages[0].kept_indices)])
    assert torch.equal(tokens, oracle_tokens)
    torch.testing.assert_close(logits, oracle_logits, atol=1e-4, rtol=0)


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
