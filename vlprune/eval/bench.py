"""Prefill timing of a pruned model against the unpruned one, interleaved in the same run, next to the theoretical
FLOPs speed-up and the pruner's own selection time (``vlprune bench``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vlprune import pruners
from vlprune.adapters import adapter_for
from vlprune.api import Pipeline, load_image
from vlprune.engine import attach
from vlprune.errors import VlpruneError


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock timings cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def language_model_clock(model: torch.nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Yields a list that gets the synchronised wall time of every call of the model's language model (the decoder
    stack, its norm included; not the vision tower, the projector, a pre-LLM pruner's selection or the output
    head): the part of the prefill that the theoretical language-model FLOPs describe."""
    language_model = adapter_for(model).language_model
    spent: list[float] = []
    started: list[float] = []

    def start(*_: Any) -> None:
        synchronize(device)
        started.append(time.perf_counter())

    def stop(*_: Any) -> None:
        synchronize(device)
        spent.append(time.perf_counter() - started.pop())

    handles = [language_model.register_forward_pre_hook(start), language_model.register_forward_hook(stop)]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def prefill_seconds(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, float]:
    """Wall times of one forward pass with the cache and the last position's logits only (the prefill ``generate``
    runs) and of its language-model part, synchronised on a GPU."""
    with language_model_clock(model, device) as language_model:
        synchronize(device)
        start = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        synchronize(device)
        total = time.perf_counter() - start
    return total, sum(language_model)


def timed_pruner(pruner: pruners.Pruner, device: torch.device, spent: list[float]) -> pruners.Pruner:
    """The pruner with ``select`` and ``select_in_vision`` adding their synchronised time to ``spent[-1]``."""
    for name in ("select", "select_in_vision"):
        original = getattr(pruner, name)

        def wrapper(ctx: Any, original: Any = original) -> Any:
            synchronize(device)
            start = time.perf_counter()
            result = original(ctx)
            synchronize(device)
            spent[-1] += time.perf_counter() - start
            return result

        object.__setattr__(pruner, name, wrapper)
    return pruner


@dataclass
class BenchResult:
    """Medians over the repeats, in milliseconds."""

    method: str
    keep: int | float | None
    visual_tokens: int
    kept_tokens: int
    unpruned_ms: float
    pruned_ms: float
    unpruned_llm_ms: float
    pruned_llm_ms: float
    selection_ms: float
    flops_ratio: float

    @property
    def speedup(self) -> float:
        return self.unpruned_ms / self.pruned_ms

    @property
    def llm_speedup(self) -> float:
        """The language model's own speed-up, which is what the FLOPs speed-up predicts."""
        return self.unpruned_llm_ms / self.pruned_llm_ms

    @property
    def flops_speedup(self) -> float:
        return 1 / self.flops_ratio

    def share_of_theory(self, speedup: float) -> float:
        """How much of the theoretical speed-up a measured one reaches: (measured - 1) / (theory - 1)."""
        return (speedup - 1) / (self.flops_speedup - 1) if self.flops_speedup > 1 else float("nan")

    def table_row(self) -> str:
        return (
            f"| {self.method} | {self.kept_tokens} | {self.selection_ms:.2f} | {self.unpruned_ms:.1f} | "
            f"{self.pruned_ms:.1f} | {self.speedup:.2f}x | {self.unpruned_llm_ms:.1f} | {self.pruned_llm_ms:.1f} | "
            f"{self.llm_speedup:.2f}x | {self.flops_speedup:.2f}x | {self.share_of_theory(self.llm_speedup):.0%} | "
            f"{self.share_of_theory(self.speedup):.0%} |"
        )


TABLE_HEADER = (
    "| method | kept | selection ms | prefill ms unpruned | prefill ms pruned | speed-up | LLM ms unpruned | "
    "LLM ms pruned | LLM speed-up | FLOPs speed-up | LLM share of theory | prefill share of theory |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def bench(
    pipeline: Pipeline,
    method: str,
    keep: int | float | None,
    image: Any,
    question: str,
    *,
    batch: int = 1,
    warmup: int = 2,
    repeats: int = 7,
    **options: Any,
) -> BenchResult:
    """Time the prefill with and without ``method`` (alternating, so both see the same machine state).

    Raises:
        VlpruneError: a bad method, budget or option, or fewer than one repeat.
    """
    if repeats < 1 or warmup < 0:
        raise VlpruneError(f"repeats={repeats} must be at least 1 and warmup={warmup} at least 0")
    model = pipeline.model
    device = next(model.parameters()).device
    picture = load_image(image)
    inputs = pipeline.model_inputs([picture] * batch, [pipeline.chat_prompt(question)] * batch)
    num_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    pruner = pruners.create(method, keep=keep, **options).use_tokenizer(pipeline.processor)
    unpruned, pruned, unpruned_llm, pruned_llm, selection = [], [], [], [], []
    flops_ratio, kept = 1.0, num_visual
    for round_index in range(warmup + repeats):
        base, base_llm = prefill_seconds(model, inputs, device)
        with attach(model, pruner, positions=pipeline.positions, num_visual=num_visual) as session:
            seconds, seconds_llm = prefill_seconds(model, inputs, device)
        flops_ratio = session.stats.flops_ratio
        kept = session.stats.visual_tokens_per_layer[-1]
        spent = [0.0]
        probe = timed_pruner(
            pruners.create(method, keep=keep, **options).use_tokenizer(pipeline.processor), device, spent
        )
        with attach(model, probe, positions=pipeline.positions, num_visual=num_visual):
            prefill_seconds(model, inputs, device)
        if round_index >= warmup:
            unpruned.append(base)
            pruned.append(seconds)
            unpruned_llm.append(base_llm)
            pruned_llm.append(seconds_llm)
            selection.append(spent[-1])
    return BenchResult(
        method=method,
        keep=keep,
        visual_tokens=num_visual,
        kept_tokens=kept,
        unpruned_ms=statistics.median(unpruned) * 1e3,
        pruned_ms=statistics.median(pruned) * 1e3,
        unpruned_llm_ms=statistics.median(unpruned_llm) * 1e3,
        pruned_llm_ms=statistics.median(pruned_llm) * 1e3,
        selection_ms=statistics.median(selection) * 1e3,
        flops_ratio=flops_ratio,
    )
