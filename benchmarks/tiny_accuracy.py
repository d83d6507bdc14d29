"""vlprune-tiny's accuracy targets: Shapes VQA test accuracy per question kind, and whether it really uses the image.

    python benchmarks/tiny_accuracy.py --limit 1000

Prints three tables over the first ``--limit`` test questions:
1. exact-match accuracy of the greedy answer (what ``vlprune eval`` reports);
2. accuracy with the answer restricted to the kind's vocabulary (the candidate whose first token scores highest),
   with the real image and with a blank image of the scene's background colour;
3. the answer prior: the share of the most frequent answer of each kind, which the blank-image accuracy should match
   if the model takes its answers from the image.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from PIL import Image
from tqdm import tqdm

import vlprune
from vlprune.eval.datasets import load_dataset
from vlprune.eval.evaluate import choose_from_vocabulary, evaluate
from vlprune.eval.shapes import ANSWER_VOCABULARY, SPLITS, generate_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlprune-tiny")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--restricted-limit", type=int, default=None, help="questions for tables 2-3 (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-greedy", action="store_true")
    args = parser.parse_args()

    samples = load_dataset("shapes", split="test", limit=args.limit)
    pipeline = vlprune.load(args.model)
    if not args.skip_greedy:
        greedy = evaluate(pipeline, samples, batch_size=args.batch_size)
        print(f"## {args.model}: greedy exact match on {len(samples)} Shapes VQA test questions\n")
        print(greedy.table(), flush=True)

    restricted = samples[: args.restricted_limit]
    real, blank, total = defaultdict(int), defaultdict(int), Counter()
    answers: dict[str, Counter] = defaultdict(Counter)
    for start in tqdm(range(0, len(restricted), args.batch_size), desc="restricted"):
        chunk = restricted[start : start + args.batch_size]
        vocabularies = [ANSWER_VOCABULARY[s.kind] for s in chunk]
        blanks = [
            type(s)(
                image=Image.new("RGB", (224, 224), generate_scene(SPLITS["test"] + start + i).background),
                question=s.question,
                answer=s.answer,
                kind=s.kind,
            )
            for i, s in enumerate(chunk)
        ]
        with_image = choose_from_vocabulary(pipeline, chunk, vocabularies)
        without_image = choose_from_vocabulary(pipeline, blanks, vocabularies)
        for sample, guess, blank_guess in zip(chunk, with_image, without_image, strict=True):
            total[sample.kind] += 1
            answers[sample.kind][sample.answer] += 1
            real[sample.kind] += guess == sample.answer
            blank[sample.kind] += blank_guess == sample.answer
    print(
        f"\n## Answer restricted to the kind's vocabulary ({len(restricted)} questions): real image, blank image, "
        "answer prior\n"
    )
    print("| kind | questions | real image | blank image | prior (most frequent answer) |")
    print("|---|---|---|---|---|")
    for kind in sorted(total):
        prior = answers[kind].most_common(1)[0][1] / total[kind]
        row = [100 * real[kind] / total[kind], 100 * blank[kind] / total[kind], 100 * prior]
        print(f"| {kind} | {total[kind]} | {row[0]:.1f}% | {row[1]:.1f}% | {row[2]:.1f}% |")


if __name__ == "__main__":
    main()
