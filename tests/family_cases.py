"""What the engine tests share: the registry of family cases the invariant suite runs over (each family's tiny
model from conftest's shared factory, and its prompts: a batch whose samples have as many visual tokens, and a
ragged one where the family allows), greedy generation, and the mask oracle that pruning with original positions
must equal. The family test files and the invariant suite import from here, never from each other."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from conftest import DEVICE, QUESTIONS, shared_model

from vlprune.testing import build_tiny_inputs, make_test_image
from vlprune.testing_qwen import build_tiny_qwen_inputs

NEW_TOKENS = 5

# The tiled and Qwen-VL families' prompts (their family files' wording, kept so the folded tests see the same inputs).
COLOUR_QUESTIONS = ("What colour is the square?", "How many red objects are on the left?")

ImageSpec = tuple[int, tuple[int, int] | None]  # (seed, (width, height)); None: the 32-pixel test image as drawn


def greedy(model, inputs, new_tokens: int = NEW_TOKENS, **options: Any):
    """Greedy generation returning (tokens (B, T), logits (T, B, V))."""
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **options,
    )
    prompt = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt:], torch.stack(out.logits)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def visual_ids(model) -> tuple[int, ...]:
    """The placeholder ids of visual tokens: an image's, and a video's where the family has videos (Qwen-VL)."""
    ids = (model.config.image_token_id, getattr(model.config, "video_token_id", None))
    return tuple(int(token) for token in ids if token)


def visual_counts(model, inputs) -> list[int]:
    """Each sample's number of visual tokens in the prompt."""
    ids = torch.tensor(visual_ids(model), device=inputs["input_ids"].device)
    return torch.isin(inputs["input_ids"], ids).sum(1).tolist()


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


def greedy_under_mask(model, inputs, stages: list[tuple[int, list[list[int]]]], new_tokens: int = NEW_TOKENS):
    """``greedy`` on the unpruned model with the pruned tokens masked from each stage layer on (``stages``: the
    (layer, kept_indices) of a pruned run's statistics): what pruning must equal with original positions."""
    oracle = MaskOracle(model, inputs["input_ids"], stages, visual_ids(model))  # a video's tokens are visual too
    try:
        return greedy(model, inputs, new_tokens)
    finally:
        oracle.remove()


# ---------------------------------------------------------------------------------------------- the family cases


