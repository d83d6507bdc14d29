"""One sweep cell on one sample: a greedy generation with a pruner (or none), timed, with what a results row holds
and the outputs that fidelity compares (:func:`fidelity`).

Eager cells attach their pruner for the one call. Captured cells (``vlprune sweep --compile``) run through a
:class:`~vlprune.engine.captured.CapturedSession` that the sweep keeps attached over all samples of the cell, so that
its graphs are reused; a call that compiled a graph (a new prompt-length bucket) is run again for its timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vlprune import pruners
from vlprune.api import Pipeline
from vlprune.engine import attach
from vlprune.eval.bench import synchronize
from vlprune.eval.datasets import normalize_answer


@dataclass
class Reference:
    """A model's outputs on one sample, which fidelity compares against the unpruned model's."""

    log_probs: torch.Tensor  # (V,) first answer token
    hidden: torch.Tensor  # (D,) last prompt token, last layer (normalised)
    answer: str

    def on_host(self) -> Reference:
        """A copy in host memory, for outputs kept over a whole sweep (a vocabulary-sized vector per sample)."""
        return replace(self, log_probs=self.log_probs.cpu(), hidden=self.hidden.cpu())


@dataclass
class _Generation:
    new_tokens: torch.Tensor  # (T,) the answer's tokens
    first_logits: torch.Tensor  # (V,) the first answer token's logits
    hidden: torch.Tensor  # (D,) last prompt token, last layer
    first_token_seconds: float | None
    end_to_end_seconds: float
    captured: bool


class CellRunner:
    """Runs one sample through the model with one pruner (or none) and measures everything a row holds."""

    def __init__(self, pipeline: Pipeline, max_new_tokens: int) -> None:
        self.pipeline = pipeline
        self.model = pipeline.model
        self.device = next(self.model.parameters()).device
        self.max_new_tokens = max_new_tokens

    def inputs(self, sample: Any) -> dict[str, torch.Tensor]:
        return self.pipeline.model_inputs([sample.image], [self.pipeline.chat_prompt(sample.question)])

    def num_visual(self, inputs: dict[str, torch.Tensor]) -> int:
        return int((inputs["input_ids"] == self.model.config.image_token_id).sum())

    @torch.inference_mode()
    def run(
        self, inputs: dict[str, torch.Tensor], pruner: pruners.Pruner | None, positions: str | None = None
    ) -> tuple[dict[str, Any], Reference]:
        """(measurements, outputs) of one eager greedy generation; its prefill is timed up to the first token."""
        pruner = (pruner or pruners.create("none")).use_tokenizer(self.pipeline.processor)
        mode = positions if positions is not None else self.pipeline.positions
        self._reset_peak_memory()
        with attach(self.model, pruner, positions=mode, num_visual=self.num_visual(inputs)) as session:
            generation = self._eager_generation(inputs)
            stats = session.stats
        return self._measured(generation, stats)

    def captured_session(self, pruner: pruners.Pruner | None, positions: str | None, num_visual: int) -> Any:
        """A captured session of ``pruner`` (None: unpruned) attached to the model, for :meth:`run_captured`."""
        mode = positions if positions is not None else self.pipeline.positions
        pruner = (pruner or pruners.create("none")).use_tokenizer(self.pipeline.processor)
        return attach(self.model, pruner, positions=mode, num_visual=num_visual, compile=True)

    @torch.inference_mode()
    def run_captured(self, inputs: dict[str, torch.Tensor], session: Any) -> tuple[dict[str, Any], Reference]:
        """As :meth:`run`, through an attached captured ``session``. A call that compiled graphs, or found that the
        method must run eagerly, is repeated, so that the timings are the steady state's; a method that runs
        eagerly is measured as :meth:`run` measures it (the row's ``captured`` says which)."""
        for _ in range(2):
            compiled, fallback = session.compilations, session.fallback_reason
            self._reset_peak_memory()
            if session.fallback_reason is not None:
                generation = self._eager_generation(inputs)
            else:
                generation = self._captured_generation(inputs, session)
            if session.compilations == compiled and session.fallback_reason == fallback:
                break
        return self._measured(generation, session.stats)

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _eager_generation(self, inputs: dict[str, torch.Tensor]) -> _Generation:
        first_token = _FirstTokenClock(self.device)
        synchronize(self.device)
        first_token.start = time.perf_counter()
        generated = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            output_hidden_states=True,
            output_logits=True,
            return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([first_token]),
        )
        synchronize(self.device)
        end_to_end = time.perf_counter() - first_token.start
        return _Generation(
            new_tokens=generated.sequences[0, inputs["input_ids"].shape[1] :],
            first_logits=generated.logits[0][0],
            hidden=generated.hidden_states[0][-1][0, -1],
            first_token_seconds=first_token.seconds,
            end_to_end_seconds=end_to_end,
            captured=False,
        )

    def _captured_generation(self, inputs: dict[str, torch.Tensor], session: Any) -> _Generation:
        synchronize(self.device)
        started = time.perf_counter()
        sequences, logits = session.generate(**inputs, max_new_tokens=self.max_new_tokens, return_logits=True)
        synchronize(self.device)
        end_to_end = time.perf_counter() - started
        if session.fallback_reason is not None:  # it found now that it runs eagerly; the caller repeats the call
            hidden, first_token = torch.zeros(1), None
        else:
            hidden, first_token = session.prompt_hidden[0], session.first_token_seconds
        return _Generation(
            new_tokens=sequences[0, inputs["input_ids"].shape[1] :],
            first_logits=logits[0, 0],
            hidden=hidden,
            first_token_seconds=first_token,
            end_to_end_seconds=end_to_end,
            captured=session.fallback_reason is None,
        )

    def _measured(self, generation: _Generation, stats: Any) -> tuple[dict[str, Any], Reference]:
        answer = self.pipeline.processor.decode(generation.new_tokens, skip_special_tokens=True).strip()
        count = len(generation.new_tokens)
        end_to_end = generation.end_to_end_seconds
        prefill = end_to_end if generation.first_token_seconds is None else generation.first_token_seconds
        decode_seconds = end_to_end - prefill
        measured = {
            "prediction": answer,
            "visual_tokens": None if stats is None else stats.visual_tokens_per_layer[0],
            "equivalent_visual_tokens": None if stats is None else stats.equivalent_visual_tokens,
            "prefill_flops": None if stats is None else stats.prefill_flops,
            "flops_ratio": None if stats is None else stats.flops_ratio,
            "kv_cache_bytes": None if stats is None else stats.kv_cache_bytes,
            "positions": None if stats is None else stats.positions,
            "prefill_ms": prefill * 1e3,
            "end_to_end_ms": end_to_end * 1e3,
            "decode_tokens_per_s": (count - 1) / decode_seconds if count > 1 and decode_seconds > 0 else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            "captured": generation.captured,
        }
        outputs = Reference(
            log_probs=torch.log_softmax(generation.first_logits.float(), dim=-1),
            hidden=generation.hidden.float(),
            answer=answer,
        )
        return measured, outputs


class _FirstTokenClock(StoppingCriteria):
    """Never stops generation; records the time from ``start`` to the first call, which ``generate`` makes right after
    the prefill has produced the first token (one generation gives both the prefill and the end-to-end time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0.0
        self.seconds: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.seconds is None:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.start
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def fidelity(reference: Reference, pruned: Reference) -> dict[str, Any]:
    """Same answer, KL(reference || pruned) of the first answer token's distribution, and the cosine of the last
    prompt token's last-layer hidden states."""
    device = reference.log_probs.device
    log_probs, hidden = pruned.log_probs.to(device), pruned.hidden.to(device)
    kl = torch.sum(reference.log_probs.exp() * (reference.log_probs - log_probs))
    cosine = torch.nn.functional.cosine_similarity(reference.hidden, hidden, dim=0)
    return {
        "same_answer": normalize_answer(reference.answer) == normalize_answer(pruned.answer),
        "kl_first_token": max(0.0, float(kl)),
        "hidden_cosine": float(cosine),
    }
