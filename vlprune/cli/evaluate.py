"""`vlprune eval`: exact-match accuracy on a VQA dataset, overall and per question type."""

from __future__ import annotations

import argparse

from vlprune.api import load
from vlprune.cli.options import (
    COMPILE_HELP,
    _method_settings,
    _positive,
    add_device_options,
    add_method_options,
    add_model_option,
)


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    evaluate = commands.add_parser("eval", help="exact-match accuracy on a VQA dataset, overall and per question type")
    add_model_option(evaluate, default_model, f"built-in name, folder or HF id (default {default_model})")
    evaluate.add_argument("--dataset", default="shapes", help="shapes, easy-vqa or jsonl:PATH")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=_positive, default=None, help="first N questions only")
    add_method_options(
        evaluate, keep_help="visual tokens kept: a count, or a fraction", option_help="another method option"
    )
    evaluate.add_argument("--config", default=None, help="JSON with method, keep and options (from calibrate)")
    evaluate.add_argument("--batch-size", type=_positive, default=8)
    evaluate.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_device_options(evaluate)


def execute(args: argparse.Namespace) -> int:
    from vlprune.eval.datasets import load_dataset
    from vlprune.eval.evaluate import evaluate

    samples = load_dataset(args.dataset, split=args.split, limit=args.limit)
    method, keep, options = _method_settings(args)
    pipeline = load(
        args.model,
        method=method,
        keep=keep,
        layer=args.layer,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        **options,
    )
    with pipeline:
        result = evaluate(pipeline, samples, batch_size=args.batch_size)
    print(f"{args.model} on {args.dataset} {args.split}, method {method}, keep {keep or 'all'}")
    print(result.table())
    return 0
