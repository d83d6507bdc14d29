"""Exact-match evaluation of a pipeline on a VQA dataset, overall and per question type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from vlprune.api import Pipeline
from vlprune.eval.datasets import VQASample, normalize_answer


@dataclass
class EvalResult:
    """Accuracy of one run.

    Attributes:
        correct: exactly matched answers, per question kind.
        total: questions, per question kind.
        predictions: (question, expected, predicted) per sample, in dataset order.
    """

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    predictions: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        count = sum(self.total.values())
        return sum(self.correct.values()) / count if count else 0.0

    def kind_accuracy(self) -> dict[str, float]:
        return {kind: self.correct[kind] / self.total[kind] for kind in sorted(self.total)}

    def table(self) -> str:
        lines = ["| kind | questions | accuracy |", "|---|---|---|"]
        for kind, value in self.kind_accuracy().items():
            lines.append(f"| {kind} | {self.total[kind]} | {100 * value:.1f}% |")
        lines.append(f"| **all** | {sum(self.total.values())} | {100 * self.accuracy:.1f}% |")
        return "\n".join(lines)


def evaluate(
    pipeline: Pipeline,
    samples: Sequence[VQASample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Greedy answers for ``samples`` in batches, compared with the expected answers after normalisation."""
    result = EvalResult()
    # The bar is closed on failure too, so that the error is printed on a line of its own.
    with tqdm(total=len(samples), desc="eval", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            questions = [s.question for s in chunk]
            answers = pipeline([s.image for s in chunk], questions, max_new_tokens=max_new_tokens).text
            for sample, predicted in zip(chunk, answers, strict=True):
                hit = normalize_answer(predicted) == normalize_answer(sample.answer)
                result.correct[sample.kind] += int(hit)
                result.total[sample.kind] += 1
                result.predictions.append((sample.question, sample.answer, predicted))
            bar.update(len(chunk))
            bar.set_postfix(accuracy=f"{100 * result.accuracy:.1f}%")
    return result


@torch.inference_mode()
def choose_from_vocabulary(
    pipeline: Pipeline, samples: Sequence[VQASample], vocabularies: Sequence[Sequence[str]]
) -> list[str]:
    """For each sample, the answer of its vocabulary whose first token the model scores highest as the first answer
    token, with the model alone (no pruner).

    Restricting the answer to a question type's vocabulary measures what the model knows apart from its output format;
    with a blank image it measures the answer prior the model learned.
    """
    tokenizer = pipeline.processor.tokenizer
    inputs = pipeline.model_inputs([s.image for s in samples], [pipeline.chat_prompt(s.question) for s in samples])
    last_logits = pipeline.model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, V); prompts are left-padded
    choices = []
    for logits, vocabulary in zip(last_logits, vocabularies, strict=True):
        first_tokens = [tokenizer(answer, add_special_tokens=False)["input_ids"][0] for answer in vocabulary]
        if len(set(first_tokens)) != len(first_tokens):
            raise ValueError(f"answers {list(vocabulary)} do not start with distinct tokens")
        choices.append(vocabulary[int(torch.argmax(logits[first_tokens]))])
    return choices
