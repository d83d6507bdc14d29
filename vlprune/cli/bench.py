"""`vlprune bench`: prefill time pruned vs unpruned, the FLOPs ratio and the selection time (or, with --compile,
captured graphs against plain eager HF)."""

from __future__ import annotations

import argparse

from vlprune import pruners
from vlprune.api import check_before_loading, load
from vlprune.cli.options import _budget, _non_negative, _option, _positive, add_device_options, add_model_option


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    bench = commands.add_parser("bench", help="prefill time pruned vs unpruned, FLOPs ratio and selection time")
    add_model_option(bench, default_model, f"built-in name, folder or HF id ({default_model})")
    bench.add_argument("--method", required=True)
    bench.add_argument("--keep", type=_budget, default=None, help="visual tokens kept: a count or a fraction")
    bench.add_argument("--option", type=_option, action="append", default=[], metavar="NAME=VALUE")
    bench.add_argument("--image", default=None, help="image (default: a shipped sample)")
    bench.add_argument("--question", default="What color is the circle?")
    bench.add_argument("--batch", type=_positive, default=1)
    bench.add_argument(
        "--compile",
        action="store_true",
        help="compare pruned and unpruned both captured (and plain eager HF): prefill, first token, 32-token answer",
    )
    bench.add_argument("--warmup", type=_non_negative, default=2)
    bench.add_argument("--repeats", type=_positive, default=7)
    add_device_options(bench)


def execute(args: argparse.Namespace) -> int:
    from pathlib import Path

    import vlprune
    from vlprune.eval.bench import TABLE_HEADER, bench
    from vlprune.eval.bench_captured import CAPTURED_HEADER, bench_captured

    image = args.image or str(Path(vlprune.__file__).parent / "samples" / "scene1.png")
    pruner = pruners.create(args.method, keep=args.keep, **dict(args.option))
    check_before_loading(args.model, [pruner], device=args.device, compile=args.compile)
    pipeline = load(args.model, device=args.device, dtype=args.dtype)
    if args.compile:
        captured = bench_captured(
            pipeline, args.method, args.keep, image, args.question, batch=args.batch, repeats=args.repeats,
            **dict(args.option),
        )  # fmt: skip
        print(f"{args.model}: batch {args.batch}, median of {args.repeats}, captured graphs ({captured.backend})")
        print(CAPTURED_HEADER)
        print("\n".join(captured.table_rows()))
        return 0
    result = bench(
        pipeline,
        args.method,
        args.keep,
        image,
        args.question,
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        **dict(args.option),
    )
    print(f"{args.model}: {result.visual_tokens} visual tokens, batch {args.batch}, median of {args.repeats}")
    print(TABLE_HEADER)
    print(result.table_row())
    return 0
