"""Each pruner's own selection time next to the prefill it saves, on vlprune-tiny (or any model ``vlprune.load``
accepts) at LLaVA-1.5's ratio of 64 kept out of 576 visual tokens (11.1%).

    python benchmarks/selection_cost.py                                   # vlprune-tiny on the CPU
    python benchmarks/selection_cost.py --device cuda --dtype bfloat16

For each method: the median prefill time (vision tower, projector and language model, one forward pass with the
cache) over ``--repeats`` runs after ``--warmup`` runs, interleaved with the unpruned model's, and the median time
spent inside the pruner's own code (``select``, and ``select_in_vision`` for methods that prune inside the vision
tower), measured in separate instrumented runs so that its synchronisation does not slow the timed prefills.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import vlprune
from vlprune.api import load_image

SAMPLE = Path(vlprune.__file__).parent / "samples" / "scene1.png"
METHODS = "fastv,fastervlm,random,divprune,zoo-prune,holov,visionzip,flowcut"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_seconds(model, inputs, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    model(**inputs, use_cache=True)
    sync(device)
    return time.perf_counter() - start


def timed_pruner(pruner, device: torch.device, spent: list[float]):
    """The pruner with ``select`` and ``select_in_vision`` wrapped to add their time to ``spent[-1]``."""
    for name in ("select", "select_in_vision"):
        original = getattr(pruner, name)

        def wrapper(ctx, original=original):
            sync(device)
            start = time.perf_counter()
            result = original(ctx)
            sync(device)
            spent[-1] += time.perf_counter() - start
            return result

        object.__setattr__(pruner, name, wrapper)
    return pruner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlprune-tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--keep", type=float, default=64 / 576)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    pipeline = vlprune.load(args.model, device=args.device, dtype=args.dtype)
    model = pipeline.model
    device = next(model.parameters()).device
    image = load_image(str(SAMPLE))
    question = "Is the orange circle on the left or the right?"
    inputs = pipeline.processor(
        images=[image] * args.batch, text=[pipeline.chat_prompt(question)] * args.batch, return_tensors="pt"
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    methods = args.methods.split(",")

    times: dict[str | None, list[float]] = {m: [] for m in [None, *methods]}
    select: dict[str, list[float]] = {m: [] for m in methods}
    kept: dict[str, int] = {}
    for round_index in range(args.warmup + args.repeats):
        for method in [None, *methods]:
            if method is None:
                seconds = prefill_seconds(model, inputs, device)
            else:
                with vlprune.attach(model, vlprune.pruners.create(method, keep=args.keep)) as session:
                    seconds = prefill_seconds(model, inputs, device)
                kept[method] = session.stats.stages[-1].visual_out
                spent = [0.0]
                with vlprune.attach(model, timed_pruner(vlprune.pruners.create(method, keep=args.keep), device, spent)):
                    prefill_seconds(model, inputs, device)
                if round_index >= args.warmup:
                    select[method].append(spent[-1])
            if round_index >= args.warmup:
                times[method].append(seconds)

    base = statistics.median(times[None])
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0])
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"{args.model}, {device_name}, {model.dtype}, batch {args.batch}, {visual} visual tokens, keep {args.keep:.3f}"
    )
    print(f"median of {args.repeats} runs; unpruned prefill {base * 1e3:.1f} ms\n")
    print("| method | kept | selection ms | prefill ms | prefill saved ms |")
    print("|---|---|---|---|---|")
    for method in methods:
        median = statistics.median(times[method])
        cost = statistics.median(select[method]) * 1e3
        print(f"| {method} | {kept[method]} | {cost:.2f} | {median * 1e3:.1f} | {(base - median) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
