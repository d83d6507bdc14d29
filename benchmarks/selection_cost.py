"""Each method's own selection time next to the prefill it saves, on vlprune-tiny (or any model ``vlprune.load``
accepts) at LLaVA-1.5's ratio of 64 kept out of 576 visual tokens (11.1%): ``vlprune bench`` for every method.

    python benchmarks/selection_cost.py                                   # vlprune-tiny on the CPU
    python benchmarks/selection_cost.py --device cuda --dtype bfloat16

For multi-stage methods ``keep`` is the layer-averaged budget, so "kept" is the count after their last stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vlprune
from vlprune.eval.bench import TABLE_HEADER, bench

SAMPLE = Path(vlprune.__file__).parent / "samples" / "scene1.png"
METHODS = (
    "random,fastv,fastervlm,divprune,zoo-prune,holov,visionzip,vispruner,scope,cdpruner,mmtok,dart,flowcut,sparsevlm,pyramiddrop,"
    "vflowopt,vscan,tops,ptp,"
    "fastv+var"
)


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
    device = next(pipeline.model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model}, {name}, {pipeline.model.dtype}, batch {args.batch}, keep {args.keep:.3f}")
    print(f"median of {args.repeats} runs after {args.warmup} warm-up runs")
    print(TABLE_HEADER)
    for method in args.methods.split(","):
        result = bench(
            pipeline,
            method,
            args.keep,
            SAMPLE,
            "Is the orange circle on the left or the right?",
            batch=args.batch,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        print(result.table_row(), flush=True)


if __name__ == "__main__":
    main()
