"""Exact-match evaluation: counting per kind with normalised answers, and restricted-vocabulary choices."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import vlprune
from vlprune.eval.datasets import VQASample
from vlprune.eval.evaluate import choose_from_vocabulary, evaluate
from vlprune.testing import make_test_image


class ScriptedPipeline:
    """Answers from a fixed script, in call order, as a Pipeline would (a list for a batch)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, images: list, questions: list[str], max_new_tokens: int) -> SimpleNamespace:
        self.calls.append(list(questions))
        batch, self.answers = self.answers[: len(questions)], self.answers[len(questions) :]
        return SimpleNamespace(text=batch)


def test_evaluate_counts_normalised_exact_matches_per_kind() -> None:
    image = make_test_image(0)
    samples = [
        VQASample(image, "q1", "red", "color"),
        VQASample(image, "q2", "2", "count"),
        VQASample(image, "q3", "blue", "color"),
        VQASample(image, "q4", "yes", "exists"),
        VQASample(image, "q5", "3", "count"),
    ]
    pipeline = ScriptedPipeline(["Red.", "two", "green", " yes ", "4"])
    result = evaluate(pipeline, samples, batch_size=2, progress=False)  # type: ignore[arg-type]
    assert pipeline.calls == [["q1", "q2"], ["q3", "q4"], ["q5"]]
    assert dict(result.total) == {"color": 2, "count": 2, "exists": 1}
    assert dict(result.correct) == {"color": 1, "count": 1, "exists": 1}
    assert result.accuracy == 3 / 5
    assert result.kind_accuracy() == {"color": 0.5, "count": 0.5, "exists": 1.0}
    assert result.predictions[2] == ("q3", "blue", "green")
    assert "| **all** | 5 | 60.0% |" in result.table()


def test_choose_from_vocabulary_takes_the_best_first_token() -> None:
    pipeline = vlprune.load("tiny-random")
    vocabulary = ["red", "blue", "green"]
    samples = [
        VQASample(make_test_image(seed), question, "red", "color")
        for seed, question in enumerate(["What color is the square?", "Which colour is on the left here?"])
    ]
    choices = choose_from_vocabulary(pipeline, samples, [vocabulary] * 2)
    tokenizer = pipeline.processor.tokenizer
    first = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in vocabulary]
    for sample, choice in zip(samples, choices, strict=True):
        inputs = pipeline.processor(
            images=[sample.image], text=[pipeline.chat_prompt(sample.question)], return_tensors="pt"
        )
        with torch.no_grad():
            logits = pipeline.model(**inputs).logits[0, -1]
        assert choice == vocabulary[int(torch.argmax(logits[first]))]