@dataclass(frozen=True)
class Case:
    """A family as the invariant suite runs it: the factory's model and how its prompts are made. A new family is a
    row of ``CASES`` (and its builder in conftest's ``BUILDERS``)."""

    id: str
    family: str  # the adapter's family (what families_of lists) and conftest's builder
    options: tuple[tuple[str, Any], ...] = ()  # the builder's arguments
    questions: tuple[str, str] = QUESTIONS
    uniform: tuple[ImageSpec, ImageSpec] = ((0, None), (1, None))  # a batch of as many visual tokens per sample
    ragged: tuple[ImageSpec, ImageSpec] | None = None  # a batch of different counts, where the family allows one
    cls: bool = True  # the tower has a [CLS] token (methods that read its attention refuse towers without one)
    attentions: tuple[str, ...] = ("sdpa",)  # the language model's attention implementations the invariants cover
    positions: tuple[str, ...] = ("original", "reindex")  # the position modes the family accepts

    @property
    def qwen(self) -> bool:
        return self.family.startswith("qwen")

    @property
    def device(self) -> str:
        """LLaVA-1.5 follows VLPRUNE_TEST_DEVICE (as its family file always did); the others run on the CPU."""
        return DEVICE if self.family == "llava" else "cpu"

    @property
    def prompt_kind(self) -> str:
        """The batch the single-batch invariants run on: the ragged one where the family has no other (Qwen-VL)."""
        return "ragged" if self.qwen else "uniform"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The batches the single-batch invariants run on: the family file's, and the ragged one where that differs
        (the tiled families: a ragged batch gives different numbers of tiles and line breaks per sample)."""
        if self.ragged is None or self.prompt_kind == "ragged":
            return (self.prompt_kind,)
        return (self.prompt_kind, "ragged")

    def variants(self) -> list[tuple[str, str]]:
        """(attention, batch kind) pairs the single-batch invariants run on: every attention implementation the
        family covers on its own batch, SDPA on the ragged one."""
        return [(attention, self.prompt_kind) for attention in self.attentions] + [
            ("sdpa", kind) for kind in self.kinds if kind != self.prompt_kind
        ]

    def model(self, attention: str = "sdpa") -> tuple[torch.nn.Module, Any]:
        """The shared tiny model (use it as it is: attach, run, detach)."""
        return shared_model(self.family, device=self.device, attn_implementation=attention, **dict(self.options))

    def images(self, kind: str, samples: tuple[int, ...] = (0, 1)) -> list:
        specs = self.uniform if kind == "uniform" else self.ragged
        assert specs is not None, f"{self.id} has no ragged batch"
        images = []
        for index in samples:
            seed, size = specs[index]
            images.append(make_test_image(seed) if size is None else make_test_image(seed, 96).resize(size))
        return images

    def inputs(self, processor, kind: str | None = None, samples: tuple[int, ...] = (0, 1)):
        """Samples 0 (the shorter question, left-padded in a batch) and 1 of the ``kind`` batch, or one of them."""
        images = self.images(kind or self.prompt_kind, samples)
        questions = [self.questions[index] for index in samples]
        build = build_tiny_qwen_inputs if self.qwen else build_tiny_inputs
        return build(processor, images, questions).to(self.device)

    def alone(self, processor, batch, kind: str, index: int):
        """Sample ``index`` of a ``kind`` batch on its own: as its family file always took it (the batch's rows and
        unpadded prompt; a tiled family's ragged sample built again, its crops not padded to the other's)."""
        if self.qwen:
            return qwen_sample(batch, index)
        if kind == "ragged":
            return self.inputs(processor, kind, (index,))
        single = {key: value[index : index + 1] for key, value in batch.items()}
        real = single["attention_mask"][0].bool()
        single["input_ids"], single["attention_mask"] = single["input_ids"][:, real], single["attention_mask"][:, real]
        return single


def ragged_alone_run(case: Case, monkeypatch, pruner_class: type, method: str, keep: float, new_tokens: int = 2):
    """Run ``method`` on ``case``'s ragged batch and on each of its two samples alone, asserting that each sample
    generates and keeps alone what it does in the batch; returns the batch's first stage statistics and every
    stage context ``pruner_class.select`` received (the batch's first, then the samples')."""
    import vlprune
    from vlprune.pruners import create

    model, processor = case.model()
    batch = case.inputs(processor, "ragged")
    contexts: list = []
    select = pruner_class.select
    monkeypatch.setattr(pruner_class, "select", lambda self, ctx: contexts.append(ctx) or select(self, ctx))
    with vlprune.attach(model, create(method, keep=keep)) as session:
        tokens, _ = greedy(model, batch, new_tokens=new_tokens)
        together = session.stats.stages[0]
        for index in range(2):
            single_tokens, _ = greedy(model, case.alone(processor, batch, "ragged", index), new_tokens=new_tokens)
            assert torch.equal(single_tokens[0], tokens[index])
            assert session.stats.stages[0].kept_indices[0] == together.kept_indices[index]
    return together, contexts


def qwen_sample(batch, index: int) -> dict:
    """Sample ``index`` of a Qwen-VL processor batch on its own (its image rows, its unpadded prompt)."""
    counts = (batch["image_grid_thw"].prod(-1)).tolist()
    start = sum(counts[:index])
    single = {
        "pixel_values": batch["pixel_values"][start : start + counts[index]],
        "image_grid_thw": batch["image_grid_thw"][index : index + 1],
    }
    real = batch["attention_mask"][index].bool()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            single[key] = batch[key][index : index + 1, real]
    return single


TILED = {"questions": COLOUR_QUESTIONS, "uniform": ((0, (40, 30)), (1, (40, 30))), "attentions": ("sdpa", "eager")}
TILED_RAGGED = ((1, (40, 20)), (2, (30, 60)))  # aspect ratios that give different numbers of tiles and line breaks
QWEN = {
    "questions": COLOUR_QUESTIONS,
    "uniform": ((0, (48, 32)), (1, (48, 32))),
    "ragged": ((0, (48, 32)), (1, (32, 64))),
    "cls": False,
    "positions": ("original",),  # multimodal RoPE: reindexed positions are refused
}
BOTH_ATTENTIONS = ("sdpa", "eager")

CASES = [
    Case("llava-clip", "llava", (("vision", "clip"), ("num_key_value_heads", 4)), attentions=BOTH_ATTENTIONS),
    Case("llava-dinov2", "llava", (("vision", "dinov2"), ("num_key_value_heads", 2)), attentions=BOTH_ATTENTIONS),
    Case(
        "llava-siglip",
        "llava",
        (("vision", "siglip"), ("text", "qwen2"), ("num_key_value_heads", 2)),
        cls=False,
        attentions=BOTH_ATTENTIONS,
    ),
    Case("llava-next", "llava-next", ragged=TILED_RAGGED, **TILED),
    Case("llava-onevision", "llava-onevision", ragged=TILED_RAGGED, cls=False, **TILED),
    Case("qwen2-vl", "qwen2-vl", **QWEN),
    Case("qwen2.5-vl", "qwen2.5-vl", **QWEN),
    Case("qwen3-vl", "qwen3-vl", **QWEN),
]
CASE = {case.id: case for case in CASES}
# CLIP with grouped-query attention: the model the LLaVA cache tests always ran on (only those invariants use it).
CASE["llava-clip-gqa"] = Case("llava-clip-gqa", "llava", (("vision", "clip"), ("num_key_value_heads", 2)))
