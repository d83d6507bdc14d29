"""Latency of captured (compiled) generation, pruned against unpruned, with plain eager transformers for reference
(``vlprune bench --compile``): the first call's capture time apart from the steady state, the language model's
prefill, the time to the first token and the end-to-end latency of a fixed-length answer."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from vlprune import pruners
from vlprune.api import Pipeline, load_image
from vlprune.engine import attach
from vlprune.errors import VlpruneError
from vlprune.eval.bench import synchronize

ANSWER_TOKENS = 32


@dataclass
class CapturedRow:
    """One variant's medians (ms), and its first call's seconds (compilation and capture included)."""

    variant: str
    kept_tokens: int
    first_call_s: float
    prefill_ms: float | None  # the language model's prefill (the engine's statistics); None for plain eager
    first_token_ms: float
    answer_ms: float

    def table_row(self, baseline: CapturedRow) -> str:
        prefill = "—" if self.prefill_ms is None else f"{self.prefill_ms:.1f}"
        return (
            f"| {self.variant} | {self.kept_tokens} | {self.first_call_s:.1f} | {prefill} | "
            f"{self.first_token_ms:.1f} | "
            f"{baseline.first_token_ms / self.first_token_ms:.2f}x | {self.answer_ms:.1f} | "
            f"{baseline.answer_ms / self.answer_ms:.2f}x |"
        )


CAPTURED_HEADER = (
    "| variant | visual tokens kept | first call s | LLM prefill ms | first token ms | vs captured unpruned | "
    "answer ms | vs captured unpruned |\n|---|---|---|---|---|---|---|---|"
)


@dataclass
class CapturedBench:
    method: str
    keep: int | float | None
    batch: int
    backend: str
    rows: list[CapturedRow]

    def table_rows(self) -> list[str]:
        baseline = next(row for row in self.rows if row.variant == "captured unpruned")
        return [row.table_row(baseline) for row in self.rows]


def bench_captured(
    pipeline: Pipeline,
    method: str,
    keep: int | float | None,
    image: Any,
    question: str,
    *,
    batch: int = 1,
    repeats: int = 5,
    backend: str | None = None,
    answer_tokens: int = ANSWER_TOKENS,
    **options: Any,
) -> CapturedBench:
    """Plain eager transformers, captured unpruned and captured ``method``, each timed ``repeats`` times after its
    first call (which compiles and captures its graphs, reported apart). Answers have exactly ``answer_tokens``
    tokens (the end of sequence is ignored), so every variant decodes the same number of steps.

    Raises:
        VlpruneError: a bad method, budget or option, or fewer than one repeat.
    """
    if repeats < 1 or answer_tokens < 1:
        raise VlpruneError(f"repeats={repeats} and answer_tokens={answer_tokens} must be at least 1")
    model = pipeline.model
    inputs = pipeline.model_inputs([load_image(image)] * batch, [pipeline.chat_prompt(question)] * batch)
    pruner = pruners.create(method, keep=keep, **options).use_tokenizer(pipeline.processor)
    rows = captured_rows(model, inputs, [(f"captured {method}", pruner)], repeats, answer_tokens, backend)
    return CapturedBench(method, keep, batch, backend or "inductor", rows)


def captured_rows(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    variants: list[tuple[str, pruners.Pruner]],
    repeats: int,
    answer_tokens: int = ANSWER_TOKENS,
    backend: str | None = None,
) -> list[CapturedRow]:
    """Rows for plain eager transformers, captured unpruned and each ``(name, pruner)`` captured, each timed
    ``repeats`` times after its first call; every variant runs in its own session, attached for all its calls (so
    that its graphs are reused)."""
    device = next(model.parameters()).device
    num_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    rows = [_eager_row(model, inputs, device, num_visual, repeats, answer_tokens)]
    compile_options = {} if backend is None else {"backend": backend}
    for variant, chosen in [("captured unpruned", pruners.create("none")), *variants]:
        with attach(model, chosen, num_visual=num_visual, compile=True, **compile_options) as session:
            rows.append(_captured_row(variant, session, inputs, device, repeats, answer_tokens))
    return rows


def _timed(call: Any, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - started


@torch.inference_mode()
def _eager_row(
    model: torch.nn.Module, inputs: dict, device: torch.device, visual: int, repeats: int, answer: int
) -> CapturedRow:
    def generate(tokens: int) -> Any:
        return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    first = _timed(lambda: generate(1), device)
    first_token = [_timed(lambda: generate(1), device) for _ in range(repeats)]
    answers = [_timed(lambda: generate(answer), device) for _ in range(repeats)]
    return CapturedRow("eager transformers, unpruned", visual, first, None, _ms(first_token), _ms(answers))


def _captured_row(
    variant: str, session: Any, inputs: dict, device: torch.device, repeats: int, answer: int
) -> CapturedRow:
    if session.fallback_reason is not None:
        raise VlpruneError(f"{variant} cannot run captured: {session.fallback_reason}")

    def generate(tokens: int) -> Any:
        return session.generate(**inputs, max_new_tokens=tokens, eos_token_id=[])

    # The first call of each answer room compiles its graphs; both are timed apart from the steady state.
    first = _timed(lambda: generate(1), device) + _timed(lambda: generate(answer), device)
    first_token, prefill = [], []
    for _ in range(repeats):
        first_token.append(_timed(lambda: generate(1), device))
        prefill.append(session.stats.prefill_seconds)
    answers = [_timed(lambda: generate(answer), device) for _ in range(repeats)]
    kept = session.stats.visual_tokens_per_layer[-1]
    return CapturedRow(variant, kept, first, _ms(prefill), _ms(first_token), _ms(answers))


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3
